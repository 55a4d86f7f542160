"""Helpers of the reliability suite: the `raypipe` CLI as a process of its own (so it can be
SIGKILLed), waiting on a run record, and checksums of whole artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --- one run of hostile stages (issue 16), shared by test_data_limits and test_secrets -------

MB = 1 << 20
#: Credentials planted in URIs; none may appear where raypipe shows or saves text.
SECRETS = ("AKIDSECRET1", "SECRETKEY2", "TOKENVALUE3", "PASSWORD4")
#: The failing stage's error: a URI with credentials in its userinfo and its query.
LEAKY_MESSAGE = "s3://AKIDSECRET1:SECRETKEY2@bucket/x?session_token=TOKENVALUE3 is unreachable"


def leaks(text: str) -> list[str]:
    """The planted secrets found in ``text``."""
    return [secret for secret in SECRETS if secret in text]


@dataclass
class HostileRun:
    """A finished run of :func:`run_hostile_stages`."""

    record: Any
    lines: list[str]
    store: Path
    cases: dict[str, tuple[dict, str]]


def hostile_data(d: Path) -> dict[str, tuple[dict, str]]:
    """Data files that state numbers they do not hold, or that libraries choke on:
    {stage: (data.prepare source, words of its one-line error; "" when it succeeds)}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = "".join(f"{i},{i % 2}\n" for i in range(8))
    (d / "huge-label.csv").write_text(f"x,label\n{rows}9,1000000000000\n")
    (d / "huge-cells.csv").write_text(f"x,label\n{'v' * MB},0\n{'w' * MB},1\n1,0\n")
    (d / "label-only.csv").write_text("label\n0\n1\n")
    (d / "dup.csv").write_text("x,x,label\n1,2,0\n3,4,1\n")
    listed = pa.array([[1, 2], [3]], pa.list_(pa.int64()))
    pq.write_table(pa.table({"x": listed, "label": [0, 1]}), d / "list.parquet")
    dup = pa.table([pa.array([1, 2]), pa.array([3, 4]), pa.array([0, 1])], ["x", "x", "label"])
    pq.write_table(dup, d / "dup.parquet")
    (d / "images.idx").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", 4_000_000_000, 8, 8))
    (d / "labels.idx").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 1) + b"\0")

    def csv(name: str) -> dict:
        return {"kind": "csv", "paths": [str(d / name)]}

    def parquet(name: str) -> dict:
        return {"kind": "parquet", "paths": [str(d / name)]}

    idx = {"kind": "mnist_idx", "images": [str(d / "images.idx")]}
    idx["labels"] = [str(d / "labels.idx")]
    return {
        "huge_label": (csv("huge-label.csv"), ""),
        "huge_cells": (csv("huge-cells.csv"), "were quarantined"),
        "label_only": (csv("label-only.csv"), "label-only.csv: no feature columns"),
        "dup_csv": (csv("dup.csv"), "dup.csv: duplicate column name(s) 'x'"),
        "list_column": (parquet("list.parquet"), "list.parquet: column 'x' holds list<"),
        "dup_parquet": (parquet("dup.parquet"), "dup.parquet: duplicate column name(s) 'x'"),
        "idx_declares_billions": (idx, "images.idx: the header declares 4,000,000,000 records"),
    }


def run_hostile_stages(d: Path) -> HostileRun:
    """Runs (on the Ray already started) one pipeline of the :func:`hostile_data` stages and a
    `test.fail` stage whose error is :data:`LEAKY_MESSAGE` (an override), tracked in MLflow on
    SQLite; each stage fails or succeeds on its own."""
    from pipelines import engine, spec

    cases = hostile_data(d)
    stages = "".join(
        f"  {name}:\n    uses: data.prepare\n    with: {{source: {json.dumps(source)}, "
        "split: {val: 0.25, test: 0.0}, clean: {max_rejected_fraction: 0.5}}\n"
        for name, (source, _) in cases.items()
    )
    stages += "  leak: {uses: test.fail}\n"
    store = d / "store"
    path = d / "p.yaml"
    path.write_text(f"name: hostile\nstorage: {store}\nstages:\n{stages}")
    lines: list[str] = []
    pipeline = spec.load(path, [f"leak.message={LEAKY_MESSAGE}"])
    record = engine.run_pipeline(pipeline, printer=lines.append)
    return HostileRun(record, lines, store, cases)


@contextlib.contextmanager
def tmpfs(path: Path, options: str, name: str):
    """A real tmpfs mounted at ``path`` with ``options`` (``size=4m,mode=0755``, ``ro``...),
    unmounted at the end; the test is skipped where it cannot be mounted (not root, no
    `mount`, a container that forbids it)."""
    import shutil

    import pytest

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, name, str(path)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def good_record(run_id: str) -> dict:
    """A run record's JSON (as plain data) of one succeeded stage."""
    from pipelines.record import RunRecord, StageEntry

    record = RunRecord(run_id, "good", "p.yaml", "/s", None, [], [], status="succeeded")
    record.stages = {"a": StageEntry(uses="test.sleep", status="succeeded", seconds=0.5)}
    return json.loads(record.to_json())
