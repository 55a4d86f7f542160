"""Helpers for the cluster tests: the `raypipe` CLI as a subprocess, waiting, process checks."""

from __future__ import annotations

from cli_helpers import ROOT, cli, cli_env, wait_for  # noqa: F401 (the cluster tests import them here)

PIPELINE = "tests/cluster/sleep.yaml"  # inside the project: it is shipped with the job


def output(result) -> str:
    return result.stdout + result.stderr


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
