"""Two Ray nodes: the stage runs on a head with no CPUs (where a job's 0-CPU stage task
lands when its driver sits on the head), its read, statistics and write tasks on the worker
node, and the output is byte-identical to a one-node run."""

from __future__ import annotations

import pytest
from data_writers import run_stage, shard_digests

from components.data.config import PrepareConfig
from components.data.prepare import prepare


@pytest.mark.reliability
@pytest.mark.slow
def test_stage_on_a_cpu_less_head_same_shards_as_one_node(ray_cpu_less_head, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config = {
        "source": {"kind": "sklearn_digits"},
        "augment": {"copies": 1, "rotate": 10, "noise": 0.05, "seed": 2},
        "rows_per_shard": 600,
        "chunk_rows": 200,
    }
    # The stage's body as the engine's 0-CPU stage task, placed on the head.
    head = ray_cpu_less_head.head_node.node_id
    stage = ray.remote(num_cpus=0)(prepare).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
    )
    two = tmp_path / "two"
    two.mkdir()
    # Work pinned to the head would wait for a CPU for ever: the timeout makes that a failure.
    metrics = ray.get(stage.remote(PrepareConfig.model_validate(config), two), timeout=240)
    assert metrics["data/rows_in"] == 1797

    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        one, _ = run_stage(tmp_path, {**config, "chunk_rows": 2000}, "one")
    finally:
        ray.shutdown()
    assert shard_digests(two) == shard_digests(one)
    for rel in shard_digests(one):
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel
