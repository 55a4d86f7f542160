"""MLflow tracking of every stage, read back through the MLflow client; a rerun in which every
stage is cached is tracked too, without MLflow or Ray in the command's process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import sqlalchemy
from cli_helpers import cli, cli_env, wait_for
from mlflow import MlflowClient

from pipelines import engine, spec
from pipelines.tracking import Tracker, log_saved_run


def test_stages_are_tracked_as_nested_mlflow_runs(ray_local, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: tracked\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  a: {uses: test.sleep, with: {value: 1.5, steps: 3}}\n"
        "  b: {uses: test.sleep, needs: [a], resources: {workers: 2}}\n"
        "  bad: {uses: test.fail, with: {message: tracked failure}}\n"
    )
    first = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    second = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    assert first.tracking == f"sqlite:///{tmp_path / 'store'}/mlflow.db"
    assert first.mlflow_run_id and first.tracking_error is None

    client = MlflowClient(tracking_uri=first.tracking)
    experiment = client.get_experiment_by_name("tracked")
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.tags["raypipe.run_id"] == first.run_id
    assert parent.info.status == "FAILED"  # the run failed (stage bad)
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first.mlflow_run_id}'",
    )
    by_stage = {r.data.tags["raypipe.stage"]: r for r in children}
    assert set(by_stage) == {"a", "b", "bad"}
    a = by_stage["a"]
    assert a.data.params["value"] == "1.5" and a.data.params["steps"] == "3"
    assert a.data.params["resources.workers"] == "1"
    assert a.data.metrics["value"] == 1.5
    history = client.get_metric_history(a.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert by_stage["b"].data.params["resources.workers"] == "2"
    assert by_stage["bad"].info.status == "FAILED"
    assert "tracked failure" in by_stage["bad"].data.tags["raypipe.error"]
    assert "manifest.json" in {f.path for f in client.list_artifacts(a.info.run_id)}

    # The second run is tracked too, its stages marked as cache hits.
    cached = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{second.mlflow_run_id}'",
    )
    assert {r.data.tags["raypipe.stage"]: r.data.tags["raypipe.cache_hit"] for r in cached} == {
        "a": "true",
        "b": "true",
        "bad": "false",
    }


def test_own_database_commits_without_fsync_a_named_one_keeps_its_modes(ray_local, tmp_path):
    own, named = tmp_path / "store" / "mlflow.db", tmp_path / "named.db"
    path = tmp_path / "p.yaml"
    ids = {}
    for db, tracking in ((own, ""), (named, f"tracking: sqlite:///{named}\n")):
        path.write_text(
            f"name: modes\nstorage: {tmp_path / 'store'}\n{tracking}stages:\n"
            "  a: {uses: test.sleep, with: {value: 4}}\n"
        )
        record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
        assert record.mlflow_run_id and record.tracking_error is None, record.tracking_error
        ids[db] = record.mlflow_run_id

    def journal(db):
        with sqlite3.connect(db) as connection:
            return connection.execute("PRAGMA journal_mode").fetchone()[0]

    assert journal(own) == "wal" and journal(named) == "delete"
    # A connection this process opens to raypipe's database commits without an fsync each
    # (synchronous NORMAL = 1); one to the database a user named keeps SQLite's FULL (2).
    for db, synchronous in ((own, 1), (named, 2)):
        with sqlalchemy.create_engine(f"sqlite:///{db}").connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == synchronous

    # MLflow's own command line, in a process of its own, reads both databases' runs.
    for db, mlflow_id in ids.items():
        uri = f"sqlite:///{db}"
        experiment = MlflowClient(tracking_uri=uri).get_run(mlflow_id).info.experiment_id
        listed = subprocess.run(
            [sys.executable, "-m", "mlflow", "runs", "list", "--experiment-id", experiment],
            env=cli_env(MLFLOW_TRACKING_URI=uri),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, listed.stderr
        assert mlflow_id in listed.stdout and "modes" in listed.stdout, listed.stdout


def test_own_database_is_written_on_the_drivers_thread_as_stages_finish(
    ray_local, tmp_path, monkeypatch
):
    path = tmp_path / "p.yaml"
    chain = (
        f"name: live\nstorage: {tmp_path / 'store'}\nstages:\n"
        "  a: {{uses: test.sleep, with: {{value: {0}}}}}\n"
        "  b: {{uses: test.sleep, needs: [a], with: {{value: 2}}}}\n"
        "  c: {{uses: test.sleep, needs: [b], with: {{value: 3}}}}\n"
    )
    path.write_text(chain.format(0))
    first = engine.Runner(spec.load(path), printer=lambda _line: None, track_later=True)
    assert first.run().ok  # MLflow's client makes the database and the experiment
    assert not isinstance(first._tracking, engine.InlineCalls)

    def no_thread(*_args, **_kwargs):
        raise AssertionError("a tracking thread was started")

    monkeypatch.setattr(engine, "ThreadPoolExecutor", no_thread)
    path.write_text(chain.format(1))
    runner = engine.Runner(spec.load(path), printer=lambda _line: None, track_later=True)
    record = runner.run()
    assert record.ok and isinstance(runner._tracking, engine.InlineCalls)
    assert record.tracking_error is None and record.tracked_later is None
    client = MlflowClient(tracking_uri=record.tracking)
    parent = client.get_run(record.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.mlflow_run_id}'",
    )
    by_stage = {r.data.tags["raypipe.stage"]: r for r in children}
    assert sorted(by_stage) == ["a", "b", "c"]
    assert all(r.info.status == "FINISHED" for r in children)
    # Logged as the run goes: a stage is in MLflow before the stage after the next starts.
    assert by_stage["a"].info.end_time <= record.stages["c"].start * 1000


#: A database a pipeline names (``tracking:``): always written through MLflow's client.
NAMED = "sqlite:///{}/named.db"


def far_away(monkeypatch):
    """The driver's tracking (in this process) as if MLflow were a server 3 s away for each
    stage: longer than a run waits for it (``engine.TRACKING_WAIT_S``). MLflow's client only:
    the tests that use it name a database, which raypipe does not write directly. Returns a
    function that puts the real ``Tracker.stage`` back."""
    assert engine.TRACKING_WAIT_S < 3.0
    logged = Tracker.stage

    def slow(self, name, entry, manifest):
        time.sleep(3.0)
        return logged(self, name, entry, manifest)

    monkeypatch.setattr(Tracker, "stage", slow)
    return lambda: monkeypatch.setattr(Tracker, "stage", logged)


def test_a_run_that_outpaces_its_tracking_leaves_the_rest_to_a_background_logger(
    ray_local, tmp_path, monkeypatch
):
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    chain = (
        f"name: behind\nstorage: {store}\ntracking: {NAMED.format(tmp_path)}\nstages:\n"
        "  a: {{uses: test.sleep, with: {{value: {0}}}}}\n"
        "  b: {{uses: test.sleep, needs: [a], with: {{value: 2}}}}\n"
        "  c: {{uses: test.sleep, needs: [b], with: {{value: 3}}}}\n"
    )
    # Tracking that keeps up within the wait: MLflow has the whole run when it returns.
    path.write_text(chain.format(0))
    kept_up = engine.Runner(spec.load(path), printer=lambda _line: None, track_later=True).run()
    assert kept_up.ok and kept_up.tracked_later is None and kept_up.tracking_error is None
    client = MlflowClient(tracking_uri=kept_up.tracking)
    finished = client.get_run(kept_up.mlflow_run_id)
    assert finished.info.status == "FINISHED"

    far_away(monkeypatch)
    path.write_text(chain.format(1))
    lines: list[str] = []
    record = engine.Runner(spec.load(path), printer=lines.append, track_later=True).run()
    assert record.ok and record.mlflow_run_id, lines
    # The run did not wait for the stages' nested runs: the last ones are left behind.
    assert record.tracked_later and set(record.tracked_later) <= {"a", "b", "c"}, lines
    assert "c" in record.tracked_later
    assert any("MLflow catches up in the background" in line for line in lines), lines

    # The background logger (its own process, MLflow as it is) logs them and ends the run.
    saved = store / "runs" / record.run_id / "run.json"
    wait_for(
        lambda: json.loads(saved.read_text())["tracked_later"] is None, 120, "MLflow catching up"
    )
    final = json.loads(saved.read_text())
    assert final["tracking_error"] is None and final["mlflow_run_id"] == record.mlflow_run_id
    parent = client.get_run(record.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.mlflow_run_id}'",
    )
    # Every stage once: none lost between the driver and the logger, none logged twice.
    assert sorted(r.data.tags["raypipe.stage"] for r in children) == ["a", "b", "c"]
    by_stage = {r.data.tags["raypipe.stage"]: r.data for r in children}
    assert by_stage["c"].params["value"] == "3.0" and "value" in by_stage["c"].metrics

    # A run that failed waits for its tracking: it may be resumed at once.
    path.write_text(
        f"name: behind\nstorage: {store}\ntracking: {NAMED.format(tmp_path)}\nstages:\n"
        "  a: {uses: test.sleep, with: {value: 7}}\n"
        "  bad: {uses: test.fail, needs: [a], with: {message: failed on purpose}}\n"
    )
    failed = engine.Runner(spec.load(path), printer=lines.append, track_later=True).run()
    assert not failed.ok and failed.tracked_later is None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{failed.mlflow_run_id}'",
    )
    assert sorted(r.data.tags["raypipe.stage"] for r in children) == ["a", "bad"]
    assert client.get_run(failed.mlflow_run_id).info.status == "FAILED"


def test_a_resumed_run_logs_what_a_dead_background_logger_left(ray_local, tmp_path, monkeypatch):
    near_again = far_away(monkeypatch)
    # The background logger dies before it logs anything.
    monkeypatch.setattr("pipelines.tracking.log_later", lambda *_args: "it died")
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: left\nstorage: {store}\ntracking: {NAMED.format(tmp_path)}\nstages:\n"
        "  a: {uses: test.sleep, with: {value: 1}}\n"
        "  b: {uses: test.sleep, needs: [a], with: {value: 2}}\n"
    )
    record = engine.Runner(spec.load(path), printer=lambda _line: None, track_later=True).run()
    assert record.ok and record.tracked_later, record.tracked_later

    near_again()
    again = engine.resume_run(str(store), record.run_id, printer=lambda _line: None)
    assert again.ok and again.tracked_later is None and again.tracking_error is None
    assert again.mlflow_run_id == record.mlflow_run_id
    client = MlflowClient(tracking_uri=record.tracking)

    def logged_stages(mlflow_id):
        parent = client.get_run(mlflow_id)
        assert parent.info.status == "FINISHED"
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{mlflow_id}'",
        )
        return sorted(r.data.tags["raypipe.stage"] for r in children)

    assert logged_stages(record.mlflow_run_id) == ["a", "b"]

    # The logger is alive this time, but has the run's lock only after `resume` has read the
    # record: the resumed driver takes what the logger saved and logs nothing twice.
    path.write_text(path.read_text().replace("value: 2", "value: 3"))
    near_again = far_away(monkeypatch)
    late = engine.Runner(spec.load(path), printer=lambda _line: None, track_later=True).run()
    assert late.ok and late.tracked_later, late.tracked_later
    near_again()
    read_before_the_logger = engine.load_record

    def read_then_the_logger_runs(store_, run_id):
        record_ = read_before_the_logger(store_, run_id)
        monkeypatch.setattr(engine, "load_record", read_before_the_logger)
        log_saved_run(store_, run_id, late.tracking, str(store / "mlflow-artifacts"))
        return record_

    monkeypatch.setattr(engine, "load_record", read_then_the_logger_runs)
    resumed = engine.resume_run(str(store), late.run_id, printer=lambda _line: None)
    assert resumed.ok and resumed.tracked_later is None and resumed.tracking_error is None
    assert logged_stages(late.mlflow_run_id) == ["a", "b"]


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
    # The background logger (its import log is in its own log) wrote raypipe's own database,
    # which the first run made, without MLflow's client: it imported no MLflow either.
    logger_log = (tmp_path / "store" / "runs" / run_id / "tracking.log").read_text()
    assert imported(logger_log), "the logger's import log is missing"
    assert not {m for m in imported(logger_log) if m.split(".")[0] == "mlflow"}

    # Checksums are still read on the cached path: a tampered artifact is recomputed.
    out = tmp_path / "store" / "artifacts" / "test.sleep" / first.stages["a"].cache_key
    (out / "out.json").write_text((out / "out.json").read_text().replace("2.0", "9.0"))
    lines: list[str] = []
    again = engine.Runner(spec.load(path), printer=lines.append, track_later=True).run()
    assert again.ok and not again.stages["a"].cache_hit, lines
    assert any("a: cached artifact is broken" in line for line in lines), lines
    assert json.loads((out / "out.json").read_text())["value"] == 2.0
    assert again.mlflow_run_id  # a stage ran: tracked by the driver itself
    # (What it had not logged by the run's end, if anything, reaches MLflow from the
    # background: that process is done before the test is.)
    again_saved = tmp_path / "store" / "runs" / again.run_id / "run.json"
    wait_for(lambda: json.loads(again_saved.read_text())["tracked_later"] is None, 120, "MLflow")
