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


@pytest.fixture
def ray_cluster():
    """Two Ray nodes with one CPU each on this machine (``ray.cluster_utils.Cluster``)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
