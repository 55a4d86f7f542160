"""A worker node removed from a two-node cluster while ``data.prepare`` runs: the stage
completes and its shards are byte-identical to a fault-free run."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from components.data.config import PrepareConfig
from components.data.prepare import prepare

pytestmark = pytest.mark.reliability

CONFIG = {
    "source": {"kind": "sklearn_digits"},
    "augment": {"copies": 1, "rotate": 10, "noise": 0.05, "seed": 3},
    "split": {"val": 0.1, "test": 0.2, "seed": 1},
    "rows_per_shard": 500,
    "chunk_rows": 60,  # 30 read tasks: the node goes while many are queued or running
}


def shard_digests(out: Path) -> dict[str, str]:
    dataset = json.loads((out / "dataset.json").read_text())
    listed = dataset["shards"] + dataset["quarantine"]["shards"]
    digests = {s["path"]: s["sha256"] for s in listed}
    assert digests, "no shards written"
    return digests


def test_worker_node_removed_during_prepare_gives_identical_shards(ray_cluster, tmp_path):
    (worker,) = [n for n in ray_cluster.list_all_nodes() if n is not ray_cluster.head_node]
    pids = [info.process.pid for infos in worker.all_processes.values() for info in infos]
    config = PrepareConfig.model_validate(CONFIG)
    removed: list[int] = []

    def remove_worker_after_first_reads(phase: str, rows_done: int, **_):
        # Called on the driver as read tasks finish: by then the worker node holds finished
        # chunks in its object store and is running more reads.
        if phase == "read" and rows_done >= 120 and not removed:
            ray_cluster.remove_node(worker, allow_graceful=False)
            removed.append(rows_done)

    faulty = tmp_path / "faulty"
    faulty.mkdir()
    metrics = prepare(config, faulty, report=remove_worker_after_first_reads)
    assert removed and removed[0] < 1797, "the node was not removed during the reads"
    assert not [p for p in pids if psutil.pid_exists(p)], "the worker node's processes still run"
    assert metrics["data/rows_in"] == 1797 and metrics["data/quarantined"] == 0

    clean = tmp_path / "clean"  # fault-free: the one node that is left
    clean.mkdir()
    prepare(config, clean)
    assert shard_digests(faulty) == shard_digests(clean)
    faulty_files = sorted(p.relative_to(faulty) for p in faulty.rglob("*.parquet"))
    assert faulty_files == sorted(p.relative_to(clean) for p in clean.rglob("*.parquet"))
    for rel in faulty_files:
        assert (faulty / rel).read_bytes() == (clean / rel).read_bytes(), rel
