"""Fixtures of the reliability suite."""

from __future__ import annotations

import pytest
from reliability_helpers import HostileRun, run_hostile_stages

_HOSTILE: list[HostileRun] = []


@pytest.fixture
def hostile_run(ray_local, tmp_path_factory) -> HostileRun:
    """One engine run of hostile stages (bad data files, a failing stage whose error holds
    credentials), made once for the tests that read it: each run creates an MLflow store,
    which costs seconds."""
    if not _HOSTILE:
        _HOSTILE.append(run_hostile_stages(tmp_path_factory.mktemp("hostile")))
    return _HOSTILE[0]
