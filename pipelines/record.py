"""The run record: what happened in one run, saved as ``runs/<run_id>/run.json``.

A record holds the run's own facts (pipeline, storage, overrides, status) and one typed
:class:`StageEntry` per stage. Entries change state only through their ``mark_*`` methods, so
every transition sets the same fields everywhere. The record is rewritten after every change
(off the driver's critical path, by :class:`RecordWriter`), so a driver that dies leaves a
record that ``raypipe resume`` can finish from.

A record read back is checked whole (:meth:`RunRecord.from_json`): a truncated, mistyped or
non-UTF-8 ``run.json`` is a :class:`RecordError` naming the file and key, never a traceback, and
``raypipe runs`` lists it as damaged beside the others. What a record keeps of an error is
bounded and redacted (:mod:`pipelines.guards`), as is every URI in it.

This module knows nothing of Ray: the CLI, the report and tracking read records through it.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipelines.guards import (
    CACHE_KEY,
    COMPONENT_NAME,
    PIPELINE_NAME,
    RUN_ID,
    STAGE_NAME,
    InputError,
    TooLarge,
    block,
    one_line,
    quote,
    redact,
)

if TYPE_CHECKING:  # the CLI imports this module; pyarrow only loads when a store is opened
    from pipelines.store import Store

RUN_FILE, PIPELINE_FILE = "run.json", "pipeline.yaml"
#: A run record read back holds at most this much (a record raypipe writes is far smaller:
#: its errors and tracebacks are bounded).
MAX_RECORD_BYTES = 32 << 20
# Timestamps and durations are finite; names are checked apart (see _check_names).
_RECORD_CONFIG = ConfigDict(allow_inf_nan=False)


class RecordError(InputError):
    """A run record that cannot be used: missing, damaged (not JSON, not UTF-8, truncated),
    or holding a key of the wrong type; the message names the file and the key."""


class Status(StrEnum):
    """The state of a run or of one of its stages (a ``str``: it compares equal to its value
    and is saved as it in ``run.json``)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class StageEntry:
    """One stage of a run, as the run record keeps it.

    Attributes:
        uses: the stage's component.
        status: where the stage stands.
        cache_key: the key its artifact is (or will be) published under.
        cache_hit: whether a cached artifact was used instead of running the stage.
        start, end, seconds: when it ran (a cached stage: the moment it was found).
        artifact: the published artifact's path or URI.
        metrics: what the stage returned (from its manifest).
        error: one line saying why it failed or was skipped.
        traceback: the full traceback of a failure.
        attempts: how many times the stage was started in this run (resumes included).
        recomputed_because: why a cached artifact was not used (it failed verification).
        needs: the stages it depends on (the pipeline's edges, for the report's graph).
        config: the component's validated config, defaults filled in (for comparing runs).
    """

    __pydantic_config__ = _RECORD_CONFIG  # how from_dict checks an entry read back

    uses: str
    status: Status = Status.PENDING
    cache_key: str | None = None
    cache_hit: bool = False
    start: float | None = None
    end: float | None = None
    seconds: float | None = None
    artifact: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    attempts: int = 0
    recomputed_because: str | None = None
    needs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def mark_pending(self) -> None:
        """Back to pending (a completed stage whose artifact no longer verifies)."""
        self.status, self.cache_hit = Status.PENDING, False

    def mark_keyed(self, key: str) -> None:
        """The stage's cache key is known; an earlier attempt's error is cleared."""
        self.cache_key, self.error, self.traceback = key, None, None

    def mark_running(self) -> None:
        """The stage's task was launched."""
        self.status, self.cache_hit = Status.RUNNING, False
        self.start, self.end = time.time(), None
        self.attempts += 1

    def mark_succeeded(self, manifest: dict[str, Any], cached: bool) -> None:
        """The stage has a published artifact: computed now, or found in the cache."""
        self.status, self.cache_hit = Status.SUCCEEDED, cached
        if cached:
            self.start = self.end = time.time()
            self.seconds = 0.0
        else:
            timings = manifest["timings"]
            self.start, self.end = timings["start"], timings["end"]
            self.seconds = round(timings["seconds"], 3)
        self.artifact = redact(manifest["path"])
        self.metrics = manifest.get("metrics", {})

    def mark_failed(self, message: str, trace: str | None) -> None:
        """The stage's task raised or died (its message and traceback kept bounded and
        redacted, whatever the error held)."""
        self.status, self.end = Status.FAILED, time.time()
        self.error, self.traceback = one_line(message), None if trace is None else block(trace)

    def mark_skipped(self, reason: str) -> None:
        """The stage will not run: a stage it needs did not succeed."""
        self.status, self.error = Status.SKIPPED, one_line(reason)

    @property
    def elapsed(self) -> float | None:
        """Seconds it took (so far, while running)."""
        if self.seconds is not None:
            return self.seconds
        if self.start is not None:
            return (self.end or time.time()) - self.start
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageEntry:
        """An entry from plain data (unknown keys ignored), checked like a whole record.

        Raises:
            RecordError: a key of the wrong type or a name that is not one.
        """
        return _validated(_adapter(StageEntry), data, "<stage>", "")


@dataclass
class RunRecord:
    """What happened in one run; saved as ``runs/<run_id>/run.json``."""

    __pydantic_config__ = _RECORD_CONFIG  # how from_json checks a record read back

    run_id: str
    pipeline: str
    source: str
    storage: str
    tracking: str | None
    overrides: list[str]
    force: list[str]
    status: Status = Status.RUNNING
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float | None = None
    resumed: int = 0
    error: str | None = None
    mlflow_run_id: str | None = None
    tracking_error: str | None = None
    #: None while MLflow has (or gets from this run's driver) all of the run. A list when the
    #: driver finished before its tracking did: a background process logs these stages and the
    #: run's end (``pipelines.tracking.log_later``), then sets it back to None.
    tracked_later: list[str] | None = None
    stages: dict[str, StageEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        # Stages stay in the pipeline's order (a dependency order), which the report shows.
        # Shallow views, not asdict's deep copy: a record is saved on every change of state,
        # and what it holds is plain JSON already.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stages"] = {name: vars(entry) for name, entry in self.stages.items()}
        return json.dumps(data, default=str)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = RUN_FILE) -> RunRecord:
        """A record from its saved JSON, checked whole: every key of its type (unknown keys
        are ignored, missing ones take their defaults), names that are names, times finite.

        Raises:
            RecordError: not UTF-8, not JSON, or a key that does not check out, naming
                ``source`` and the key.
        """
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            data = json.loads(text)
        except UnicodeDecodeError as e:
            raise RecordError(source, None, f"not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise RecordError(
                source, None, f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
        except (RecursionError, ValueError) as e:  # nested too deep; a number too long
            raise RecordError(source, None, f"not JSON ({one_line(e, 200)})") from None
        record = _validated(_adapter(RunRecord), data, source, "")
        _check_names(record, source)
        return record

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCEEDED

    def with_status(self, status: Status) -> list[str]:
        """The stages in ``status``, in record order."""
        return [name for name, entry in self.stages.items() if entry.status == status]


@functools.cache
def _adapter(kind: type) -> TypeAdapter:
    """The validator of records read back, built on first use: building it takes longer than
    the rest of this module's import, and a run that only writes its record never needs it."""
    return TypeAdapter(kind)


def _validated(adapter: TypeAdapter, data: Any, source: str, prefix: str) -> Any:
    """``data`` validated by ``adapter``; the first problem as a :class:`RecordError`."""
    try:
        return adapter.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
        got = first.get("input")
        shown = type(got).__name__ if isinstance(got, dict | list) else quote(got)
        raise RecordError(source, key or None, f"{first['msg']} (got {shown})") from None


def _check_names(record: RunRecord, source: str) -> None:
    """Names are printed and used as path parts: each matches its pattern whole."""
    checks = [("run_id", record.run_id, RUN_ID), ("pipeline", record.pipeline, PIPELINE_NAME)]
    for name, entry in record.stages.items():
        checks.append(("stages", name, STAGE_NAME))
        checks.append((f"stages.{name}.uses", entry.uses, COMPONENT_NAME))
        checks += [(f"stages.{name}.needs.{i}", n, STAGE_NAME) for i, n in enumerate(entry.needs)]
        if entry.cache_key is not None:
            checks.append((f"stages.{name}.cache_key", entry.cache_key, CACHE_KEY))
    for key, value, pattern in checks:
        if not pattern.fullmatch(value):
            raise RecordError(source, key, f"not a valid name: {quote(value)}")


def load_record(store: Store, run_id: str) -> RunRecord:
    """Reads and checks a run record.

    Raises:
        RecordError: no run with that id in the store (the message names both), or its record
            is damaged (the message names the file and the key).
    """
    # A run id is one name: never a path that leaves the root, never a line break.
    if not RUN_ID.fullmatch(run_id):
        raise RecordError(store.shown_root, None, f"no run {quote(run_id)}: not a run id")
    source = store.shown("runs", run_id, RUN_FILE)
    try:
        data = store.read_run_file(run_id, RUN_FILE, limit=MAX_RECORD_BYTES, binary=True)
    except TooLarge as e:
        raise RecordError(source, None, f"damaged: {e}") from None
    if data is None:
        raise RecordError(store.shown_root, None, f"no run {quote(run_id)} in this storage")
    record = RunRecord.from_json(data, source)
    if record.run_id != run_id:
        raise RecordError(source, "run_id", f"{quote(record.run_id)} is not this run's id")
    return record


def read_records(store: Store) -> tuple[list[RunRecord], dict[str, str]]:
    """Every run record in the store, oldest first, and why each damaged one cannot be read
    (by run id): one damaged record never hides the others.

    Raises:
        StorageError: the storage itself cannot be listed.
    """
    records, damaged = [], {}
    for run_id in store.run_ids():
        try:
            records.append(load_record(store, run_id))
        except InputError as e:  # damaged, or this one file unreadable
            damaged[run_id] = str(e)
    return records, damaged


def list_records(store: Store) -> list[RunRecord]:
    """Every readable run record in the store, oldest first (damaged ones left out)."""
    return read_records(store)[0]


def progress_file(store: Store, run_id: str, stage: str) -> Path:
    """Where a stage's live progress points go (``runs/<id>/progress/<stage>.jsonl``; local
    storage only)."""
    return Path(store.run_dir(run_id)) / "progress" / f"{stage}.jsonl"


class RecordWriter:
    """Writes snapshots on a background thread; when several queue up only the newest is
    written. ``flush`` waits for the newest to be on disk; ``close`` also ends the thread."""

    def __init__(self, write: Callable[[str], None]):
        self._write = write
        self._cv = threading.Condition()
        self._pending: str | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raypipe-record", daemon=True)
        self._thread.start()

    def put(self, text: str) -> None:
        with self._cv:
            if self._error is not None:
                raise self._error
            self._pending = text
            self._cv.notify_all()

    def flush(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._pending is None and not self._busy)
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                text, self._pending, self._busy = self._pending, None, True
            try:
                self._write(text)
            except BaseException as e:  # noqa: BLE001 - handed to the driver thread
                self._error = e
            with self._cv:
                self._busy = False
                self._cv.notify_all()
