"""Fixtures of the tune tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _fresh_ray_after_module():
    """A fresh Ray after each tune test module: Train leaves detached helper actors behind
    when ASHA stops trials (its placement-group cleaners), and the tests that come next
    should not share a cluster with them. The next ``ray_local`` test starts Ray again."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
