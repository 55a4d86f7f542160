"""Stages wait for the resources other stages hold, instead of timing out; a stage the embedded
Ray can never hold fails at once, saying why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import cli

from pipelines import engine, spec

TWO_TRAININGS = """
name: waits
storage: {storage}
stages:
  prepare: {{uses: data.prepare}}
{trainings}
"""
TRAINING = (
    "  train{i}: {{uses: vision.train, needs: [prepare], resources: {{workers: 1}},\n"
    "            with: {{epochs: 1, batch_size: 64, width: 8, depth: 1, seed: {i}}}}}\n"
)


@pytest.fixture
def impatient_ray():
    """A 1-CPU Ray whose processes would give up on a Train worker group after 3 s (Ray
    Train's own default is 60 s): the stages must wait on their own terms."""
    import ray

    ray.shutdown()
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"
    try:
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
        yield
    finally:
        ray.shutdown()
        del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]


def _startup_timeouts() -> list[str]:
    """Lines of this Ray session's logs where Ray Train gave up waiting for a worker group
    (and retried it: Train retries startup timeouts without counting them as failures, but
    prints the traceback)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    found = []
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            found += [line for line in text.splitlines() if "startup timed out" in line]
    return found


def test_more_trainings_than_cpus_wait_their_turn(impatient_ray, tmp_path):
    trainings = "".join(TRAINING.format(i=i) for i in range(2))
    path = tmp_path / "waits.yaml"
    path.write_text(TWO_TRAININGS.format(storage=tmp_path / "store", trainings=trainings))
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert record.ok, record.error
    # Two one-CPU gangs on one CPU: one waited longer than the 3 s after which Ray Train
    # would have timed it out, and none was retried.
    assert _startup_timeouts() == []
    runs = [record.stages[f"train{i}"] for i in range(2)]
    for st in runs:
        assert st.attempts == 1 and st.metrics["resumed_from_epoch"] is None, st.metrics
        assert st.metrics["epochs_run"] == 1


def test_a_stage_the_local_ray_can_never_hold_fails_at_once(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(
        f"name: big\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  prepare: {uses: data.prepare}\n"
        "  train: {uses: vision.train, needs: [prepare], resources: {workers: 64},\n"
        "          with: {epochs: 1}}\n"
        "  agent: {uses: rl.ddpg, with: {learner_cpus: 64, timesteps: 100}}\n"
    )
    result = cli("run", str(path), timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "need 64 CPUs" in out
    # A stage whose own task asks for more (a learner's CPUs) fails the same way.
    assert "own task needs 64 CPUs (stages.agent.with.learner_cpus)" in out
