"""raypipe's own MLflow database, written without MLflow's client.

Logging a stage through ``MlflowClient`` is three calls, 44 statements through SQLAlchemy's ORM:
10-15 ms of the driver's CPU a stage, which the run waits for; and a process that tracks pays
a second to import MLflow. :class:`SqliteTracker` writes the same rows with ``sqlite3``, one
transaction a stage (under a millisecond, the nested run's file copies included), and imports
nothing of MLflow.

It writes only where it knows the schema: raypipe's own database (:func:`default_tracking_uri
<pipelines.tracking.default_tracking_uri>`), made and migrated by MLflow, at the schema
revision it was written against (:data:`SCHEMA_REVISION`, the head of MLflow 3.17, the newest
that pyproject allows), into an experiment MLflow made whose artifacts live on a local path.
Anything else (a database not made yet, another MLflow's schema, a new experiment, artifacts
on a server) goes through MLflow's client (:class:`pipelines.tracking.Tracker`), as before. The
tests log the same stages both ways and compare what MLflow's client reads back.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import shutil
import sqlite3
import time
import uuid
from typing import Any

from pipelines.mlflow_runs import parent_data, stage_data
from pipelines.record import StageEntry, Status

#: The Alembic revision of MLflow's schema (MLflow 3.17's head) these writes were checked
#: against, column for column. A database at any other revision is left to MLflow's client.
SCHEMA_REVISION = "dc11669786a5"
#: MLflow's limits: a key's characters and length, a tag's value (a param's is cut by
#: ``mlflow_runs._shown`` to MLflow's 6000 already).
_KEY = re.compile(r"^[/\w.\- :]*$")
MAX_KEY_CHARS = 250
MAX_TAG_CHARS = 8000
#: How MLflow keeps an infinite metric (SQL has no infinity).
_FLOAT_MAX = 1.7976931348623157e308


def _ms() -> int:
    return int(time.time() * 1000)


def _checked_key(key: str, what: str) -> str:
    """A param, metric or tag name as MLflow's client would accept it.

    Raises:
        ValueError: naming the key, as MLflow's client would have refused it.
    """
    norm = posixpath.normpath(key)
    if (
        not _KEY.match(key)
        or norm != key
        or norm == "."
        or norm.startswith(("..", "/"))
        or len(key) > MAX_KEY_CHARS
    ):
        raise ValueError(
            f"invalid {what} name {key[:MAX_KEY_CHARS]!r}: MLflow takes at most "
            f"{MAX_KEY_CHARS} alphanumerics, underscores, dashes, periods, spaces, colons and "
            "slashes, not a path that resolves to another name"
        )
    return key


def _metric_row(value: float) -> tuple[float, int]:
    """A metric's value and ``is_nan`` as MLflow stores them: NaN as 0, infinities as the
    largest float."""
    if math.isnan(value):
        return 0.0, 1
    if math.isinf(value):
        return math.copysign(_FLOAT_MAX, value), 0
    return value, 0


def write_ahead(connection: sqlite3.Connection) -> None:
    """Sets up one connection to raypipe's own database: write-ahead logged, no fsync a commit
    (see :func:`pipelines.tracking.commit_without_fsync`)."""
    try:
        connection.execute("PRAGMA journal_mode=WAL")  # kept in the file: once is enough
        connection.execute("PRAGMA synchronous=NORMAL")  # per connection
    except sqlite3.OperationalError:
        pass  # busy: this connection commits as SQLite's defaults do, which is only slower


class SqliteTracker:
    """Logs one pipeline run into raypipe's own MLflow database, as
    :class:`pipelines.tracking.Tracker` does through MLflow's client (same methods, same
    rows). Made by :meth:`open`, which says None where it must not write."""

    def __init__(self, db: sqlite3.Connection, experiment_id: int, artifact_location: str):
        self.db = db
        self.experiment_id = experiment_id
        self.artifact_location = artifact_location
        self.parent_id: str | None = None

    @classmethod
    def open(cls, path: str, experiment: str) -> SqliteTracker | None:
        """The writer for ``experiment`` in the database at ``path``, or None: no such file,
        another schema revision, no such (active, unique) experiment, or its artifacts not on
        a local path."""
        if not os.path.isfile(path):
            return None
        db = None
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            revision = db.execute("SELECT version_num FROM alembic_version").fetchall()
            found = db.execute(
                "SELECT experiment_id, artifact_location, lifecycle_stage FROM experiments "
                "WHERE name = ?",
                (experiment,),
            ).fetchall()
        except sqlite3.Error:  # not a database, unreadable, another schema: MLflow's to say
            if db is not None:
                db.close()
            return None
        usable = (
            revision == [(SCHEMA_REVISION,)]
            and len(found) == 1
            and found[0][2] == "active"
            and os.path.isabs(found[0][1] or "")
        )
        if not usable:
            db.close()
            return None
        write_ahead(db)
        return cls(db, found[0][0], found[0][1])

    def start(self, run_id: str, pipeline: str, overrides: list[str], parent_id: str | None):
        """Starts (or, on resume, reopens) the parent run; returns its MLflow id."""
        if parent_id is not None:
            self._update_active(parent_id, "status = 'RUNNING'", ())
            self.parent_id = parent_id
            return parent_id
        name, tags, params = parent_data(run_id, pipeline, overrides)
        self.parent_id = self._insert_run(name, tags, params, [], "RUNNING", (_ms(), None))
        return self.parent_id

    def stage(self, name: str, entry: StageEntry, manifest: dict[str, Any] | None) -> str:
        """Logs one finished stage as a nested run, its files copied first (a reader never
        sees the run without them); returns its MLflow id."""
        start = _ms()
        data = stage_data(name, entry, manifest, self.parent_id)
        run_uuid = uuid.uuid4().hex
        if data.files:
            root = self._artifact_uri(run_uuid)
            for folder in {rel or "" for _, rel in data.files}:
                os.makedirs(os.path.join(root, folder), exist_ok=True)
            for path, rel in data.files:
                shutil.copyfile(path, os.path.join(root, rel or "", path.name))
        times = (start, _ms())
        return self._insert_run(
            name, data.tags, data.params, data.metrics, data.status, times, run_uuid
        )

    def finish(self, status: str) -> None:
        if self.parent_id is not None:
            state = "FINISHED" if status == Status.SUCCEEDED else "FAILED"
            self._update_active(self.parent_id, "status = ?, end_time = ?", (state, _ms()))

    def _update_active(self, run_uuid: str, assignments: str, values: tuple[Any, ...]) -> None:
        """Updates a run that is there and active, as MLflow's client does; else raises.

        Raises:
            ValueError: no such run, or it was deleted (in MLflow's UI, say) since.
        """
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            changed = self.db.execute(
                f"UPDATE runs SET {assignments} WHERE run_uuid = ? AND lifecycle_stage = 'active'",
                (*values, run_uuid),
            ).rowcount
        if changed != 1:
            raise ValueError(f"the MLflow run {run_uuid} is not there, or not active (deleted?)")

    def _artifact_uri(self, run_uuid: str) -> str:
        return posixpath.join(self.artifact_location, run_uuid, "artifacts")

    def _insert_run(
        self,
        name: str,
        tags: list[tuple[str, str]],
        params: list[tuple[str, str]],
        metrics: list[tuple[str, float, int, int]],
        status: str,
        times: tuple[int, int | None],
        run_uuid: str | None = None,
    ) -> str:
        """One run (``times``: its start and end, ms) and all it holds, in one transaction;
        returns its id."""
        run_uuid = run_uuid or uuid.uuid4().hex
        tags = [(_checked_key(k, "tag"), v[:MAX_TAG_CHARS]) for k, v in tags]
        tags.append(("mlflow.runName", name))  # as MLflow's create_run adds it
        params = [(_checked_key(k, "param"), v) for k, v in params]
        rows, latest = [], {}
        for key, value, stamp, step in metrics:
            _checked_key(key, "metric")
            if stamp < 0:
                raise ValueError(f"metric {key!r}: timestamp {stamp} is negative")
            stored, is_nan = _metric_row(value)
            rows.append((key, stored, stamp, run_uuid, step, is_nan))
            # MLflow's latest value of a key: the highest (step, timestamp, value).
            if key not in latest or (step, stamp, stored) > latest[key][:3]:
                latest[key] = (step, stamp, stored, is_nan)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
                "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
                "artifact_uri, experiment_id, deleted_time) "
                "VALUES (?, ?, 'UNKNOWN', '', '', 'unknown', ?, ?, ?, '', 'active', ?, ?, NULL)",
                (
                    run_uuid,
                    name,
                    status,
                    *times,
                    self._artifact_uri(run_uuid),
                    self.experiment_id,
                ),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                [(k, v, run_uuid) for k, v in tags],
            )
            self.db.executemany(
                "INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                [(k, v, run_uuid) for k, v in params],
            )
            self.db.executemany(  # an identical point twice is one (MLflow's dedup)
                "INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.db.executemany(
                "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(k, v, t, s, n, run_uuid) for k, (s, t, v, n) in latest.items()],
            )
        return run_uuid
