"""Load: 20 small pipelines submitted at once to a local two-node cluster (`raypipe cluster
up`, Ray Jobs API) all finish, each with its own run record and no cross-talk between runs'
artifacts (one shared store; one stage is the same in every run, the others differ)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from reliability_helpers import ROOT, cli_env

from pipelines import localcluster
from pipelines.store import Store
from pipelines.submit import JobsClient, submit

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.soak]

PIPELINES = 20
FILE = ROOT / "tests/cluster/sleep.yaml"  # left + right -> join; shipped with the job


@pytest.fixture
def two_nodes(tmp_path):
    """A head and one worker node (1 CPU each) on 127.0.0.1, stopped by pid at the end."""
    state = tmp_path / "cluster"
    try:
        yield localcluster.up(1, state_dir=state, env=cli_env())
    finally:
        localcluster.down(state)


def test_twenty_pipelines_at_once_all_finish_without_cross_talk(two_nodes, tmp_path):
    url = two_nodes.dashboard_url
    store = tmp_path / "store"
    client = JobsClient(url)

    def send(i: int):
        overrides = [
            f"storage=file://{store}",
            f"left.value={100 + i}",  # each run's own artifact: join = 100 + i + 2 + 1
            "left.seconds=0.2",
            "right.seconds=0.2",  # the same stage config in every run: one shared artifact
        ]
        # A small driver reservation: the jobs queue on the cluster rather than on this side.
        return submit(FILE, overrides, url, key=f"load-{i}", driver_cpus=0.2, client=client)

    with ThreadPoolExecutor(PIPELINES) as pool:
        submissions = list(pool.map(send, range(PIPELINES)))
    ids = [s.submission_id for s in submissions]
    assert all(s.created for s in submissions) and len(set(ids)) == PIPELINES
    outcomes = {sid: client.wait(sid, timeout=400) for sid in ids}
    assert set(outcomes.values()) == {"SUCCEEDED"}, {
        sid: (status, client.logs(sid)[-1500:])
        for sid, status in outcomes.items()
        if status != "SUCCEEDED"
    }
    drivers = {client.client.get_job_info(sid).driver_node_id for sid in ids}
    assert len(drivers) == 2, "every driver ran on one node"

    # Each job wrote its own run record; they name 20 different runs.
    records = [json.loads(p.read_text()) for p in sorted(store.glob("runs/*/run.json"))]
    assert len(records) == PIPELINES and len({r["run_id"] for r in records}) == PIPELINES
    by_value = {}
    for record in records:
        assert record["status"] == "succeeded", record
        (value,) = [o.split("=")[1] for o in record["overrides"] if o.startswith("left.value=")]
        by_value[int(value) - 100] = record
    assert sorted(by_value) == list(range(PIPELINES))
    shared = Store(f"file://{store}")
    for i, record in by_value.items():
        st = record["stages"]
        join = json.loads(
            (Path(st["join"]["artifact"].removeprefix("file://")) / "out.json").read_text()
        )
        assert join["value"] == 100 + i + 3, (i, join)  # its own left, the shared right
        for name in ("left", "right", "join"):
            shared.verify(st[name]["uses"], st[name]["cache_key"])
    # The same stage in 20 concurrent runs: one artifact, the same for all (one publish won).
    rights = {
        (r["stages"]["right"]["cache_key"], r["stages"]["right"]["artifact"]) for r in records
    }
    assert len(rights) == 1
    published = [p for p in (store / "artifacts" / "test.sleep").iterdir()]
    assert len(published) == 2 * PIPELINES + 1  # 20 lefts, 20 joins, 1 right
