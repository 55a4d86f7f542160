"""The `raypipe` CLI as a subprocess, and waiting on what it does, for every test folder that
drives it from outside."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A line Ray forwards from a worker: ``(raypipe:r:a pid=123)``, ``(RayTrainWorker pid=9,
#: ip=10.0.0.1)``.
RAY_WORKER_LINE = re.compile(r"\((?:[\w.:-]+ )?pid=\d+(?:, ip=[\w.:-]+)?\)")


def cli_env(**extra: str) -> dict[str, str]:
    """This environment with Ray's auth mode said explicitly (token auth is on by default)
    and no stray token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Runs `python -m pipelines.cli ARGS` from the project root to the end; returns the
    CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # an embedded Ray it starts is its own process group
    )


def wait_for(check: Callable[[], object], timeout: float, what: str, poll: float = 0.5):
    """Polls ``check`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
