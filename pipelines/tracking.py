"""MLflow tracking of pipeline runs: one parent MLflow run per pipeline run, one nested run per
stage with its config as params, its metrics (final, and per step from ``history.jsonl``),
and its plots and small JSON files as artifacts.

The driver logs each stage as it finishes, so components know nothing of MLflow. Tracking is a
record of the run, not part of it: if the tracking store fails, the run goes on and the error
is kept in the run record. A tracking server is asked once, with a short timeout, before the run
uses it, and MLflow's own requests are bounded (timeout and retries), so a server that does not
answer costs seconds, not the minutes of MLflow's defaults. What is logged (params, tags) is
redacted: a URI in a config never shows its credentials in MLflow.

A run in which no stage ran (every one cached) does not wait for MLflow, whose imports alone
take seconds: the CLI hands it to ``python -m pipelines.tracking`` (:func:`log_later`), a
detached process that logs it from its saved record a few seconds later and writes its MLflow
id into ``run.json``. So does a run that succeeded before its driver's tracking caught up:
the stages not yet logged (``tracked_later`` in its record) and its end.

raypipe's own database (the default: SQLite under a local storage root) is write-ahead logged
and commits without an fsync each (:func:`commit_without_fsync`). Once MLflow has made it (and
the pipeline's experiment), it is written directly, one transaction a stage and no MLflow import
(:mod:`pipelines.mlflow_sqlite`; :func:`open_tracker` chooses): through MLflow's client a stage
cost 10-15 ms of the driver's CPU, which the run waited for.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.guards import one_line, redact_uri
from pipelines.mlflow_runs import STAGE_RUN_TAGS, parent_data, stage_data
from pipelines.mlflow_sqlite import SqliteTracker, write_ahead
from pipelines.record import RUN_FILE, StageEntry, Status, load_record

if TYPE_CHECKING:
    from pipelines.store import Store

#: Seconds a tracking server has to answer the first request before tracking is turned off.
CONNECT_TIMEOUT_S = 5.0
#: The environment variable that hands :func:`log_later`'s process its job (JSON: the storage
#: and the tracking URI may hold credentials, which a command line would show to every user).
LATER_JOB = "RAYPIPE_TRACK_LATER"
#: MLflow's HTTP requests in this process (unless set in the environment): seconds per
#: request and retries, instead of 120 s and 7 retries with backoff (minutes per call).
MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}


#: raypipe's own SQLite databases (real paths) whose connections in this process are set up by
#: :func:`_on_connect`.
_OWN_DATABASES: set[str] = set()


def default_tracking_uri(store: Store) -> str | None:
    """raypipe's own database: MLflow on SQLite under the storage root (local storage only)."""
    return f"sqlite:///{store.root}/mlflow.db" if store.is_local else None


def commit_without_fsync(uri: str) -> None:
    """Makes every connection this process opens to the SQLite database at ``uri`` (from now
    on) write-ahead logged with ``synchronous=NORMAL``: a commit appends to the log and returns;
    the disk is synced when the log is folded into the database. A crash of the process loses
    nothing committed; a power cut can lose the last commits. For raypipe's own database only
    (:func:`default_tracking_uri`): a database a user names keeps the modes its owner chose, and
    write-ahead logging needs every client on one host, which a shared file system may not be.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    path = uri.removeprefix("sqlite:///")
    if not _OWN_DATABASES:
        event.listen(Engine, "connect", _on_connect)  # every pool, MLflow's included
    _OWN_DATABASES.add(os.path.realpath(path))


def _on_connect(connection: Any, _record: Any) -> None:
    if not isinstance(connection, sqlite3.Connection):
        return
    cursor = connection.cursor()
    try:
        files = {row[1]: row[2] for row in cursor.execute("PRAGMA database_list")}
    finally:
        cursor.close()
    if files.get("main") and os.path.realpath(files["main"]) in _OWN_DATABASES:
        write_ahead(connection)


def open_direct(uri: str, experiment: str, own_database: bool) -> SqliteTracker | None:
    """raypipe's own database written directly (:mod:`pipelines.mlflow_sqlite`: no MLflow
    import, under a millisecond a stage), once MLflow has made it and the experiment; else
    None."""
    if own_database and uri.startswith("sqlite:///"):
        return SqliteTracker.open(uri.removeprefix("sqlite:///"), experiment)
    return None


def open_tracker(
    uri: str, experiment: str, artifact_root: str | None, own_database: bool = False
) -> Tracker | SqliteTracker:
    """The tracker of a run logged to ``uri``: :func:`open_direct`'s where it can be, else
    MLflow's client."""
    direct = open_direct(uri, experiment, own_database)
    return direct or Tracker(uri, experiment, artifact_root, own_database=own_database)


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer in time."""


def check_answers(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Asks an MLflow server (``http``/``https`` URIs; others are local or a database) for
    ``/health``: any HTTP answer will do, silence for ``timeout`` seconds will not.

    Raises:
        TrackingUnavailable: no answer (refused, unreachable, or silent), named redacted.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    # Without userinfo (urllib does not take it) and without its query: any answer counts.
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError:
        return  # it answered (401, 404...): MLflow's own calls say what is wrong
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingUnavailable(
            f"the tracking server {redact_uri(uri)} did not answer within {timeout:g} s "
            f"({one_line(reason, 200)})"
        ) from None


class Tracker:
    """Logs one pipeline run to MLflow.

    Args:
        uri: the MLflow tracking URI (``sqlite:///...``, ``http://...``).
        experiment: the experiment name (the pipeline's name).
        artifact_root: where a new experiment keeps artifacts (None: the server's default).
        own_database: ``uri`` is raypipe's own database (:func:`commit_without_fsync`).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: str | None = None,
        own_database: bool = False,
    ):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name, value in MLFLOW_HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        check_answers(uri)
        if own_database and uri.startswith("sqlite:///"):
            commit_without_fsync(uri)
        from mlflow import MlflowClient

        for name in ("alembic", "mlflow"):  # schema migrations and notices are not our output
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment, artifact_root)
        self.parent_id: str | None = None

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException:  # created meanwhile by a concurrent run of the same pipeline
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, run_id: str, pipeline: str, overrides: list[str], parent_id: str | None):
        """Starts (or, on resume, reopens) the parent run; returns its MLflow id."""
        from mlflow.entities import Param, RunTag

        if parent_id is not None:
            self.parent_id = parent_id
            self.client.update_run(parent_id, status="RUNNING")
            return parent_id
        name, tags, params = parent_data(run_id, pipeline, overrides)
        *made, (kind, value) = tags
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(made))
        self.parent_id = run.info.run_id
        self.client.log_batch(
            self.parent_id,
            params=[Param(k, v) for k, v in params],
            tags=[RunTag(kind, value)],
        )
        return self.parent_id

    def stage(self, name: str, entry: StageEntry, manifest: dict[str, Any] | None) -> str:
        """Logs one finished stage as a nested run; returns its MLflow id."""
        from mlflow.entities import Metric, Param, RunTag

        data = stage_data(name, entry, manifest, self.parent_id)
        made = dict(data.tags[:STAGE_RUN_TAGS])
        run = self.client.create_run(self.experiment_id, run_name=name, tags=made)
        child = run.info.run_id
        params = [Param(k, v) for k, v in data.params]
        metrics = [Metric(*point) for point in data.metrics]
        tags = [RunTag(k, v) for k, v in data.tags[STAGE_RUN_TAGS:]]
        # One log_batch a chunk: at most 100 params, 1000 metrics and 100 tags a call (each
        # call is a SQLite transaction, the most of what logging a stage costs).
        chunks = [_chunks(params, 100), _chunks(metrics, 1000), _chunks(tags, 100)]
        for i in range(max(len(c) for c in chunks)):
            p, m, t = (c[i] if i < len(c) else [] for c in chunks)
            self.client.log_batch(child, params=p, metrics=m, tags=t)
        if data.files:
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            # Opened from the run just made: the client would ask the database for the run.
            repo = get_artifact_repository(run.info.artifact_uri, self.client.tracking_uri)
            for path, rel in data.files:
                repo.log_artifact(str(path), rel)
        self.client.set_terminated(child, status=data.status)
        return child

    def finish(self, status: str) -> None:
        if self.parent_id is not None:
            state = "FINISHED" if status == Status.SUCCEEDED else "FAILED"
            self.client.set_terminated(self.parent_id, status=state)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def log_later(store: Store, run_id: str, uri: str, artifact_root: str | None) -> str:
    """Starts a detached process that logs a finished run to MLflow (:func:`log_saved_run`),
    so the command that ran it returns without waiting for MLflow.

    Returns:
        Where the process writes its output, in words.

    Raises:
        OSError: the process could not be started.
    """
    job = {"storage": store.root, "run_id": run_id, "uri": uri, "artifact_root": artifact_root}
    # The process imports this package as this one did (a checkout run with `python -m`).
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, LATER_JOB: json.dumps(job), "PYTHONPATH": path}
    log = Path(store.run_dir(run_id)) / "tracking.log" if store.is_local else None
    with open(log or os.devnull, "ab") as out:
        subprocess.Popen(  # noqa: S603 - this interpreter, this module
            [sys.executable, "-m", "pipelines.tracking"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives the command, and a Ctrl-C in its terminal
            close_fds=True,
        )
    return f"its log: {store.shown('runs', run_id, 'tracking.log')}" if log else "no log kept"


def saved_manifest(store: Store, entry: StageEntry) -> dict[str, Any] | None:
    """The manifest a settled stage is logged with, read back from the store: a stage that
    succeeded has its artifact's; one that failed or was skipped has none."""
    if entry.status == Status.SUCCEEDED and entry.cache_key:
        return store.read_manifest(entry.uses, entry.cache_key)
    return None


def log_saved_run(store: Store, run_id: str, uri: str, artifact_root: str | None) -> None:
    """Logs a finished run, read back from its record, to MLflow as its driver would have: a
    run in which no stage ran as a parent MLflow run with one nested run per stage; a run
    whose driver's tracking fell behind, the stages it left (``tracked_later``) under its
    parent, which is then ended. Then saves what it did (the parent's MLflow id, or why
    tracking failed) in the record. It holds the run's driver lock meanwhile; a run that is
    driven again (resumed) by then is left to that driver, which tracks it itself."""
    from pipelines.store import RunLocked, driver_lock

    try:
        with driver_lock(store, run_id):
            record = load_record(store, run_id)
            behind = record.tracked_later
            if record.mlflow_run_id is not None and behind is None:
                return  # logged already (handed over twice, or resumed and tracked since)
            try:
                own = uri == default_tracking_uri(store)
                tracker = open_tracker(uri, record.pipeline, artifact_root, own_database=own)
                record.mlflow_run_id = tracker.start(
                    run_id, record.pipeline, record.overrides, record.mlflow_run_id
                )
                for name in list(record.stages) if behind is None else behind:
                    entry = record.stages[name]
                    tracker.stage(name, entry, saved_manifest(store, entry))
                tracker.finish(record.status)
            except Exception as e:  # noqa: BLE001 - kept in the record, as a driver would
                record.tracking_error = one_line(f"{type(e).__name__}: {e}")
            record.tracked_later = None
            store.write_run_file(run_id, RUN_FILE, record.to_json())
    except RunLocked:
        return


def main() -> None:
    """``python -m pipelines.tracking``: the process :func:`log_later` starts."""
    from pipelines.store import Store

    job = json.loads(os.environ.pop(LATER_JOB))
    store = Store(job["storage"])
    log_saved_run(store, job["run_id"], job["uri"], job["artifact_root"])


if __name__ == "__main__":
    main()
