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

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from components import registry
from components.api import InputArtifact, Resources, StageContext
from pipelines import spec as spec_mod
from pipelines.spec import Pipeline
from pipelines.store import ArtifactInvalid, Store, digest_of

PENDING, RUNNING, SUCCEEDED, FAILED, SKIPPED = (
    "pending",
    "running",
    "succeeded",
    "failed",
    "skipped",
)
RUN_FILE, PIPELINE_FILE = "run.json", "pipeline.yaml"


@functools.cache
def code_version() -> str:
    """The installed raypipe version (saved with every artifact)."""
    try:
        return metadata.version("raypipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def stage_seed(pipeline_name: str, stage: str) -> int:
    """A stable per-stage seed for components that are not given one."""
    return int.from_bytes(hashlib.sha256(f"{pipeline_name}/{stage}".encode()).digest()[:4], "big")


def default_tracking_uri(store: Store) -> str | None:
    """MLflow on SQLite under the storage root (only for local storage)."""
    return f"sqlite:///{store.root}/mlflow.db" if store.is_local else None


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


# --- the stage task -----------------------------------------------------------------------


@dataclass(frozen=True)
class StageJob:
    """Everything a stage task needs, as plain data (it is sent to a Ray worker)."""

    run_id: str
    pipeline: str
    stage: str
    component: str
    config: dict[str, Any]
    resources: dict[str, Any]
    cache_key: str
    storage: str
    tracking_uri: str | None
    inputs: dict[str, tuple[str, str]]  # stage -> (component, cache key)
    replace: bool = False


def execute_stage(job: StageJob) -> dict[str, Any]:
    """Runs one stage and publishes its artifact; returns the artifact's manifest.

    This is the body of the Ray task. The component writes into a fresh directory; only when
    ``run`` returns is the directory checksummed and published, so a failure or a kill leaves
    no artifact behind.
    """
    store = Store(job.storage)
    component_cls = registry.get(job.component)
    config = component_cls.Config.model_validate(job.config)
    inputs = {}
    for stage, (component, key) in job.inputs.items():
        manifest = store.read_manifest(component, key)
        if manifest is None:
            raise ArtifactInvalid(f"input artifact of stage {stage!r} disappeared")
        inputs[stage] = InputArtifact(
            stage, store.local_artifact_dir(component, key, manifest), manifest
        )
    out_dir = store.new_output_dir(job.cache_key)
    progress = _ProgressWriter(store, job.run_id, job.stage)
    ctx = StageContext(
        stage=job.stage,
        run_id=job.run_id,
        out_dir=out_dir,
        scratch_dir=store.scratch(job.cache_key),
        inputs=inputs,
        resources=Resources.model_validate(job.resources),
        tracking_uri=job.tracking_uri,
        seed=stage_seed(job.pipeline, job.stage),
        on_progress=progress,
    )
    started = time.time()
    try:
        metrics = component_cls().run(ctx, config) or {}
        ctx.write_history()
        finished = time.time()
        manifest = {
            "component": job.component,
            "version": component_cls.version,
            "cache_key": job.cache_key,
            "stage": job.stage,
            "run_id": job.run_id,
            "config": job.config,
            "resources": job.resources,
            "inputs": {
                s: {"component": inputs[s].component, "digest": inputs[s].manifest["digest"]}
                for s in inputs
            },
            "metrics": _plain(metrics),
            "timings": {"start": started, "end": finished, "seconds": finished - started},
            "seed": ctx.seed,
            "code_version": code_version(),
            "host": os.uname().nodename,
            "pid": os.getpid(),
        }
        if job.replace:
            store.discard(job.component, job.cache_key)
        published = store.publish(out_dir, job.component, job.cache_key, manifest)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    store.drop_scratch(job.cache_key)
    return published


class _LatestWriter:
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


@functools.cache
def _stage_task() -> Any:
    """``execute_stage`` as a Ray remote function, made once (exporting it costs ~10 ms)."""
    import ray

    return ray.remote(execute_stage)


class RunLocked(RuntimeError):
    """A run is being driven by another live process."""


@contextlib.contextmanager
def driver_lock(store: Store, run_id: str):
    """Holds ``runs/<run_id>/driver.lock`` while a driver runs, so ``resume`` cannot start a
    second driver of a live run. It is an ``flock``: the kernel drops it when the process
    dies, even by SIGKILL, so a dead driver never leaves a stale lock. (Local storage only:
    object stores have no such lock.)"""
    if not store.is_local:
        yield
        return
    path = Path(store.run_dir(run_id)) / "driver.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLocked(
                f"run {run_id} is still running ({holder}); not starting a second driver"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _ProgressWriter:
    """Appends a stage's progress points to ``runs/<id>/progress/<stage>.jsonl`` (local store)."""

    def __init__(self, store: Store, run_id: str, stage: str):
        self.path = Path(store.run_dir(run_id)) / "progress" / f"{stage}.jsonl"
        self.enabled = store.is_local

    def __call__(self, point: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(point), sort_keys=True) + "\n")


def _plain(value: Any) -> Any:
    """Converts numpy scalars and the like into JSON-friendly Python values."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    return str(value)


# --- the run record -----------------------------------------------------------------------


@dataclass
class RunRecord:
    """What happened in one run; saved as ``runs/<run_id>/run.json``."""

    run_id: str
    pipeline: str
    source: str
    storage: str
    tracking: str | None
    overrides: list[str]
    force: list[str]
    status: str = RUNNING
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    finished: float | None = None
    resumed: int = 0
    error: str | None = None
    mlflow_run_id: str | None = None
    tracking_error: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED


def load_record(store: Store, run_id: str) -> RunRecord:
    """Reads a run record.

    Raises:
        FileNotFoundError: no run with that id in the store (the message names both).
    """
    try:
        text = store.read_run_file(run_id, RUN_FILE)
    except ValueError:
        text = None
    if text is None:
        raise FileNotFoundError(f"no run {run_id!r} in storage {store.root}")
    return RunRecord.from_json(text)


def list_records(store: Store) -> list[RunRecord]:
    """Every readable run record in the store, oldest first."""
    records = []
    for run_id in store.run_ids():
        try:
            records.append(load_record(store, run_id))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            continue
    return records


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
        ray.init(address="local", include_dashboard=False, **kwargs)
    return True


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
    ):
        self.pipeline = pipeline
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
        if record is None:
            record = RunRecord(
                run_id=new_run_id(),
                pipeline=pipeline.name,
                source=pipeline.source,
                storage=self.store.root,
                tracking=tracking,
                overrides=list(pipeline.overrides),
                force=force,
                stages={
                    name: {"uses": pipeline.stages[name].uses, "status": PENDING}
                    for name in pipeline.order
                },
            )
            self.forced = pipeline.descendants(set(force))
        else:
            record.resumed += 1
            record.status, record.error, record.finished = RUNNING, None, None
            # Stages forced in the first attempt and already finished are not redone.
            done = {s for s, st in record.stages.items() if st.get("status") == SUCCEEDED}
            self.forced = pipeline.descendants(set(record.force)) - done
        self.record = record
        self.tracker = None
        self.digests: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self._started_ray = False
        self._progress_seen: dict[str, int] = {}
        self._t0 = time.time()
        self._writer = _LatestWriter(
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
            RunLocked: another live process is driving this run.
        """
        with driver_lock(self.store, self.run_id):
            return self._run_locked()

    def _run_locked(self) -> RunRecord:
        self.store.write_run_file(
            self.run_id, PIPELINE_FILE, yaml.safe_dump(self.pipeline.to_dict(), sort_keys=False)
        )
        self.print(
            f"run {self.run_id} of pipeline {self.pipeline.name} (storage {self.store.root})"
        )
        self._start_tracking()
        self.save()
        try:
            self._loop()
        except BaseException as e:
            self.record.status = FAILED
            self.record.error = f"driver stopped: {type(e).__name__}: {e}"
            self.record.finished = time.time()
            self.save(wait=True)
            raise
        finally:
            self._stop_ray()
            self._writer.close()
        failed = [s for s, st in self.record.stages.items() if st["status"] == FAILED]
        self.record.status = FAILED if failed else SUCCEEDED
        if failed:
            first = self.record.stages[failed[0]]
            self.record.error = f"stage {failed[0]!r} failed: {first.get('error')}"
        self.record.finished = time.time()
        self._tracked(lambda t: t.finish(self.record.status))
        self.store.write_run_file(self.run_id, RUN_FILE, self.record.to_json())
        self._write_report()
        return self.record

    def _start_tracking(self) -> None:
        """Opens the MLflow parent run (reopened on resume); a failure is recorded, not fatal."""
        uri = self.record.tracking
        if not uri:
            return
        from pipelines.tracking import Tracker

        root = f"{self.store.root}/mlflow-artifacts" if self.store.is_local else None
        try:
            self.tracker = Tracker(uri, self.pipeline.name, root)
        except Exception as e:  # noqa: BLE001 - tracking is a record of the run, not the run
            self.record.tracking_error = f"{type(e).__name__}: {e}"
            self.print(f"tracking off: {self.record.tracking_error}")
            return
        self._tracked(
            lambda t: setattr(
                self.record,
                "mlflow_run_id",
                t.start(
                    self.run_id,
                    self.pipeline.name,
                    self.record.overrides,
                    self.record.mlflow_run_id,
                ),
            )
        )

    def _tracked(self, call: Callable[[Any], Any]) -> None:
        """Runs one tracking call; the first failure turns tracking off for this run."""
        if self.tracker is None:
            return
        try:
            call(self.tracker)
        except Exception as e:  # noqa: BLE001 - see _start_tracking
            self.record.tracking_error = f"{type(e).__name__}: {e}"
            self.print(f"tracking off: {self.record.tracking_error}")
            self.tracker = None

    def _track_stage(self, name: str, manifest: dict[str, Any] | None) -> None:
        self._tracked(lambda t: t.stage(name, self.record.stages[name], manifest))

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
        pending = [s for s in self.pipeline.order if stages[s]["status"] != SUCCEEDED]
        for name in self.pipeline.order:
            if stages[name]["status"] == SUCCEEDED:
                self._keep_completed(name, pending)
        running: dict[Any, str] = {}
        while True:
            self._start_ready(pending, running)
            self.save()  # once per turn of the loop: every change since the last turn
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
        component, key = st["uses"], st.get("cache_key")
        try:
            manifest = self.store.verify(component, key)
        except (ArtifactInvalid, TypeError) as e:
            self._say(name, f"completed before, but its artifact is unusable ({e}); recomputing")
            st.update(status=PENDING, cache_hit=False)
            pending.insert(0, name)
            pending.sort(key=self.pipeline.order.index)
            return
        self.digests[name], self.keys[name] = manifest["digest"], key
        self._say(name, "completed before the resume; kept")

    def _start_ready(self, pending: list[str], running: dict[Any, str]) -> None:
        progressed = True
        while progressed:
            progressed = False
            for name in list(pending):
                needs = self.pipeline.stages[name].needs
                statuses = [self.record.stages[n]["status"] for n in needs]
                if any(s in (FAILED, SKIPPED) for s in statuses):
                    bad = next(
                        n for n in needs if self.record.stages[n]["status"] in (FAILED, SKIPPED)
                    )
                    self.record.stages[name].update(
                        status=SKIPPED, error=f"not run: stage {bad!r} did not succeed"
                    )
                    self._say(name, f"skipped ({bad} did not succeed)")
                elif all(s == SUCCEEDED for s in statuses):
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
        st.update(cache_key=key, error=None, traceback=None)
        forced = name in self.forced
        if not forced:
            try:
                manifest = self.store.verify(stage.uses, key)
            except ArtifactInvalid as e:
                if self.store.read_manifest(stage.uses, key) is not None:
                    self._say(name, f"cached artifact is broken ({e}); recomputing")
                    st["recomputed_because"] = str(e)
                    self.store.discard(stage.uses, key)
            else:
                now = time.time()
                self.digests[name] = manifest["digest"]
                st.update(
                    status=SUCCEEDED,
                    cache_hit=True,
                    start=now,
                    end=now,
                    seconds=0.0,
                    artifact=manifest["path"],
                    metrics=manifest.get("metrics", {}),
                )
                self._say(name, "cached")
                self._track_stage(name, manifest)
                return
        running[self._launch(name, key, forced)] = name
        st.update(status=RUNNING, cache_hit=False, start=time.time(), end=None)
        st["attempts"] = st.get("attempts", 0) + 1
        self._say(name, "started" + (" (forced)" if forced else ""))

    def _launch(self, name: str, key: str, forced: bool) -> Any:
        """Submits the stage's Ray task; returns its ObjectRef."""
        import ray

        if not ray.is_initialized():
            self._started_ray = ensure_ray(self.address, self.ray_logs)
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
            tracking_uri=self.record.tracking,
            inputs={n: (self.pipeline.stages[n].uses, self.keys[n]) for n in stage.needs},
            replace=forced,
        )
        task = _stage_task().options(
            num_cpus=registry.get(stage.uses).task_cpus,
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
            st.update(status=FAILED, end=time.time(), error=message, traceback=trace)
            self._say(name, f"FAILED: {message}")
            self._track_stage(name, None)
        else:
            self.digests[name] = manifest["digest"]
            timings = manifest["timings"]
            st.update(
                status=SUCCEEDED,
                start=timings["start"],
                end=timings["end"],
                seconds=round(timings["seconds"], 3),
                artifact=manifest["path"],
                metrics=manifest.get("metrics", {}),
            )
            self._say(name, f"done in {timings['seconds']:.1f}s{_metric_summary(st['metrics'])}")
            self._track_stage(name, manifest)

    def _show_progress(self, names: Iterable[str]) -> None:
        if not self.store.is_local:
            return
        for name in names:
            path = Path(self.store.run_dir(self.run_id)) / "progress" / f"{name}.jsonl"
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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def describe_failure(error: BaseException) -> tuple[str, str]:
    """A one-line message and the full traceback of a stage task's failure."""
    import ray.exceptions as rex

    if isinstance(error, rex.RayTaskError):
        cause = error.cause if error.cause is not None else error
        # A task's error raised again in the task that waited on it: name the first cause.
        while isinstance(cause, rex.RayTaskError) and cause.cause not in (None, cause):
            cause = cause.cause
        message = f"{type(cause).__name__}: {cause}".splitlines()[0]
        return message, _ANSI.sub("", str(error))
    if isinstance(error, rex.WorkerCrashedError | rex.NodeDiedError | rex.ActorDiedError):
        return f"the stage's Ray worker died ({type(error).__name__})", str(error)
    return f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))


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
        FileNotFoundError: no such run.
        PipelineError: the saved pipeline no longer validates (a component was removed).
    """
    store = Store(storage)
    record = load_record(store, run_id)
    text = store.read_run_file(run_id, PIPELINE_FILE)
    if text is None:
        raise FileNotFoundError(f"run {run_id!r} has no {PIPELINE_FILE} in {store.root}")
    data = spec_mod.parse_yaml(text, f"{store.run_dir(run_id)}/{PIPELINE_FILE}")
    pipeline = spec_mod.validate(data, record.source, tuple(record.overrides))
    return Runner(pipeline, address=address, record=record, **runner_options).run()
