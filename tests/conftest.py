"""Shared test set-up: one embedded Ray reused across tests, auth mode set explicitly."""

from __future__ import annotations

import os
import tempfile

import pytest

# Ray 2.60 turns token auth on for `ray.init()` unless told; tests say what they want.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Keep Ray Data / Train from drawing progress bars into test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No preemptible nodes here: Train's preemption watcher would be one more process per run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The engine's test components (test.sleep, test.fail) are the tests' own, not the product's.
os.environ.setdefault("RAYPIPE_COMPONENTS", "tests.engine_components")
# Downloads of artifacts from URI stores go to a cache of this test session's own.
os.environ.setdefault("RAYPIPE_CACHE", tempfile.mkdtemp(prefix="raypipe-test-cache-"))


def _init_local():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
    )


@pytest.fixture
def ray_local():
    """A local Ray instance (2 CPUs), started once and reused by every test that asks for it.

    A test that needs several nodes uses ``ray_cluster`` instead, which shuts this one down;
    the next ``ray_local`` test starts it again.
    """
    import ray

    if not ray.is_initialized():
        _init_local()
    yield ray


def _two_nodes(head_cpus: int, worker_cpus: int):
    """Connects this process to a new two-node ``ray.cluster_utils.Cluster``; yields it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=worker_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_cluster():
    """Two Ray nodes with one CPU each on this machine (``ray.cluster_utils.Cluster``)."""
    yield from _two_nodes(1, 1)


@pytest.fixture
def ray_cpu_less_head():
    """A head with no CPUs (as on KubeRay and the cluster launcher) and a 2-CPU worker node."""
    yield from _two_nodes(0, 2)


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def train_workers() -> list:
    """Ray Train worker processes started by this test process's own Ray (its descendants)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def kill_train_worker_mid_run():
    """Runs a pipeline in a thread and SIGKILLs one of its Ray Train workers, from outside and
    by pid, once ``stage`` has reported two epochs (lines holding ``marker`` in its progress
    file): by then Train's controller has surely registered the first checkpoint (it takes in
    reports when it polls the workers). Returns (the run's record, the killed pid)."""
    import signal
    import threading
    import time

    def run(run_pipeline, storage, stage: str, marker: str):
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(record=run_pipeline()), daemon=True)
        pattern = f"*/progress/{stage}.jsonl"
        before = set((storage / "runs").glob(pattern))
        runner.start()
        killed = None
        deadline = time.time() + 300
        while time.time() < deadline and runner.is_alive():
            progress = set((storage / "runs").glob(pattern)) - before
            reported = sum(p.read_text().count(marker) for p in progress)
            workers = train_workers()
            if reported >= 2 and workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.1)
        assert killed is not None, "never saw two reported epochs with a live worker"
        runner.join(timeout=400)
        assert not runner.is_alive(), "the run did not finish after the worker was killed"
        assert killed not in [p.pid for p in train_workers()]
        return result["record"], killed

    return run
