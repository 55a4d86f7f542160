"""A flat, array-backed replay buffer that hands the Learner a ready train batch.

RLlib's episode replay buffers keep episode objects and slice them on every sample, and the
learner connector then turns the slices into a batch: with one update of 256 transitions per env
step that Python work dominates DDPG's learning loop. Here each transition is written once, as
rows of preallocated numpy arrays (a ring), and a sample is one fancy-index per column.

n-step returns are folded in as transitions arrive: per episode, the last ``n`` steps wait in a
small queue; a transition leaves it with ``R = sum_k gamma^k r_k``, the observation ``n`` steps
later, the number of steps folded (``n_step``, fewer at an episode's end) and ``terminated`` only
when its window reaches a true termination (a time-limit truncation keeps bootstrapping).

Proportional prioritized replay (Schaul et al. 2016) is an option: priorities ``|td| + eps`` to the
power ``alpha``, sampling by a cumulative sum, importance weights ``(N P(i))^-beta`` normalized
by their maximum.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
from ray.rllib.core.columns import Columns


class FlatReplayBuffer:
    """Uniform (or prioritized) replay of n-step transitions in flat numpy arrays.

    Args:
        capacity: transitions kept; the oldest are overwritten.
        n_step: steps folded into each transition's return.
        gamma: discount used for the n-step return.
        prioritized: sample in proportion to TD error instead of uniformly.
        alpha: how much prioritization is used (0 is uniform).
        beta: importance-sampling correction (1 is full correction).
        eps: added to |td| so no transition has zero priority.
        seed: seed of the sampling generator.
    """

    def __init__(
        self,
        capacity: int,
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        seed: int | None = None,
    ):
        self.capacity = int(capacity)
        self.n_step = int(n_step)
        self.gamma = float(gamma)
        self.prioritized = prioritized
        self.alpha, self.beta, self.eps = alpha, beta, eps
        self.rng = np.random.default_rng(seed)
        self.size = 0  # rows holding a transition
        self.pos = 0  # next row to write
        self.num_added = 0  # lifetime transitions added
        self.cols: dict[str, np.ndarray] | None = None
        self.priorities = np.zeros(self.capacity, np.float64) if prioritized else None
        self.max_priority = 1.0
        # Episode id -> the (obs, action, reward) steps still waiting to be folded.
        self.pending: dict[str, deque] = {}

    def __len__(self) -> int:
        return self.size

    # -- writing ------------------------------------------------------------------------------

    def add(self, episodes: list[Any]) -> None:
        """Adds the steps of episode chunks (``SingleAgentEpisode``) from the env runners."""
        for ep in episodes:
            n = len(ep)
            if n == 0:
                continue
            obs = np.asarray(ep.get_observations(), np.float32)  # n + 1 rows
            actions = np.asarray(ep.get_actions(), np.float32)
            rewards = np.asarray(ep.get_rewards(), np.float32)
            if self.n_step == 1:
                # The common case, vectorized: every step is one finished transition.
                term = np.zeros(n, np.float32)
                term[-1] = float(ep.is_terminated)
                self._write(obs[:-1], actions, rewards, obs[1:], term, np.ones(n, np.float32))
                continue
            queue = self.pending.setdefault(ep.id_, deque())
            for t in range(n):
                queue.append((obs[t], actions[t], rewards[t]))
                if len(queue) == self.n_step:
                    last = ep.is_terminated and t == n - 1
                    self._emit(queue, obs[t + 1], last)
                    queue.popleft()
            if ep.is_done:
                # Flush the shorter windows that end at the episode's last observation.
                while queue:
                    self._emit(queue, obs[-1], ep.is_terminated)
                    queue.popleft()
                del self.pending[ep.id_]

    def _emit(self, queue: deque, next_obs: np.ndarray, terminated: bool) -> None:
        ret = sum(self.gamma**k * step[2] for k, step in enumerate(queue))
        first = queue[0]
        self._write(
            first[0][None],
            first[1][None],
            np.array([ret], np.float32),
            next_obs[None],
            np.array([float(terminated)], np.float32),
            np.array([len(queue)], np.float32),
        )

    def _write(self, obs, actions, rewards, next_obs, terminated, n_step) -> None:
        data = {
            Columns.OBS: obs,
            Columns.ACTIONS: actions,
            Columns.REWARDS: rewards,
            Columns.NEXT_OBS: next_obs,
            Columns.TERMINATEDS: terminated,
            "n_step": n_step,
        }
        if self.cols is None:
            self.cols = {
                k: np.zeros((self.capacity, *v.shape[1:]), np.float32) for k, v in data.items()
            }
        count = len(rewards)
        rows = (self.pos + np.arange(count)) % self.capacity
        for k, v in data.items():
            self.cols[k][rows] = v
        if self.prioritized:
            self.priorities[rows] = self.max_priority**self.alpha
        self.pos = int((self.pos + count) % self.capacity)
        self.size = min(self.size + count, self.capacity)
        self.num_added += count

    # -- reading ------------------------------------------------------------------------------

    def sample(self, num_items: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Returns ``num_items`` transitions (a dict of column arrays) and their row indices."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if not self.prioritized:
            idx = self.rng.integers(0, self.size, num_items)
            return {k: v[idx] for k, v in self.cols.items()}, idx
        p = self.priorities[: self.size]
        cumsum = np.cumsum(p)
        idx = np.searchsorted(cumsum, self.rng.random(num_items) * cumsum[-1], side="right")
        idx = np.minimum(idx, self.size - 1)
        probs = p[idx] / cumsum[-1]
        weights = (self.size * probs) ** (-self.beta)
        batch = {k: v[idx] for k, v in self.cols.items()}
        batch["weights"] = (weights / weights.max()).astype(np.float32)
        return batch, idx

    def update_priorities(self, idx: np.ndarray, td_errors: np.ndarray) -> None:
        """Sets the priorities of sampled rows from their new TD errors."""
        if not self.prioritized:
            return
        prio = np.abs(np.asarray(td_errors, np.float64)) + self.eps
        self.priorities[idx] = prio**self.alpha
        self.max_priority = max(self.max_priority, float(prio.max()))

    # -- checkpointing (RLlib calls these when `store_buffer_in_checkpoints` is set) ----------

    def get_state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "pos": self.pos,
            "num_added": self.num_added,
            "cols": None
            if self.cols is None
            else {k: v[: self.size] for k, v in self.cols.items()},
            "priorities": None if self.priorities is None else self.priorities[: self.size],
            "max_priority": self.max_priority,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.size, self.pos = state["size"], state["pos"]
        self.num_added, self.max_priority = state["num_added"], state["max_priority"]
        if state["cols"] is not None:
            self.cols = {}
            for k, v in state["cols"].items():
                self.cols[k] = np.zeros((self.capacity, *v.shape[1:]), np.float32)
                self.cols[k][: self.size] = v
        if self.priorities is not None and state["priorities"] is not None:
            self.priorities[: self.size] = state["priorities"]

    def get_metrics(self) -> dict[str, Any]:
        return {"num_transitions": self.size, "num_transitions_added_lifetime": self.num_added}
