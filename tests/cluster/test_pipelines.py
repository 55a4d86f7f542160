"""Every shipped pipeline on a real `raypipe cluster up` cluster, as a user submits it, and a
submission from the image's non-editable install.

The cluster (``pipeline_cluster``, one for the session) has the default 1-CPU head, where the
jobs' drivers (default ``--driver-cpus 0.25``) and their 0-CPU stage tasks land: the set-up in
which data.prepare's write tasks, pinned to the stage's node, waited for ever.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cli_helpers import RAY_WORKER_LINE
from cluster_helpers import ROOT, RUN_ORDER, SHRINK, cli_env, shrunk

from pipelines.submit import JobsClient

pytestmark = pytest.mark.slow

SHIPPED = sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml"))


def _submit(args: list[str], env: dict, cwd: Path = ROOT, exe: list[str] | None = None):
    cmd = (exe or [sys.executable, "-m", "pipelines.cli"]) + ["submit", *args, "--wait"]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return -9, out
    return proc.returncode, out


def _run_record(out: str, store: Path) -> dict:
    import json

    (run_id,) = re.findall(r"^run (\S+) of pipeline", out, re.M)
    return json.loads((store / "runs" / run_id / "run.json").read_text())


@pytest.mark.soak
@pytest.mark.timeout(1500)  # demo.yaml's stages train at once on two shared cores
def test_every_shipped_pipeline_runs_when_submitted_to_a_cluster(pipeline_cluster):
    assert sorted(SHRINK) == SHIPPED, "a shipped pipeline has no shrinking overrides"
    tmp, env = pipeline_cluster["tmp"], pipeline_cluster["env"]
    # No --address: submit finds the cluster `up` recorded. demo.yaml first (a stage of every
    # kind), then the rest at once (their stages are mostly demo's, cached; see shrunk()).
    first, rest = RUN_ORDER[0], RUN_ORDER[1:]
    results = {first: _finish(_submit([f"pipelines/{first}", *shrunk(first, tmp)], env))}
    procs = {name: _submit([f"pipelines/{name}", *shrunk(name, tmp)], env) for name in rest}
    results.update({name: _finish(proc) for name, proc in procs.items()})
    jobs = []
    for name, (_code, out) in results.items():
        jobs += re.findall(r"^job (raypipe-\S+): (?:SUCCEEDED|FAILED)$", out, re.M)
        record = _run_record(out, tmp / "store")
        for stage, st in record["stages"].items():
            assert st["status"] == "succeeded", (name, stage, st.get("error"), out[-3000:])
        # The job's log is the driver's plain lines: Ray's worker output stays in Ray's logs.
        assert not [line for line in out.splitlines() if RAY_WORKER_LINE.search(line)], out
    # The set-up this guards: some drivers (and so their stage tasks) sat on the 1-CPU head.
    client = JobsClient(pipeline_cluster["info"].dashboard_url)
    head = _head_node_id(client)
    assert any(client.require(job).driver_node_id == head for job in jobs)


def _head_node_id(client: JobsClient) -> str:
    response = client.client._do_request("GET", "/api/v0/nodes?limit=100&detail=true")
    nodes = response.json()["data"]["result"]["result"]
    (head,) = [n["node_id"] for n in nodes if n.get("is_head_node")]
    return head


def _dockerfile_steps() -> tuple[list[str], list[str]]:
    """The sources the Dockerfile copies into its WORKDIR, and its project install command."""
    copied, install = [], None
    for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines():
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[:1] == ["COPY"]:
            copied += [w for w in words[1:-1] if not w.startswith("--")]
        if words[:1] == ["RUN"] and "pip" in words and "torch" not in line:
            install = words[words.index("pip") + 1 :]
    assert copied and install, "the Dockerfile's COPY lines or its project install not found"
    return copied, install


def test_the_image_install_step_then_submit_from_its_folder(pipeline_cluster, tmp_path):
    """The Dockerfile's COPY lines and its `pip install` (offline: the dependencies come from
    this venv), into a fresh venv; then `raypipe submit` from that folder, as the CronJob does."""
    workdir = tmp_path / "raypipe"
    workdir.mkdir()
    copied, install = _dockerfile_steps()
    for source in copied:
        src = ROOT / source
        (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / src.name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch, Ray and the rest from the shared environment, read-only, after the venv's own.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "shared-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    done = subprocess.run(
        [python, "-m", "pip", *install, *offline], cwd=workdir, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.run(
        [python, "-c", "import pipelines.cli; print(pipelines.cli.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(Path(site)), where  # a real install
    raypipe = venv / "bin" / "raypipe"
    env = cli_env(RAYPIPE_ADDRESS=pipeline_cluster["info"].dashboard_url)
    env.pop("RAYPIPE_PROJECT", None)
    env.pop("RAYPIPE_COMPONENTS", None)  # the suite's test components are not in the image
    name = "retrain.yaml"
    proc = _submit(
        [f"pipelines/{name}", *shrunk(name, pipeline_cluster["tmp"])], env, workdir, [str(raypipe)]
    )
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    assert "must be inside the project" not in out
    record = _run_record(out, pipeline_cluster["tmp"] / "store")
    assert record["status"] == "succeeded" and set(record["stages"]) == {
        "prepare",
        "classifier",
        "gate",
    }
