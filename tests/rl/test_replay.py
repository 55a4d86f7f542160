"""The flat replay: n-step folding, terminations vs truncations, chunked episodes, priorities."""

from __future__ import annotations

import numpy as np
import pytest
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from components.rl.replay import FlatReplayBuffer


def chunk(id_: str, start: int, stop: int, terminated=False, truncated=False):
    """Steps ``start..stop`` of an episode whose obs at step t is [t, t, t] and reward t + 1."""
    return SingleAgentEpisode(
        id_=id_,
        observations=[np.full(3, t, np.float32) for t in range(start, stop + 1)],
        actions=[np.full(2, t / 10, np.float32) for t in range(start, stop)],
        rewards=[float(t + 1) for t in range(start, stop)],
        terminated=terminated,
        truncated=truncated,
        len_lookback_buffer=0,
    )


def rows(buffer: FlatReplayBuffer) -> dict[str, np.ndarray]:
    return {k: v[: len(buffer)] for k, v in buffer.cols.items()}


@pytest.mark.parametrize("terminated", [True, False])
def test_one_step_transitions_mask_only_terminations(terminated):
    buffer = FlatReplayBuffer(100)
    buffer.add([chunk("a", 0, 5, terminated=terminated, truncated=not terminated)])
    r = rows(buffer)
    assert len(buffer) == 5
    np.testing.assert_array_equal(r[Columns.TERMINATEDS], [0, 0, 0, 0, float(terminated)])
    np.testing.assert_array_equal(r[Columns.NEXT_OBS][:, 0], [1, 2, 3, 4, 5])  # real s' kept
    np.testing.assert_array_equal(r[Columns.REWARDS], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(r["n_step"], np.ones(5))
    np.testing.assert_allclose(r[Columns.ACTIONS][:, 0], [0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_n_step_returns_fold_rewards_and_shorten_at_the_end():
    buffer = FlatReplayBuffer(100, n_step=3, gamma=0.5)
    buffer.add([chunk("a", 0, 5, terminated=True)])
    r = rows(buffer)
    np.testing.assert_allclose(
        r[Columns.REWARDS],
        [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3 + 0.25 * 4, 3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5, 5],
    )
    np.testing.assert_array_equal(r[Columns.OBS][:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(r[Columns.NEXT_OBS][:, 0], [3, 4, 5, 5, 5])
    np.testing.assert_array_equal(r["n_step"], [3, 3, 3, 2, 1])
    # Only windows that reach the terminal step are cut off from bootstrapping.
    np.testing.assert_array_equal(r[Columns.TERMINATEDS], [0, 0, 1, 1, 1])


def test_n_step_over_episode_chunks_matches_the_whole_episode():
    whole = FlatReplayBuffer(100, n_step=3, gamma=0.9)
    whole.add([chunk("a", 0, 7, truncated=True)])
    parts = FlatReplayBuffer(100, n_step=3, gamma=0.9)
    parts.add([chunk("b", 0, 2)])  # the env runner returns an unfinished chunk ...
    parts.add([chunk("b", 2, 5)])  # ... then its continuations, same episode id
    parts.add([chunk("b", 5, 7, truncated=True)])
    for key, value in rows(whole).items():
        np.testing.assert_allclose(rows(parts)[key], value, err_msg=key)
    assert rows(whole)[Columns.TERMINATEDS].sum() == 0  # truncation bootstraps
    assert parts.pending == {}


def test_ring_overwrites_the_oldest():
    buffer = FlatReplayBuffer(4)
    buffer.add([chunk("a", 0, 6, truncated=True)])
    assert len(buffer) == 4 and buffer.num_added == 6
    assert sorted(rows(buffer)[Columns.OBS][:, 0]) == [2, 3, 4, 5]


def test_prioritized_sampling_follows_td_errors():
    buffer = FlatReplayBuffer(100, prioritized=True, alpha=1.0, beta=1.0, seed=0)
    buffer.add([chunk("a", 0, 10, truncated=True)])
    batch, idx = buffer.sample(1000)
    assert np.allclose(batch["weights"], 1.0)  # all new rows share the max priority
    td = np.full(len(idx), 1.0)
    td[idx == 3] = 30.0
    buffer.update_priorities(idx, td)
    batch, idx = buffer.sample(2000)
    assert 0.7 < np.mean(idx == 3) < 0.85  # 30 / (30 + 9)
    # Importance weights undo the bias: the favoured row weighs 30x less than the others.
    w3, w_other = batch["weights"][idx == 3].max(), batch["weights"][idx != 3].min()
    assert w3 == pytest.approx(w_other / 30, rel=1e-3)


def test_state_round_trip():
    buffer = FlatReplayBuffer(50, prioritized=True)
    buffer.add([chunk("a", 0, 7, truncated=True)])
    restored = FlatReplayBuffer(50, prioritized=True)
    restored.set_state(buffer.get_state())
    for key, value in rows(buffer).items():
        np.testing.assert_array_equal(rows(restored)[key], value)
    assert restored.num_added == buffer.num_added
