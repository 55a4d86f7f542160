"""Pipelines on a real multi-node Ray cluster (`raypipe cluster up`, three nodes on 127.0.0.1):
submit, status, logs, stop, deterministic ids, storage checks, the scheduler, `cluster down`.

One cluster for the module (`ray start` is slow here); the last test takes it down and checks
that nothing it started is left. Every process is stopped by pid, never by `ray stop`.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest
from cluster_helpers import (
    PIPELINE,
    ROOT,
    cli,
    cli_env,
    history,
    output,
    processes_naming,
    start_cli,
    stop,
    submitted_id,
    wait_for,
)

from pipelines import localcluster
from pipelines.submit import JobsClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`raypipe cluster up --workers 2`: a head and two worker nodes, 1 CPU each."""
    state = tmp_path_factory.mktemp("cluster-state")
    env = cli_env(RAYPIPE_CLUSTER_DIR=str(state))
    try:
        up = cli("cluster", "up", "--workers", "2", env=env, timeout=400)
        assert up.returncode == 0, output(up)
        info = localcluster.load(state)
        yield {"info": info, "state": state, "env": env, "tmp": tmp_path_factory.mktemp("c")}
    finally:
        localcluster.down(state)  # a no-op when the last test already took it down


def _store(cluster) -> str:
    # A URI, not a path: on a multi-node cluster storage must be shared (these nodes share a disk).
    return f"storage=file://{cluster['tmp']}/store"


def test_up_starts_three_nodes_with_distinct_resources(cluster):
    info = cluster["info"]
    assert [n["name"] for n in info.nodes] == ["head", "worker_1", "worker_2"]
    assert len({json.dumps(n["resources"]) for n in info.nodes}) == 3
    assert info.gcs_address.startswith("127.0.0.1:")
    assert info.dashboard_url.startswith("http://127.0.0.1:")
    assert JobsClient(info.dashboard_url).alive_nodes() == 3
    status = cli("cluster", "status", env=cluster["env"])
    assert "nodes 3" in status.stdout and "processes running" in status.stdout


def test_submit_wait_status_logs_and_the_same_id_twice(cluster):
    url = cluster["info"].dashboard_url
    submitted = cli("submit", PIPELINE, _store(cluster), "--address", url, "--key", "a", "--wait")
    assert submitted.returncode == 0, output(submitted)
    job = submitted_id(submitted)
    assert job.startswith("raypipe-cluster-sleep-")
    assert f"job {job}: SUCCEEDED" in submitted.stdout
    assert "join: done" in submitted.stdout  # the job's output was followed

    status = cli("jobs", "status", job, "--address", url, "--json")
    assert status.returncode == 0, output(status)
    details = json.loads(status.stdout)
    assert details["status"] == "SUCCEEDED"
    assert details["entrypoint"].startswith("python -m pipelines.cli run tests/cluster/sleep.yaml")
    assert details["entrypoint"].endswith("--ray-address auto")
    logs = cli("jobs", "logs", job, "--address", url)
    assert logs.returncode == 0 and "succeeded" in logs.stdout
    run_id = next(line.split()[1] for line in logs.stdout.splitlines() if line.startswith("run "))
    record = json.loads((cluster["tmp"] / "store" / "runs" / run_id / "run.json").read_text())
    assert record["status"] == "succeeded" and set(record["stages"]) == {"left", "right", "join"}

    # The same file, overrides and key: the same id, and no second job.
    again = cli("submit", PIPELINE, _store(cluster), "--address", url, "--key", "a")
    assert again.returncode == 0, output(again)
    assert submitted_id(again) == job and "already exists (SUCCEEDED)" in again.stdout
    listed = cli("jobs", "list", "--address", url)
    assert listed.stdout.count(job) == 1
    # A different key is a different job id (nothing is submitted here: only the id is checked).
    from pipelines import spec
    from pipelines.submit import submission_id

    p = spec.load(ROOT / PIPELINE, [_store(cluster)])
    assert submission_id(p, "a") == job != submission_id(p, "b")


def test_stop_a_long_job_and_wait_reports_it(cluster):
    url = cluster["info"].dashboard_url
    long = cli("submit", PIPELINE, _store(cluster), "left.seconds=600", "--address", url)
    assert long.returncode == 0, output(long)
    job = submitted_id(long)
    wait_for(
        lambda: "left: started" in cli("jobs", "logs", job, "--address", url).stdout,
        240,
        "the long stage to start",
        poll=2,
    )
    # --exclusive (the cron way): another key, but the pipeline is running, so nothing starts.
    exclusive = cli(
        "submit", PIPELINE, _store(cluster), "--address", url, "--key", "x", "--exclusive"
    )
    assert exclusive.returncode == 0, output(exclusive)
    assert f"job {job} of this pipeline is still RUNNING; skipped" in exclusive.stdout
    stopped = cli("jobs", "stop", job, "--address", url, "--wait")
    assert stopped.returncode == 0, output(stopped)
    assert "STOPPED" in stopped.stdout
    # --wait on a job that ended STOPPED exits 1 with its outcome.
    again = cli("submit", PIPELINE, _store(cluster), "left.seconds=600", "--address", url, "--wait")
    assert again.returncode == 1 and "the job ended STOPPED" in again.stderr


def test_three_jobs_use_three_nodes_and_a_failing_job_exits_1(cluster):
    """Drivers reserving 1 CPU each on three 1-CPU nodes: three jobs, three nodes."""
    url = cluster["info"].dashboard_url
    jobs = []
    for i, extra in enumerate(["left.seconds=12", "left.seconds=12", "join.uses=test.fail"]):
        args = [PIPELINE, _store(cluster), extra, "right.seconds=12", "--driver-cpus", "1"]
        result = cli("submit", *args, "--address", url, "--key", f"nodes-{i}")
        assert result.returncode == 0, output(result)
        jobs.append(submitted_id(result))
    failed = cli("jobs", "logs", jobs[2], "--address", url, "--follow", timeout=400)
    assert failed.returncode == 1, output(failed)
    assert "this stage always fails" in failed.stdout and "the job ended FAILED" in failed.stderr
    client = JobsClient(url)
    assert [client.wait(j, timeout=300) for j in jobs] == ["SUCCEEDED", "SUCCEEDED", "FAILED"]
    assert len({client.require(j).driver_node_id for j in jobs}) == 3


def test_local_storage_is_refused_on_a_multi_node_cluster(cluster, tmp_path):
    url = cluster["info"].dashboard_url
    refused = cli("submit", PIPELINE, f"storage={tmp_path}", "--address", url)
    assert refused.returncode == 2
    assert "is a local path" in refused.stderr and "has 3 nodes" in refused.stderr
    assert "s3://" in refused.stderr


def test_unreachable_address_and_unknown_job(cluster):
    port = localcluster.free_ports(1)[0]
    down = cli("submit", PIPELINE, "--address", f"http://127.0.0.1:{port}")
    assert down.returncode == 2 and "cannot reach the Ray Jobs API" in down.stderr
    missing = cli("jobs", "status", "raypipe-nope", "--address", cluster["info"].dashboard_url)
    assert missing.returncode == 2 and "no job 'raypipe-nope'" in missing.stderr


def _history(state: Path) -> list[dict]:
    return history(state, "cluster-sleep")


def _scheduler(cluster, state: Path, *extra: str):
    args = ["schedule", PIPELINE, _store(cluster), "left.seconds=8"]
    args += ["--address", cluster["info"].dashboard_url, "--every", "2"]
    return start_cli(*args, "--state-dir", str(state), *extra)


def test_scheduler_skips_busy_ticks_and_a_restart_does_not_double_run(cluster, tmp_path):
    state = tmp_path / "schedules"
    first = _scheduler(cluster, state)
    try:
        # The run takes > 8 s and ticks come every 2 s: later ticks find it running.
        wait_for(
            lambda: any(e["event"] == "skipped" for e in _history(state)),
            240,
            "a skipped tick",
        )
        # A second scheduler for the same pipeline is refused while one runs.
        twin = _scheduler(cluster, state)
        assert twin.wait(timeout=120) == 1
        assert "another scheduler" in twin.stdout.read()
    finally:
        stop(first, signal.SIGKILL)  # a crash: no clean-up ran
    before = _history(state)
    running = next(e["job"] for e in before if e["event"] == "submitted")
    assert all(e["job"] == running for e in before if e["event"] == "skipped")

    second = _scheduler(cluster, state, "--missed", "run_once")
    try:
        wait_for(
            lambda: [
                e for e in _history(state) if e["event"] == "submitted" and e["job"] != running
            ],
            300,
            "a new run after the restart",
        )
    finally:
        out = stop(second)
    events = _history(state)
    finished = {e["job"]: e["status"] for e in events if e["event"] == "finished"}
    assert finished.get(running) == "SUCCEEDED", out
    # Never two runs at once: the scheduled jobs' lifetimes do not overlap.
    client = JobsClient(cluster["info"].dashboard_url)
    scheduled = [j for j in client.list() if (j.metadata or {}).get("raypipe_tick")]
    submitted = [e["job"] for e in events if e["event"] == "submitted"]
    assert sorted(j.submission_id for j in scheduled) == sorted(submitted)
    spans = sorted((j.start_time, j.end_time or time.time() * 1000) for j in scheduled)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    for job in submitted:
        client.stop(job)
    history = cli("schedule", "history", PIPELINE, "--state-dir", str(state))
    assert history.returncode == 0 and "skipped" in history.stdout and running in history.stdout


def test_down_stops_every_process_up_started(cluster):
    info = cluster["info"]
    assert localcluster.alive_processes(info)
    down = cli("cluster", "down", env=cluster["env"])
    assert down.returncode == 0 and "stopped" in down.stdout, output(down)
    assert localcluster.alive_processes(info) == []
    assert processes_naming(info.temp_dir) == []
    # The Ray client server, which `ray start` leaves to init, went too: its port is free.
    client_port = int(info.client_address.rsplit(":", 1)[1])
    assert processes_naming(f"--port={client_port}") == []
    assert localcluster.port_is_free(client_port)
    assert localcluster.load(cluster["state"]) is None


def test_the_head_takes_the_standard_ports_only_when_all_are_free():
    standard = localcluster.STANDARD_PORTS
    if not all(localcluster.port_is_free(p) for p in standard):
        pytest.skip(f"a Ray of someone else's holds one of {standard}")
    assert localcluster.head_ports() == standard
    with socket.socket() as taken:  # one taken: three other ports, never a mix
        # (SO_REUSEADDR as Ray's servers: a cluster just stopped may leave TIME_WAIT behind)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", standard[1]))
        taken.listen()
        ports = localcluster.head_ports()
    assert len(set(ports)) == 3 and not set(ports) & set(standard)
