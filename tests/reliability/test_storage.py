"""Storage that cannot be used (issue 16, item 2): an unknown scheme or an empty name is refused
when the file is validated; a regular file, a read-only folder or an object store whose
endpoint does not answer is refused when a run starts, before it writes anything or starts
Ray. Each is one line naming the storage (credentials redacted), exit 2, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import ROOT, assert_one_line_error, cli_env, invoke, tmpfs

pytestmark = pytest.mark.reliability


def pipeline(tmp_path: Path, storage: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    stages = "stages:\n  a: {uses: test.sleep}\n"
    path.write_text(f"name: x\nstorage: {json.dumps(storage)}\n{stages}")
    return path


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only folder: mode 0555 for a user, a read-only tmpfs for root (whom modes
    do not stop); skipped where neither can be had."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with tmpfs(path, "ro,size=64k", "raypipe-ro"):
        yield path


@pytest.mark.parametrize(
    ("storage", "words"),
    [
        ("foo://bar/x", "unknown storage scheme 'foo'"),
        ("", "storage is empty"),
        ("   ", "storage is empty"),
        ("runs\x07here", "storage holds control characters"),
    ],
)
def test_storage_that_names_nothing_is_refused_at_validation(tmp_path, storage, words):
    path = pipeline(tmp_path, storage)
    code, output = invoke("validate", str(path))
    assert_one_line_error(code, output, f"{path}: storage: ", words)
    for command in ("runs", "show x", "report x", "resume x"):
        code, output = invoke(*command.split(), "--storage", storage)
        assert_one_line_error(code, output, words)


def test_storage_that_cannot_be_written_fails_before_the_run_writes(tmp_path, read_only_dir):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    port = closed_port()
    s3 = f"s3://AKIDKEY:SECRETKEY@bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http"
    cases = {
        "a_regular_file": (str(afile), "cannot write here: Not a directory"),
        "a_read_only_folder": (str(read_only_dir), "cannot write here:"),
        "an_unreachable_endpoint": (s3, "cannot write here:"),
        "a_file_below_a_file": (str(afile / "runs"), "cannot write here: Not a directory"),
        "runs_on_an_unreachable_endpoint": (s3, "cannot list runs:"),
        # The run's record on that endpoint, for the commands that read it (credentials
        # never printed: issue 16, item 8).
        "show_on_an_unreachable_endpoint": (s3, "cannot read:"),
        "report_on_an_unreachable_endpoint": (s3, "cannot read:"),
        "resume_on_an_unreachable_endpoint": (s3, "cannot read:"),
    }
    procs = {}
    for name, (storage, _) in cases.items():  # all at once: an endpoint's retries take seconds
        ray_tmp = tmp_path / f"ray-{name}"
        ray_tmp.mkdir()
        env = cli_env(RAY_TMPDIR=str(ray_tmp), RAYPIPE_CACHE=str(tmp_path / f"cache-{name}"))
        command = name.split("_")[0]
        if command in ("show", "report", "resume"):
            args = [command, "r1", "--storage", storage]
        elif command == "runs":
            args = ["runs", "--storage", storage]
        else:
            args = ["run", str(pipeline(tmp_path, storage, f"{name}.yaml"))]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        storage, words = cases[name]
        shown = storage.replace("AKIDKEY:SECRETKEY", "***")
        if name.split("_")[0] in ("show", "report", "resume"):
            shown = shown.replace("/x?", "/x/runs/r1/run.json?")
        assert_one_line_error(proc.returncode, out + err, f"error: {shown}: ", words)
        assert "SECRETKEY" not in out + err and "AKIDKEY" not in out + err
        # Checked before anything: no Ray was started, nothing was written or cached.
        assert not list((tmp_path / f"ray-{name}").iterdir()), name
        assert not (tmp_path / f"cache-{name}").exists(), name
    assert afile.read_text() == "not a folder\n"
    assert not list(read_only_dir.iterdir())
    code, output = invoke("runs", "--storage", str(afile))
    assert code in (0, 2) and "Traceback" not in output and len(output.splitlines()) == 1, output
