"""A rerun in which every stage is cached: no MLflow or Ray in the command's process, every
artifact still verified, and the run still in MLflow (logged by a background process)."""

from __future__ import annotations

import json

from cli_helpers import cli, cli_env, wait_for
from mlflow import MlflowClient

from pipelines import engine, spec

#: Modules a fully cached run has no use for: each costs seconds to import.
HEAVY = ("mlflow", "ray", "pyarrow", "torch", "pandas", "matplotlib")


def imported(importtime_log: str) -> set[str]:
    """The modules ``python -X importtime`` says it imported (its lines on stderr)."""
    rows = [line for line in importtime_log.splitlines() if line.startswith("import time:")]
    return {row.rsplit("|", 1)[-1].strip() for row in rows}


def test_cached_rerun_starts_no_mlflow_nor_ray_yet_is_tracked_and_verified(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: rerun\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  a: {uses: test.sleep, with: {value: 2}}\n"
        "  b: {uses: test.sleep, needs: [a], with: {value: 3}}\n"
    )
    first = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert first.ok, first.error

    rerun = cli("run", str(path), env=cli_env(PYTHONPROFILEIMPORTTIME="1"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count(": cached") == 2, rerun.stdout
    heavy = {m for m in imported(rerun.stderr) if m.split(".")[0] in HEAVY}
    assert not heavy, f"a fully cached run imported {sorted(heavy)}"

    # The run reaches MLflow from the background, as if the driver had logged it.
    run_id = rerun.stdout.split("run ", 1)[1].split()[0]
    saved = tmp_path / "store" / "runs" / run_id / "run.json"
    mlflow_id = wait_for(
        lambda: json.loads(saved.read_text())["mlflow_run_id"], 120, "the run in MLflow"
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store'}/mlflow.db")
    parent = client.get_run(mlflow_id)
    assert parent.data.tags["raypipe.run_id"] == run_id and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{mlflow_id}'"
    )
    by_stage = {r.data.tags["raypipe.stage"]: r.data for r in children}
    assert {name: data.tags["raypipe.cache_hit"] for name, data in by_stage.items()} == {
        "a": "true",
        "b": "true",
    }
    assert by_stage["b"].params["value"] == "3.0" and by_stage["b"].metrics["value"] == 5.0
    assert json.loads(saved.read_text())["tracking_error"] is None

    # Checksums are still read on the cached path: a tampered artifact is recomputed.
    out = tmp_path / "store" / "artifacts" / "test.sleep" / first.stages["a"].cache_key
    (out / "out.json").write_text((out / "out.json").read_text().replace("2.0", "9.0"))
    lines: list[str] = []
    again = engine.Runner(spec.load(path), printer=lines.append, track_later=True).run()
    assert again.ok and not again.stages["a"].cache_hit, lines
    assert any("a: cached artifact is broken" in line for line in lines), lines
    assert json.loads((out / "out.json").read_text())["value"] == 2.0
    assert again.mlflow_run_id  # a stage ran: tracked by the driver itself
