"""raypipe's own MLflow database written directly (pipelines.mlflow_sqlite): what it writes
reads back through MLflow's client exactly as what MLflow's client writes, and it writes only
where it knows the schema; everything else goes through MLflow's client."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.db.utils import _get_latest_schema_revision
from mlflow.utils.validation import _validate_metric_name

from pipelines.mlflow_sqlite import SCHEMA_REVISION, SqliteTracker, _checked_key
from pipelines.record import StageEntry, Status
from pipelines.tracking import Tracker, open_tracker


@pytest.fixture
def own_db(tmp_path):
    """raypipe's own database as a first run leaves it: made by MLflow, with the experiment."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "exp", str(tmp_path / "mlflow-artifacts"), own_database=True)
    return uri


def stages(tmp_path):
    """A stage that succeeded (params, metrics with NaN and infinities, a history with a
    repeated point, files in a subfolder), one that failed, and one found cached."""
    art = tmp_path / "artifact"
    (art / "plots").mkdir(parents=True, exist_ok=True)
    (art / "out.json").write_text('{"value": 1}')
    (art / "plots" / "loss.png").write_bytes(b"\x89PNG not really")
    (art / "weights.pt").write_bytes(b"not logged: not a plot or JSON")
    points = [
        {"step": 0, "time": 1.5, "train/loss": 2.0, "lr": 0.1},
        {"step": 1, "time": 2.5, "train/loss": float("nan")},
        {"step": 1, "time": 2.5, "train/loss": 0.5},
        {"step": 1, "time": 2.5, "train/loss": 0.5},  # the same point again: kept once
        {"step": 2, "time": 3.5, "train/loss": float("-inf")},
    ]
    (art / "history.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    manifest = {
        "config": {"value": 3, "layers": [8, 4], "optim": {"name": "adam"}},
        "resources": {"workers": 2},
        "path": str(art),
        "cache_key": "k1",
        "version": "1",
    }
    done = StageEntry(
        uses="test.sleep",
        status=Status.SUCCEEDED,
        cache_key="k1",
        artifact=str(art),
        metrics={"acc": 0.5, "big": float("inf"), "ok": True, "note": "text"},
    )
    failed = StageEntry(uses="test.fail", status=Status.FAILED, error="boom " + "x" * 6000)
    cached = StageEntry(
        uses="test.sleep", status=Status.SUCCEEDED, cache_key="k1", cache_hit=True,
        artifact=str(art), metrics={"acc": 0.5},
    )  # fmt: skip
    # As published: the files listed with their sizes (what is logged is read from here, not
    # from a walk of the disk), one name that would leave the artifact never followed.
    listed = {
        rel: {"bytes": (art / rel).stat().st_size, "sha256": "-"}
        for rel in ("out.json", "plots/loss.png", "weights.pt", "history.jsonl")
    }
    (tmp_path / "outside.json").write_text("{}")
    published = {**manifest, "files": {**listed, "../outside.json": {"bytes": 2}}}
    return [
        ("train", done, published),
        ("bad", failed, None),
        ("again", cached, published),
        ("older", done, manifest),  # a manifest without its file list: the folder's files
    ]


def read_back(client: MlflowClient, run_id: str, parent_id: str | None) -> dict:
    """All MLflow's client says of a run, ids and times left out (NaN as a string)."""

    def same(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    def files(path=None):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += files(f.path) if f.is_dir else [(f.path, f.file_size)]
        return out

    run = client.get_run(run_id)
    history = {
        key: [(m.step, same(m.value)) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    stamps = {
        key: [m.timestamp for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    tags = {k: "PARENT" if v == parent_id else v for k, v in run.data.tags.items()}
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "user": run.info.user_id,
        "lifecycle": run.info.lifecycle_stage,
        "ended": run.info.end_time is not None and run.info.end_time >= run.info.start_time,
        "artifact_uri": run.info.artifact_uri.replace(run_id, "ID"),
        "params": run.data.params,
        "metrics": {k: same(v) for k, v in run.data.metrics.items()},
        "history": history,
        "history_times": {k: v for k, v in stamps.items() if k in ("train/loss", "lr")},
        "tags": tags,
        "files": files(),
    }


def log(tracker, tmp_path) -> tuple[str, list[str]]:
    parent = tracker.start("r1", "exp", ["stages.a.with.value=3"], None)
    children = [tracker.stage(name, *rest) for name, *rest in stages(tmp_path)]
    tracker.finish(Status.FAILED)
    return parent, children


def test_direct_writes_read_back_as_mlflow_clients_own(own_db, tmp_path):
    client_side = Tracker(own_db, "exp", None, own_database=True)
    direct = open_tracker(own_db, "exp", None, own_database=True)
    assert isinstance(direct, SqliteTracker)
    by = {"client": log(client_side, tmp_path), "direct": log(direct, tmp_path)}

    client = MlflowClient(tracking_uri=own_db)
    views = {
        side: [read_back(client, parent, None)] + [read_back(client, c, parent) for c in children]
        for side, (parent, children) in by.items()
    }
    assert views["direct"] == views["client"]
    train = views["direct"][1]
    assert sorted(train["history"]["train/loss"], key=str) == sorted(
        [(0, 2.0), (1, "nan"), (1, 0.5), (2, -1.7976931348623157e308)], key=str
    )
    assert train["metrics"]["train/loss"] == -1.7976931348623157e308  # the highest step's
    assert train["files"] == [("out.json", 12), ("plots/loss.png", 15)]
    assert views["direct"][3]["files"] == []  # cached: logged by the run that computed it
    assert views["direct"][4]["files"] == train["files"]
    assert views["direct"][4]["history"] == train["history"]

    # MLflow's own search finds the nested runs under their parent, in one experiment.
    experiment = client.get_experiment_by_name("exp").experiment_id
    for parent, children in by.values():
        found = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
        assert sorted(r.info.run_id for r in found) == sorted(children)

    # A resumed run's parent is reopened, then ended again.
    parent = by["direct"][0]
    reopened = open_tracker(own_db, "exp", None, own_database=True)
    assert reopened.start("r1", "exp", [], parent) == parent
    assert client.get_run(parent).info.status == "RUNNING"
    reopened.finish(Status.SUCCEEDED)
    assert client.get_run(parent).info.status == "FINISHED"
    # One deleted meanwhile (in MLflow's UI) is not reopened, as MLflow's client would not.
    client.delete_run(parent)
    with pytest.raises(ValueError, match=f"MLflow run {parent} is not there, or not active"):
        reopened.start("r1", "exp", [], parent)
    assert client.get_run(parent).info.status == "FINISHED"


def test_it_writes_only_where_it_knows_the_schema(own_db, tmp_path):
    path = own_db.removeprefix("sqlite:///")
    assert SqliteTracker.open(path, "exp") is not None
    assert SqliteTracker.open(str(tmp_path / "none.db"), "exp") is None  # MLflow makes it
    assert SqliteTracker.open(path, "new pipeline") is None  # MLflow makes the experiment
    # A database a user names is MLflow's to write, whatever its schema.
    assert isinstance(open_tracker(own_db, "exp", None, own_database=False), Tracker)

    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE alembic_version SET version_num = 'from_another_mlflow'")
    assert SqliteTracker.open(path, "exp") is None
    with db:
        db.execute("UPDATE alembic_version SET version_num = ?", (SCHEMA_REVISION,))
        db.execute("UPDATE experiments SET artifact_location = 's3://bucket/exp'")
    assert SqliteTracker.open(path, "exp") is None  # artifacts on a server: MLflow's client
    with db:
        db.execute("UPDATE experiments SET artifact_location = ?", (str(tmp_path / "a"),))
        db.execute("UPDATE experiments SET lifecycle_stage = 'deleted' WHERE name = 'exp'")
    assert SqliteTracker.open(path, "exp") is None
    db.close()
    (tmp_path / "garbage.db").write_bytes(b"not a database at all" * 100)
    assert SqliteTracker.open(str(tmp_path / "garbage.db"), "exp") is None


def test_the_schema_it_writes_is_the_installed_mlflows():
    """When MLflow is upgraded, this fails until the writer is checked against the new schema
    (and SCHEMA_REVISION moved); until then a database MLflow migrated is left to MLflow."""
    assert _get_latest_schema_revision() == SCHEMA_REVISION


@pytest.mark.parametrize(
    "key",
    ["loss", "train/loss", "val acc: top-1", "a.b_c-d", "", "../up", "/abs", "a//b", "./a",
     "bad|char", "naïve", "x" * 250, "x" * 251, "tab\tkey", "a/"],
)  # fmt: skip
def test_it_refuses_the_names_mlflows_client_refuses(key):
    try:
        _validate_metric_name(key)
        mlflow_takes = len(key) <= 250  # the length is checked by the store, not here
    except MlflowException:
        mlflow_takes = False
    try:
        _checked_key(key, "metric")
        takes = True
    except ValueError as e:
        assert repr(key[:250]) in str(e)
        takes = False
    assert takes == mlflow_takes


def test_a_refused_name_writes_nothing(own_db, tmp_path):
    tracker = open_tracker(own_db, "exp", None, own_database=True)
    parent = tracker.start("r2", "exp", [], None)
    bad = StageEntry(uses="test.sleep", status=Status.SUCCEEDED, metrics={"a|b": 1.0})
    with pytest.raises(ValueError, match=r"invalid metric name 'a\|b'"):
        tracker.stage("s", bad, None)
    client = MlflowClient(tracking_uri=own_db)
    experiment = client.get_experiment_by_name("exp").experiment_id
    assert client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'") == []
