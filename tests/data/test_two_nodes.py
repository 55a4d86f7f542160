"""Two Ray nodes: read tasks may run on either, shards are written on the driver's node,
and the output is byte-identical to a one-node run."""

from __future__ import annotations

import pytest
from data_writers import run_stage, shard_digests


@pytest.mark.reliability
@pytest.mark.slow
def test_two_nodes_same_shards_as_one(ray_cluster, tmp_path):
    config = {
        "source": {"kind": "sklearn_digits"},
        "augment": {"copies": 1, "rotate": 10, "noise": 0.05, "seed": 2},
        "rows_per_shard": 600,
        "chunk_rows": 200,
    }
    two, metrics = run_stage(tmp_path, config, "two")
    assert metrics["data/rows_in"] == 1797
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        one, _ = run_stage(tmp_path, {**config, "chunk_rows": 2000}, "one")
    finally:
        ray.shutdown()
    assert shard_digests(two) == shard_digests(one)
