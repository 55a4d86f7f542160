"""Helpers of the reliability suite: the `raypipe` CLI as a process of its own (so it can be
SIGKILLed), waiting on a run record, and checksums of whole artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli_helpers import ROOT, cli, cli_env, wait_for  # noqa: F401 (the suite's tests import them here)


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `python -m pipelines.cli ARGS` in a session of its own, output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=ROOT,
            env=env or cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs a driver started by :func:`start_cli` and the embedded Ray in its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def read_record(store: Path, run_id: str | None = None) -> dict | None:
    """The run record of ``run_id`` (or of the only run) in ``store``; None before it exists."""
    found = sorted((store / "runs").glob(f"{run_id or '*'}/run.json"))
    if not found:
        return None
    try:
        return json.loads(found[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return None  # being replaced right now


def artifact_checksums(artifact: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{file: sha256} of a published artifact, from its manifest (verified separately)."""
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    return {rel: m["sha256"] for rel, m in manifest["files"].items() if rel not in skip}


def invoke(*args: str) -> tuple[int, str]:
    """Runs the `raypipe` CLI in this process (typer's CliRunner); returns its exit code and
    its output (stdout and stderr together). An exception that escaped the CLI fails the test:
    the CLI must turn every one into a line of its own."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, list(args))
    escaped = result.exception
    assert escaped is None or isinstance(escaped, SystemExit), repr(escaped)
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *words: str, exit_code: int = 2) -> str:
    """Checks a CLI failure: ``exit_code``, a single ``error:`` line holding ``words``, no
    traceback; returns the line."""
    lines = output.strip().splitlines()
    assert code == exit_code, (code, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
