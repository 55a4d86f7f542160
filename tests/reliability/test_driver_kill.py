"""The driver SIGKILLed at three moments of one run (during data, during training, during the
gate), each time followed by `raypipe resume`: the final artifacts have the checksums of a run
that was never interrupted, and no stage that had completed is computed again.

The drivers are `raypipe` processes connected to this session's Ray (`--ray-address`), as on a
cluster: Ray ends a dead driver's tasks and actors itself. (A driver with an embedded Ray,
killed with its whole process group, is tests/engine/test_engine.py's kill test.)"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

import psutil
import pytest
from reliability_helpers import (
    artifact_checksums,
    cli,
    kill_group,
    read_record,
    start_cli,
    wait_for,
)

from components.tune.evaluate import lock_path
from pipelines import engine, spec
from pipelines.store import Store

pytestmark = [pytest.mark.reliability, pytest.mark.soak]

# Tiny but real: digits -> a 1-worker CNN for 3 epochs -> a gate that registers the model in
# MLflow (each store has its own registry, under its root). Dropout off and no
# shuffle buffer, so a classifier resumed from its epoch checkpoint retraces the same steps.
STAGES = """\
  prepare:
    uses: data.prepare
    with: {augment: {copies: 1, rotate: 10, seed: 0}, chunk_rows: 300}
  classifier:
    uses: vision.train
    needs: [prepare]
    resources: {workers: 1, cpus_per_worker: 1}
    with: {epochs: 3, batch_size: 64, lr: 3.0e-3, width: 8, dropout: 0.0, shuffle_buffer: 0}
  gate:
    uses: tune.evaluate
    needs: [prepare, classifier]
    with: {min: {test/accuracy: 0.5}, register_as: killed-cnn}
"""
# Files whose bytes depend on the clock (progress points carry their time).
TIMED = ("history.jsonl",)
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Train writes it as it registers a checkpoint


def write_pipeline(tmp_path: Path, store: Path) -> Path:
    path = tmp_path / f"{store.name}.yaml"
    path.write_text(f"name: killed\nstorage: {store}\nstages:\n{STAGES}")
    return path


def checkpoint_registered(store: Path, record: dict, stage: str) -> bool:
    """Whether Ray Train has registered a checkpoint of the stage's run in its scratch space."""
    key = record["stages"][stage].get("cache_key")
    return bool(key) and (store / "scratch" / key / "train" / TRAIN_SNAPSHOT).exists()


def published(store: Path, component: str) -> list[Path]:
    folder = store / "artifacts" / component
    return list(folder.iterdir()) if folder.exists() else []


def stage_processes(pipeline: str, stage: str) -> list[int]:
    """Pids of Ray workers running the stage's task now (Ray titles them with the task name)."""
    title = f"ray::raypipe:{pipeline}:{stage}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(title in part for part in proc.info.get("cmdline") or []):
                found.append(proc.pid)
    return found


@contextlib.contextmanager
def gate_held(store: Path, model: str):
    """Holds the registry lock the gate takes before it reads or writes the registry, so a gate
    started now stays inside its stage, with nothing registered, until this returns."""
    with open(lock_path(f"sqlite:///{store}/mlflow.db", model), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def manifest_text(record: dict, stage: str) -> str:
    return (Path(record["stages"][stage]["artifact"]) / "manifest.json").read_text()


def kill_when(driver, store: Path, run_id: str | None, ready, what: str, log: Path) -> dict:
    """Waits until ``ready(record)`` holds, SIGKILLs the driver, returns the record it left."""
    try:
        wait_for(
            lambda: (r := read_record(store, run_id)) is not None and ready(r),
            240,
            f"{what} (driver log: {log.read_text()[-2000:] if log.exists() else ''})",
            poll=0.05,
        )
    finally:
        kill_group(driver)
    record = read_record(store, run_id)
    assert record["status"] == "running", "the driver finished before it was killed"
    return record


def test_driver_killed_during_data_training_and_gate_then_resumed(ray_local, tmp_path):
    # The reference: the same pipeline, never interrupted (in this process, on the test Ray).
    clean = engine.run_pipeline(
        spec.load(write_pipeline(tmp_path, tmp_path / "clean")), printer=lambda _: None
    )
    assert clean.ok, clean.error

    store = tmp_path / "killed"
    path = write_pipeline(tmp_path, store)
    address = ["--ray-address", ray_local.get_runtime_context().gcs_address]

    # 1. During data: as soon as the prepare task is running.
    log = tmp_path / "1-run.log"
    driver = start_cli("run", str(path), *address, log=log)
    dead = kill_when(
        driver,
        store,
        None,
        lambda r: r["stages"]["prepare"]["status"] == "running",
        "prepare to start",
        log,
    )
    run_id = dead["run_id"]
    assert not published(store, "data.prepare"), "a killed prepare published an artifact"

    # 2. During training: once Train has registered an epoch's checkpoint in scratch.
    log = tmp_path / "2-resume.log"
    driver = start_cli("resume", run_id, "--storage", str(store), *address, log=log)
    dead = kill_when(
        driver,
        store,
        run_id,
        lambda r: (
            r["stages"]["classifier"]["status"] == "running"
            and checkpoint_registered(store, r, "classifier")
        ),
        "a classifier checkpoint",
        log,
    )
    assert dead["stages"]["prepare"]["status"] == "succeeded"
    assert not published(store, "vision.train"), "a killed classifier published an artifact"
    assert "prepare: completed before" not in log.read_text()  # it ran in this attempt
    prepare_manifest = manifest_text(dead, "prepare")

    # 3. During the gate: it runs, held at the registry lock, when the driver dies.
    log = tmp_path / "3-resume.log"
    with gate_held(store, "killed-cnn"):
        driver = start_cli("resume", run_id, "--storage", str(store), *address, log=log)
        dead = kill_when(
            driver,
            store,
            run_id,
            lambda r: (
                r["stages"]["gate"]["status"] == "running" and stage_processes("killed", "gate")
            ),
            "the gate to start",
            log,
        )
        # Ray ends a dead driver's tasks; only then may a gate take the lock again.
        wait_for(
            lambda: not stage_processes("killed", "gate"), 60, "the gate task to end", poll=0.05
        )
    assert "prepare: completed before the resume; kept" in log.read_text()
    classifier_manifest = manifest_text(dead, "classifier")
    assert not published(store, "tune.evaluate"), "a killed gate published an artifact"

    # 4. The last resume finishes the run.
    done = cli("resume", run_id, "--storage", str(store), *address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("prepare", "classifier"):
        assert f"{stage}: completed before the resume; kept" in done.stdout
    final = read_record(store, run_id)
    assert final["status"] == "succeeded" and final["resumed"] == 3
    # Each stage ran to completion exactly once; a completed one was never started again.
    attempts = {name: st["attempts"] for name, st in final["stages"].items()}
    assert attempts == {"prepare": 2, "classifier": 2, "gate": 2}, attempts
    assert manifest_text(final, "prepare") == prepare_manifest
    assert manifest_text(final, "classifier") == classifier_manifest
    # Training went on from its checkpoint rather than from scratch.
    metrics = final["stages"]["classifier"]["metrics"]
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    assert metrics["epochs_run"] == 3

    # The same bytes as the run that was never interrupted, stage by stage.
    for name in ("prepare", "classifier", "gate"):
        st, ref = final["stages"][name], clean.stages[name]
        assert st["cache_key"] == ref.cache_key, name
        assert artifact_checksums(st["artifact"], TIMED) == artifact_checksums(
            ref.artifact, TIMED
        ), name
        Store(str(store)).verify(st["uses"], st["cache_key"])
    ranks = [r["params_sha256"] for r in metrics["ranks"]]
    assert ranks == [r["params_sha256"] for r in clean.stages["classifier"].metrics["ranks"]]
    # The killed gate registered nothing: the resumed one made version 1 and promoted it.
    decision = json.loads((Path(final["stages"]["gate"]["artifact"]) / "decision.json").read_text())
    assert decision["promoted"] is True and decision["version"] == "1", decision
