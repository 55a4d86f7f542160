"""Runs a pipeline's stage DAG on Ray: order, parallel stages, cache, run records, resume.

The driver (this module, in the ``raypipe`` process) decides what runs; every stage that has to
compute runs as one Ray task (``execute_stage``), so independent stages run at the same time and
a stage's own work (Ray Data, Train, Tune, RLlib) is scheduled by Ray inside it. Stages hand
each other artifacts by path and manifest.

Cache key = sha256(component + component version + canonical config [+ resources] + the
digests of the input artifacts). A stage whose key has a published, verified artifact is not
run. The run record (``runs/<run_id>/run.json``) is rewritten after every change of state, so a
driver that dies leaves a record ``raypipe resume`` can finish from.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import secrets
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from components import registry
from components.api import Component
from pipelines import spec as spec_mod
from pipelines.guards import (
    REDACTED,
    TooLarge,
    block,
    one_line,
    redact,
    redact_data,
    remember_secrets,
)
from pipelines.record import (
    PIPELINE_FILE,
    RUN_FILE,
    RecordError,
    RecordWriter,
    RunRecord,
    StageEntry,
    Status,
    load_record,
    progress_file,
)
from pipelines.spec import Pipeline, Stage
from pipelines.stage_task import StageJob, remote_stage_task
from pipelines.store import ArtifactInvalid, RunLocked, Store, digest_of, driver_lock
from pipelines.tracking import default_tracking_uri, saved_manifest

if TYPE_CHECKING:
    from pipelines.mlflow_sqlite import SqliteTracker

__all__ = ["PIPELINE_FILE", "RUN_FILE", "RunLocked", "RunRecord", "Runner", "load_record"]


class StaleArtifact(ArtifactInvalid):
    """A cached artifact whose files check out but whose product outside the store is gone."""


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _entry(stage: Stage) -> StageEntry:
    """A new run's record of ``stage``: its component, edges and config as validated (URIs
    in it redacted: the record is shown and compared; the run itself uses the config)."""
    config = redact_data(stage.config.model_dump(mode="json"))
    return StageEntry(uses=stage.uses, needs=list(stage.needs), config=config)


#: Seconds a run that succeeded waits, at its end, for its tracking to catch up before the rest
#: is left to a background logger (see Runner._hand_over_tracking; the CLI's runs only).
TRACKING_WAIT_S = 2.0

#: libyaml's emitter where PyYAML was built with it: the same text, a fifth of the time.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _artifact_root(store: Store) -> str | None:
    """Where a new MLflow experiment keeps its files: beside the runs on local storage, else
    the tracking server's default."""
    return f"{store.root}/mlflow-artifacts" if store.is_local else None


def cache_key(
    component: str,
    version: str,
    config: dict[str, Any],
    resources: dict[str, Any] | None,
    input_digests: dict[str, str],
    sources: list[Any] | None = None,
) -> str:
    """The cache key of a stage: what it runs, with what, on which inputs and source files."""
    return digest_of(
        {
            "component": component,
            "version": version,
            "config": config,
            "resources": resources,
            "inputs": input_digests,
            **({"sources": sources} if sources else {}),
        }
    )[:32]


def source_fingerprint(paths: list[str]) -> list[Any]:
    """(path, size, mtime_ns) of every file under the given files or folders, sorted.

    Cheap enough to take on every run (no file is read), like ``make``'s timestamps.
    """
    found: list[Any] = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            found.append([raw, "missing"])  # the stage itself reports the missing path
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat()
            found.append([str(path), stat.st_size, stat.st_mtime_ns])
    return found


# --- the driver ---------------------------------------------------------------------------

Printer = Callable[[str], None]


def _default_printer(line: str) -> None:
    print(line, flush=True)


def ensure_ray(address: str | None, log_to_driver: bool = True) -> bool:
    """Connects to Ray, starting an embedded local instance when no address is given.

    Args:
        address: a cluster address, or None for an embedded local Ray.
        log_to_driver: forward the workers' output here (otherwise it stays in Ray's log
            directory; stage errors still arrive with their tracebacks).

    Returns:
        True when this call started Ray (so the caller shuts it down at the end).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"logging_level": "WARNING", "log_to_driver": log_to_driver}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Token authentication stays on for an embedded Ray, as Ray 2.60 decides when
        # RAY_AUTH_MODE is unset (it listens beyond loopback, and anyone who reaches it could
        # run code); Ray's warning about it gives way to one line of ours (auth_summary).
        quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            ray.init(address="local", include_dashboard=False, **kwargs)
        finally:
            quiet.setLevel(level)
    return True


def auth_summary() -> str:
    """One line on how this process's Ray authenticates (never the token itself)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return "Ray token authentication: off (RAY_AUTH_MODE=disabled)"
    where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "RAY_AUTH_TOKEN"
    return f"Ray token authentication: on (token in {where}; RAY_AUTH_MODE=disabled turns it off)"


class InlineCalls:
    """Tracking's queue when a call costs next to nothing (raypipe's own database, written
    directly): calls are queued as on the tracking thread, in order, and made on the driver's
    own thread by :meth:`run_pending`, which the loop calls once it has launched what it can
    (the stages' tasks run meanwhile), so a stage that finished is in MLflow before the loop
    waits again. A thread would take the interpreter's lock from the loop, up to its switch
    interval, just when the next stage should be launched. The executor's interface
    (``submit``, ``shutdown``) with the same meaning."""

    def __init__(self) -> None:
        self._pending: list[tuple[Future, Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._pending.append((future, fn, args))
        return future

    def run_pending(self) -> None:
        while self._pending:
            future, fn, args = self._pending.pop(0)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - kept in the future, as a thread's
                future.set_exception(e)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for future, _, _ in self._pending:
                future.cancel()
            self._pending.clear()
        if wait:
            self.run_pending()


class Runner:
    """Runs (or resumes) one pipeline run.

    Args:
        pipeline: a validated pipeline.
        force: stages to recompute even if cached; their descendants are recomputed too.
        address: a Ray cluster to connect to; None starts an embedded Ray when needed.
        record: an existing record to continue (``raypipe resume``).
        printer: where progress lines go.
        display: called with (stage, its record entry, message) on every stage event, in
            place of a printed line (a live table in a terminal).
        ray_logs: forward Ray workers' output to this process.
        track_later: the CLI's choice: MLflow is not waited for. When no stage has to run
            (every one cached or kept), the run is logged to MLflow by a background process
            once this one is done, instead of starting MLflow here (seconds of imports, for a
            run that took a fraction of one). When a run that succeeded ends before its
            tracking has caught up, it waits ``TRACKING_WAIT_S`` at most before what is left is
            handed to that process too (see ``_hand_over_tracking``). Otherwise the run
            waits for MLflow at its end.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        force: Iterable[str] = (),
        address: str | None = None,
        record: RunRecord | None = None,
        printer: Printer = _default_printer,
        display: Callable[[str, dict[str, Any], str], None] | None = None,
        ray_logs: bool = True,
        track_later: bool = False,
    ):
        self.pipeline = pipeline
        self.track_later = track_later
        self.display = display
        self.ray_logs = ray_logs
        self.store = Store(pipeline.storage)
        self.address = address
        self.print = printer
        force = list(force)
        for name in force:
            if name not in pipeline.stages:
                raise spec_mod.PipelineError(
                    pipeline.source, f"--force {name}", f"no stage named {name!r}"
                )
        tracking = pipeline.spec.tracking or default_tracking_uri(self.store)
        remember_secrets(tracking)
        #: The tracking URI as given (the record keeps it redacted). A resumed run reads it
        #: from its saved pipeline, where credentials were never written: it runs untracked.
        self.tracking_uri = tracking if tracking is None or REDACTED not in tracking else None
        if record is None:
            record = RunRecord(
                run_id=new_run_id(),
                pipeline=pipeline.name,
                source=pipeline.source,
                storage=self.store.shown_root,
                tracking=None if tracking is None else redact(tracking),
                overrides=[redact(item) for item in pipeline.overrides],
                force=force,
                stages={name: _entry(pipeline.stages[name]) for name in pipeline.order},
            )
            self.forced = pipeline.descendants(set(force))
        else:
            record.resumed += 1
            record.status, record.error, record.finished = Status.RUNNING, None, None
            # Stages forced in the first attempt and already finished are not redone.
            done = set(record.with_status(Status.SUCCEEDED))
            self.forced = pipeline.descendants(set(record.force)) - done
        self.record = record
        self.tracker = None
        #: MLflow starts with the first stage that has to run (see _ensure_tracking); the
        #: stages settled before it wait here to be logged.
        self._tracking_started = False
        #: Where tracking calls are made: a thread of their own (MLflow's client), or queued
        #: for this thread (raypipe's own database written directly, see InlineCalls).
        self._tracking: ThreadPoolExecutor | InlineCalls | None = None
        #: Every call queued for tracking: the stage it logs (None: the run's start or end),
        #: and its future (cancelled: never made, see _hand_over_tracking).
        self._queued: list[tuple[str | None, Future]] = []
        self._untracked: list[tuple[str, dict[str, Any] | None]] = []
        self.digests: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self._started_ray = False
        self._progress_seen: dict[str, int] = {}
        self._t0 = time.time()
        self._writer = RecordWriter(
            lambda text: self.store.write_run_file(self.run_id, RUN_FILE, text)
        )

    @property
    def run_id(self) -> str:
        return self.record.run_id

    # The record is the only state that survives the driver: save it on every change.
    def save(self, wait: bool = False) -> None:
        """Saves the record: off the driver's critical path, or now with ``wait``."""
        self.record.updated = time.time()
        self._writer.put(self.record.to_json())
        if wait:
            self._writer.flush()

    def _say(self, stage: str, message: str) -> None:
        if self.display is not None:
            self.display(stage, self.record.stages[stage], message)
        else:
            self.print(f"[{time.time() - self._t0:7.1f}s] {stage}: {message}")

    def run(self) -> RunRecord:
        """Runs every stage that is not complete; returns the final record.

        Raises:
            StorageError: the storage cannot be written (checked before anything is).
            RunLocked: another live process is driving this run.
        """
        self.store.check_writable()
        with driver_lock(self.store, self.run_id):
            if self.record.resumed:
                self._take_saved_tracking()
            record = self._run_locked()
        # After the lock: the logger takes it in its turn.
        if self._logs_later() or record.tracked_later is not None:
            self._log_later()
        return record

    def _take_saved_tracking(self) -> None:
        """A resumed run's record was read before this driver held the run's lock; a
        background logger that held it meanwhile may have logged the run since (its MLflow
        id, what it left, why it failed): what it saved is taken, so nothing is logged twice."""
        try:
            saved = load_record(self.store, self.run_id)
        except RecordError:
            return  # unreadable now: the record read before stands (and is written over)
        self.record.mlflow_run_id = saved.mlflow_run_id
        self.record.tracking_error = saved.tracking_error
        self.record.tracked_later = saved.tracked_later

    def _run_locked(self) -> RunRecord:
        saved = self.pipeline.to_dict()
        # Where it ran, without credentials: `resume` is given the storage again, and a
        # tracking URI's credentials belong in the environment (MLFLOW_TRACKING_PASSWORD...).
        saved["storage"] = self.store.shown_root
        if saved.get("tracking"):
            saved["tracking"] = redact(saved["tracking"])
        self.store.write_run_file(
            self.run_id, PIPELINE_FILE, yaml.dump(saved, Dumper=_YAML_DUMPER, sort_keys=False)
        )
        self.print(
            f"run {self.run_id} of pipeline {self.pipeline.name} (storage {self.store.shown_root})"
        )
        self.save()
        try:
            self._loop()
        except BaseException as e:
            self.record.status = Status.FAILED
            self.record.error = one_line(f"driver stopped: {type(e).__name__}: {e}")
            self.record.finished = time.time()
            self._stop_tracking(wait=False)
            self.save(wait=True)
            raise
        finally:
            self._stop_ray()
            self._writer.close()
        failed = self.record.with_status(Status.FAILED)
        self.record.status = Status.FAILED if failed else Status.SUCCEEDED
        if failed:
            first = self.record.stages[failed[0]]
            self.record.error = f"stage {failed[0]!r} failed: {first.error}"
        self.record.finished = time.time()
        if not self._logs_later():
            self._ensure_tracking()
        self._tracked(lambda t: t.finish(self.record.status))
        self.store.write_run_file(self.run_id, RUN_FILE, self.record.to_json())
        self._write_report()  # while the tracking thread catches up
        if self._tracking is not None:
            if self.track_later and self.record.ok:
                self._hand_over_tracking()
            else:
                self._stop_tracking()
            # With what tracking made of it: the parent's MLflow id, or why tracking stopped,
            # and what it left to the background logger.
            self.store.write_run_file(self.run_id, RUN_FILE, self.record.to_json())
        return self.record

    def _ensure_tracking(self) -> None:
        """Starts tracking once: opens the MLflow parent run (reopened on resume) and logs the
        stages settled before it, on the tracking thread (see _tracked)."""
        if self._tracking_started:
            return
        self._tracking_started = True
        direct = self._open_direct_tracker()
        if direct is not None:
            self._tracking = InlineCalls()
        else:
            self._tracking = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="raypipe-tracking"
            )
        self._queued.append((None, self._tracking.submit(self._start_tracking, direct)))
        # A resumed run whose earlier driver handed stages to a background logger that never
        # logged them (it died, or this driver had the lock first): they are logged here.
        left, self.record.tracked_later = self.record.tracked_later or [], None
        queued = {name for name, _ in self._untracked}
        for name in left:  # those not succeeded (now) run again, and are tracked then
            entry = self.record.stages.get(name)
            if entry and entry.status == Status.SUCCEEDED and name not in queued:
                self._untracked.append((name, saved_manifest(self.store, entry)))
        for name, manifest in self._untracked:
            self._track_stage(name, manifest)
        self._untracked.clear()

    def _open_direct_tracker(self) -> SqliteTracker | None:
        """raypipe's own database, written on this thread (see InlineCalls), when it can be
        (``pipelines.tracking.open_direct``); else None."""
        from pipelines.tracking import open_direct

        uri = self.tracking_uri
        own = uri is not None and uri == default_tracking_uri(self.store)
        return open_direct(uri, self.pipeline.name, own) if own else None

    def _catch_up_tracking(self) -> None:
        """Makes the tracking calls queued for this thread (see InlineCalls)."""
        if isinstance(self._tracking, InlineCalls):
            self._tracking.run_pending()

    def _stop_tracking(self, wait: bool = True) -> None:
        """Waits for every queued tracking call (or, without ``wait``, drops those not
        begun: the driver is stopping on an error)."""
        if self._tracking is not None:
            self._tracking.shutdown(wait=wait, cancel_futures=not wait)

    def _hand_over_tracking(self) -> None:
        """Waits for tracking to catch up, up to ``TRACKING_WAIT_S`` once the run's MLflow
        parent is open; then the call being made is finished, and the calls not begun are
        cancelled and left to the background logger that ``run`` starts once the driver's
        lock is released (``record.tracked_later``: their stages, then the run's end). A
        backlog shorter than that wait costs less here than a second MLflow start (seconds of
        imports) in another process; a longer one (a slow tracking server) does not hold up
        the run's result. Only for a run that succeeded: a failed one may be resumed at once,
        and the logger holds the run's lock."""
        self._catch_up_tracking()
        (_, opened), rest = self._queued[0], self._queued[1:]
        opened.result()  # MLflow's start is paid here in any case (errors are recorded)
        futures.wait([call for _, call in rest], timeout=TRACKING_WAIT_S)
        left = [stage for stage, call in rest if call.cancel()]
        self._tracking.shutdown(wait=True)
        if left and self.tracker is not None:  # else off: tracking_error says why
            self.record.tracked_later = [stage for stage in left if stage is not None]

    def _logs_later(self) -> bool:
        """Whether this run is logged to MLflow by a background process once it is done: no
        stage ran, and it is a new run (a resumed one reopens its MLflow run here)."""
        return (
            self.track_later
            and not self._tracking_started
            and self.tracking_uri is not None
            and self.record.resumed == 0
        )

    def _log_later(self) -> None:
        """Hands a run in which no stage ran, or what tracking left of one
        (``record.tracked_later``), to a background process that logs it to MLflow
        (``pipelines.tracking.log_later``); says where its log is."""
        from pipelines.tracking import log_later

        try:
            where = log_later(
                self.store, self.run_id, self.tracking_uri, _artifact_root(self.store)
            )
        except OSError as e:
            self._tracking_off(f"the background logger did not start: {e}")
            self.store.write_run_file(self.run_id, RUN_FILE, self.record.to_json())
            return
        behind = self.record.tracked_later
        if behind is None:
            self.print(f"tracking: logged to MLflow in the background ({where})")
        else:
            self.print(
                f"tracking: MLflow catches up in the background ({len(behind)} stages and the "
                f"run's end; {where})"
            )

    def _start_tracking(self, direct: SqliteTracker | None = None) -> None:
        """Opens the MLflow parent run (on the tracking thread, or with ``direct`` on this
        one); a failure is recorded, not fatal."""
        uri = self.tracking_uri
        if not uri:
            if self.record.tracking:
                self._tracking_off(
                    "the tracking URI held credentials, which are not saved with a run; "
                    "give them in the environment (MLFLOW_TRACKING_USERNAME, ..._PASSWORD)"
                )
            return
        from pipelines.tracking import Tracker

        try:
            # _ensure_tracking tried the direct writer already: MLflow's client, unless it made one.
            own = uri == default_tracking_uri(self.store)
            tracker = direct or Tracker(
                uri, self.pipeline.name, _artifact_root(self.store), own_database=own
            )
            self.record.mlflow_run_id = tracker.start(
                self.run_id, self.pipeline.name, self.record.overrides, self.record.mlflow_run_id
            )
        except Exception as e:  # noqa: BLE001 - tracking is a record of the run, not the run
            self._tracking_off(f"{type(e).__name__}: {e}")
            return
        self.tracker = tracker

    def _tracked(self, call: Callable[[Any], Any], stage: str | None = None) -> None:
        """Queues one tracking call. Calls run in order, on one thread of their own or once
        the loop has launched the next stages (InlineCalls), so a stage that finished does not
        hold up the next one while MLflow records it (each call is a database transaction or a
        request); the first failure turns tracking off."""
        if self._tracking is not None:
            self._queued.append((stage, self._tracking.submit(self._call_tracker, call)))

    def _call_tracker(self, call: Callable[[Any], Any]) -> None:
        if self.tracker is None:
            return
        try:
            call(self.tracker)
        except Exception as e:  # noqa: BLE001 - see _start_tracking
            self._tracking_off(f"{type(e).__name__}: {e}")

    def _tracking_off(self, reason: str) -> None:
        """Tracking stops for the rest of the run; the record and the console say why."""
        self.record.tracking_error = one_line(reason)
        self.print(f"tracking off: {self.record.tracking_error}")
        self.tracker = None

    def _track_stage(self, name: str, manifest: dict[str, Any] | None) -> None:
        if not self._tracking_started:
            self._untracked.append((name, manifest))
            return
        entry = copy.deepcopy(self.record.stages[name])  # as it is now, for the other thread
        self._tracked(lambda t: t.stage(name, entry, manifest), name)

    def _write_report(self) -> None:
        """The HTML report; a failure to draw it is shown, never fails the run."""
        from pipelines.report import write_report

        try:
            self.print(f"report: {write_report(self.store, self.run_id)}")
        except Exception as e:  # noqa: BLE001 - the run's outcome stands without its report
            self.print(f"report not written: {type(e).__name__}: {e}")

    def _stop_ray(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def _loop(self) -> None:
        stages = self.record.stages
        pending = [s for s in self.pipeline.order if stages[s].status != Status.SUCCEEDED]
        for name in self.pipeline.order:
            if stages[name].status == Status.SUCCEEDED:
                self._keep_completed(name, pending)
        running: dict[Any, str] = {}
        while True:
            self._start_ready(pending, running)
            self.save()  # once per turn of the loop: every change since the last turn
            self._catch_up_tracking()
            if not running:
                break
            import ray

            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            self._show_progress(running.values())
            for ref in ready:
                self._finish(running.pop(ref), ref)

    def _keep_completed(self, name: str, pending: list[str]) -> None:
        """On resume: a stage that succeeded before keeps its artifact if it still verifies."""
        st = self.record.stages[name]
        component, key = st.uses, st.cache_key
        try:
            manifest = self._verified(component, key)
        except (ArtifactInvalid, TypeError) as e:
            self._say(name, f"completed before, but its artifact is unusable ({e}); recomputing")
            st.mark_pending()
            pending.insert(0, name)
            pending.sort(key=self.pipeline.order.index)
            return
        self.digests[name], self.keys[name] = manifest["digest"], key
        self._say(name, "completed before the resume; kept")

    def _verified(self, component: str, key: str | None) -> dict[str, Any]:
        """The manifest of a published artifact whose every file checks out.

        Raises:
            ArtifactInvalid: missing, altered, published before artifacts said their kind
                (consumers find inputs by kind: such an artifact is computed again), or what
                it describes outside the store is gone (``Component.stale_because``).
        """
        manifest = self.store.verify(component, key)
        if "kind" not in manifest:
            raise ArtifactInvalid("published before artifacts had kinds")
        cls = registry.get(component)
        if cls.stale_because is not Component.stale_because:
            self._ensure_ray()
            local = self.store.local_artifact_dir(component, key, manifest)
            try:
                reason = cls().stale_because(local)
            except Exception as e:  # noqa: BLE001 - a check that cannot say: run the stage again
                reason = f"its check failed: {type(e).__name__}: {one_line(e)}"
            if reason:
                raise StaleArtifact(reason)
        return manifest

    def _start_ready(self, pending: list[str], running: dict[Any, str]) -> None:
        progressed = True
        while progressed:
            progressed = False
            for name in list(pending):
                needs = self.pipeline.stages[name].needs
                statuses = [self.record.stages[n].status for n in needs]
                unmet = (Status.FAILED, Status.SKIPPED)
                if any(s in unmet for s in statuses):
                    bad = next(n for n in needs if self.record.stages[n].status in unmet)
                    self.record.stages[name].mark_skipped(f"not run: stage {bad!r} did not succeed")
                    self._say(name, f"skipped ({bad} did not succeed)")
                elif all(s == Status.SUCCEEDED for s in statuses):
                    self._start(name, running)
                else:
                    continue
                pending.remove(name)
                progressed = True

    def _key_for(self, name: str) -> str:
        stage = self.pipeline.stages[name]
        component = registry.get(stage.uses)
        return cache_key(
            stage.uses,
            component.version,
            stage.config.model_dump(mode="json"),
            stage.spec.resources.model_dump(mode="json")
            if component.resources_affect_output
            else None,
            {n: self.digests[n] for n in stage.needs},
            source_fingerprint(component().source_paths(stage.config)),
        )

    def _start(self, name: str, running: dict[Any, str]) -> None:
        stage = self.pipeline.stages[name]
        key = self._key_for(name)
        self.keys[name] = key
        st = self.record.stages[name]
        st.mark_keyed(key)
        forced = name in self.forced
        if not forced:
            try:
                manifest = self._verified(stage.uses, key)
            except ArtifactInvalid as e:
                if self.store.read_manifest(stage.uses, key) is not None:
                    what = "is stale" if isinstance(e, StaleArtifact) else "is broken"
                    self._say(name, f"cached artifact {what} ({e}); recomputing")
                    st.recomputed_because = str(e)
                    self.store.discard(stage.uses, key)
            else:
                self.digests[name] = manifest["digest"]
                st.mark_succeeded(manifest, cached=True)
                self._say(name, "cached")
                self._track_stage(name, manifest)
                return
        self._ensure_tracking()
        unplaceable = self._unplaceable(name)
        if unplaceable:
            st.mark_failed(unplaceable, None)
            self._say(name, f"FAILED: {unplaceable}")
            self._track_stage(name, None)
            return
        running[self._launch(name, key, forced)] = name
        st.mark_running()
        self._say(name, "started" + (" (forced)" if forced else ""))

    def _ensure_ray(self) -> None:
        """Connects to (or starts) Ray on the first stage that runs; says once how it
        authenticates and, unless its output is shown here, where its logs are."""
        import ray

        if ray.is_initialized():
            return
        self._started_ray = ensure_ray(self.address, self.ray_logs)
        if self._started_ray and not self.address:
            self.print(auth_summary())
        node = getattr(ray._private.worker, "_global_node", None)  # None over ray://
        if not self.ray_logs and node is not None:
            logs = Path(node.get_session_dir_path()) / "logs"
            self.print(f"Ray's own output: {logs} (--verbose shows it here)")

    def _unplaceable(self, name: str) -> str | None:
        """Why a stage's workers can never be placed, or None. Stages wait for resources that
        other stages hold (``training.resource_wait_s``); on the embedded Ray this run started,
        whose size is fixed, a stage asking for more CPUs than it has would wait for ever."""
        self._ensure_ray()
        if not self._started_ray or self.address:
            return None  # a cluster: an autoscaler may add the nodes
        import ray

        stage = self.pipeline.stages[name]
        res = stage.spec.resources
        total = ray.cluster_resources().get("CPU", 0)
        if res.workers * res.cpus_per_worker > total:
            return (
                f"resources: {res.workers} workers x {res.cpus_per_worker:g} CPUs need "
                f"{res.workers * res.cpus_per_worker:g} CPUs; the local Ray has {total:g} "
                "(lower stage.resources.workers, or run on a cluster with --ray-address)"
            )
        component = registry.get(stage.uses)
        own = component.task_cpus_for(stage.config)
        if own > total:
            setting = component.task_cpus_setting
            return (
                f"the stage's own task needs {own:g} CPUs"
                + (f" (stages.{name}.with.{setting})" if setting else "")
                + f"; the local Ray has {total:g} (ask for fewer, or run on a cluster with "
                "--ray-address)"
            )
        return None

    def _launch(self, name: str, key: str, forced: bool) -> Any:
        """Submits the stage's Ray task; returns its ObjectRef."""
        stage = self.pipeline.stages[name]
        job = StageJob(
            run_id=self.run_id,
            pipeline=self.pipeline.name,
            stage=name,
            component=stage.uses,
            config=stage.config.model_dump(mode="json"),
            resources=stage.spec.resources.model_dump(mode="json"),
            cache_key=key,
            storage=self.store.root,
            tracking_uri=self.tracking_uri,
            inputs={n: (self.pipeline.stages[n].uses, self.keys[n]) for n in stage.needs},
            replace=forced,
        )
        task = remote_stage_task().options(
            num_cpus=registry.get(stage.uses).task_cpus_for(stage.config),
            max_retries=0,
            name=f"raypipe:{self.pipeline.name}:{name}",
        )
        return task.remote(job)

    def _finish(self, name: str, ref: Any) -> None:
        import ray

        st = self.record.stages[name]
        try:
            manifest = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - every stage failure is recorded, not raised
            message, trace = describe_failure(e)
            st.mark_failed(message, trace)
            self._say(name, f"FAILED: {message}")
            self._track_stage(name, None)
        else:
            self.digests[name] = manifest["digest"]
            st.mark_succeeded(manifest, cached=False)
            seconds = manifest["timings"]["seconds"]
            self._say(name, f"done in {seconds:.1f}s{_metric_summary(st.metrics)}")
            self._track_stage(name, manifest)

    def _show_progress(self, names: Iterable[str]) -> None:
        if not self.store.is_local:
            return
        for name in names:
            path = progress_file(self.store, self.run_id, name)
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            if len(lines) > self._progress_seen.get(name, 0):
                self._progress_seen[name] = len(lines)
                try:
                    point = json.loads(lines[-1])
                except json.JSONDecodeError:
                    continue
                point.pop("time", None)
                shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(point.items())[:5])
                self._say(name, shown)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_summary(metrics: dict[str, Any]) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, int | float)][:3]
    return (" (" + ", ".join(f"{k}={_fmt(v)}" for k, v in shown) + ")") if shown else ""


def describe_failure(error: BaseException) -> tuple[str, str]:
    """A one-line message and the traceback of a stage task's failure (both bounded and
    redacted: an error may quote megabytes of a bad value, or a URI's credentials)."""
    import ray.exceptions as rex

    if isinstance(error, rex.RayTaskError):
        cause = error.cause if error.cause is not None else error
        # A task's error raised again in the task that waited on it: name the first cause.
        while isinstance(cause, rex.RayTaskError) and cause.cause not in (None, cause):
            cause = cause.cause
        lines = f"{type(cause).__name__}: {cause}".splitlines()
        return one_line(lines[0] if lines else type(cause).__name__), block(str(error))
    if isinstance(error, rex.WorkerCrashedError | rex.NodeDiedError | rex.ActorDiedError):
        return f"the stage's Ray worker died ({type(error).__name__})", block(str(error))
    message = one_line(f"{type(error).__name__}: {error}")
    return message, block("".join(traceback.format_exception(error)))


def run_pipeline(
    pipeline: Pipeline,
    *,
    force: Iterable[str] = (),
    address: str | None = None,
    printer: Printer = _default_printer,
) -> RunRecord:
    """Runs a validated pipeline from the start (cached stages are reused)."""
    return Runner(pipeline, force=force, address=address, printer=printer).run()


def resume_run(
    storage: str, run_id: str, *, address: str | None = None, **runner_options: Any
) -> RunRecord:
    """Finishes a run that died, from its last complete stage.

    Stages that succeeded keep their artifacts (verified again); the rest run.

    Raises:
        RecordError: no such run, or its record or saved pipeline is damaged or they disagree.
        PipelineError: the saved pipeline no longer validates (a component was removed).
        StorageError: the storage cannot be read or written.
    """
    store = Store(storage)
    record = load_record(store, run_id)
    source = store.shown("runs", run_id, PIPELINE_FILE)
    try:
        text = store.read_run_file(run_id, PIPELINE_FILE, limit=spec_mod.MAX_FILE_BYTES)
    except (TooLarge, UnicodeDecodeError) as e:
        raise RecordError(source, None, f"damaged: {e}") from None
    if text is None:
        raise RecordError(source, None, "missing: the run cannot be resumed without it")
    data = spec_mod.parse_yaml(text, source)
    if isinstance(data, dict):
        data["storage"] = storage  # saved without credentials; the record was found here
    pipeline = spec_mod.validate(data, source, tuple(record.overrides))
    saved = {name: stage.uses for name, stage in pipeline.stages.items()}
    if {name: entry.uses for name, entry in record.stages.items()} != saved:
        raise RecordError(
            store.shown("runs", run_id, RUN_FILE),
            "stages",
            f"the record's stages ({', '.join(record.stages)}) are not those of its "
            f"{PIPELINE_FILE} ({', '.join(pipeline.order)}) with the same components",
        )
    return Runner(pipeline, address=address, record=record, **runner_options).run()
