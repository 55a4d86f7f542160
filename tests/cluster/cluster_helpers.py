"""Helpers for the cluster tests: the `raypipe` CLI as a subprocess, waiting, process checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = "tests/cluster/sleep.yaml"  # inside the project: it is shipped with the job


def base_env(**extra: str) -> dict[str, str]:
    """This environment with Ray's auth mode said explicitly and no stray token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Runs `python -m pipelines.cli ARGS` from the project root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output(result) -> str:
    return result.stdout + result.stderr


def wait_for(check: Callable[[], object], timeout: float, what: str, poll: float = 0.5):
    """Polls ``check`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def submitted_id(result) -> str:
    """The submission id from `raypipe submit` output."""
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("submitted", "job") and words[1] == "job":
            return words[2]
        if len(words) >= 2 and words[0] == "job" and words[1].startswith("raypipe-"):
            return words[1]
    raise AssertionError(f"no submission id in: {output(result)}")


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            named = any(text in part for part in proc.info.get("cmdline") or [])
            if named and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids
