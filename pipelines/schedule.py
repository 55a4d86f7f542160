"""Scheduled runs: ``raypipe schedule FILE [--address URL]`` submits the pipeline at each tick.

Each tick submits the pipeline as a Ray job (:mod:`pipelines.submit`) whose submission id is
derived from the tick's time, so a tick handled twice (a scheduler that crashed and restarted)
finds its job instead of starting another.

Never two runs of one pipeline at once: the job of the last tick is written to
``<state_dir>/<pipeline>/lock.json`` *before* it is submitted; a tick that finds that job still
pending or running is skipped (and recorded as skipped). The lock is a file, so it survives a
restart of the scheduler; a second scheduler for the same pipeline is refused (an OS file lock
held while one runs, released by the OS if it dies).

Missed ticks (the scheduler was down): ``skip`` records them and waits for the next tick;
``run_once`` runs the latest missed tick once, right away.

Every tick and every job outcome is appended to ``<state_dir>/<pipeline>/history.jsonl``
(``raypipe schedule history FILE``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import spec as spec_mod
from pipelines import submit as submit_mod

POLICIES = ("skip", "run_once")
MAX_MISSED_RECORDED = 100


class ScheduleError(RuntimeError):
    """The scheduler cannot start; ``code`` is the CLI exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def iso(t: float) -> str:
    """A tick time as ISO 8601 UTC (seconds)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Ticks:
    """When ticks fall: a 5-field cron expression (UTC) or a fixed interval in seconds.

    Interval ticks are multiples of the interval since the epoch, so a tick's time (and the
    job id derived from it) is the same whichever scheduler process computes it.
    """

    def __init__(self, cron: str | None = None, every: float | None = None):
        if (cron is None) == (every is None):
            raise ScheduleError("give a cron expression (`schedule:` or --cron) or --every")
        if every is not None and every <= 0:
            raise ScheduleError("--every must be a positive number of seconds")
        if cron is not None:
            problem = spec_mod.cron_problem(cron)
            if problem:
                raise ScheduleError(problem)
        self.cron, self.every = cron, every

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t``."""
        if self.every is not None:
            return (int(t // self.every) + 1) * self.every
        from croniter import croniter

        start = dt.datetime.fromtimestamp(t, dt.UTC)
        return float(croniter(self.cron, start).get_next(float))

    def between(self, after: float, until: float, limit: int = 10_000) -> list[float]:
        """Ticks in ``(after, until]``, oldest first (at most ``limit``, the newest kept)."""
        found: list[float] = []
        t = self.next_after(after)
        while t <= until:
            found.append(t)
            if len(found) > limit:
                found.pop(0)
            t = self.next_after(t)
        return found


def due_ticks(
    ticks: Ticks, last: float | None, now: float, policy: str
) -> tuple[list[float], list[float]]:
    """What to do about the ticks since ``last`` (the last tick handled) up to ``now``.

    Returns:
        ``(run, missed)``: ticks to run now and ticks recorded as missed. With no ``last``
        (a first start) nothing is missed: the scheduler waits for the next tick.
    """
    if policy not in POLICIES:
        raise ScheduleError(f"unknown missed-tick policy {policy!r}; expected one of {POLICIES}")
    if last is None:
        return [], []
    past = ticks.between(last, now)
    if not past:
        return [], []
    if policy == "run_once":
        return [past[-1]], past[:-1]
    return [], past


class History:
    """The append-only record of one pipeline's ticks and job outcomes (JSON lines)."""

    def __init__(self, state_dir: str | Path, pipeline: str):
        self.dir = Path(state_dir) / pipeline
        self.path = self.dir / "history.jsonl"

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        event = {"time": round(time.time(), 3), **event}
        line = json.dumps(event, sort_keys=True) + "\n"
        with self.path.open("a+b") as f:
            # A line torn by a crash is closed first, so it does not swallow this event.
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        return event

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        return events


def format_history(events: list[dict[str, Any]]) -> list[str]:
    """One line per tick: its time, what happened, the job and (once known) its outcome."""
    outcomes = {e["job"]: e["status"] for e in events if e.get("event") == "finished"}
    lines = []
    for e in events:
        if e.get("event") == "finished":
            continue
        job = e.get("job") or "-"
        outcome = outcomes.get(job, e.get("status") or "")
        reason = f"  ({e['reason']})" if e.get("reason") else ""
        lines.append(f"{e.get('tick', '-'):<21} {e['event']:<9} {job:<44} {outcome}{reason}")
    return lines


class Scheduler:
    """Submits one pipeline at each tick, one run at a time.

    Args:
        file: the pipeline file (inside the project).
        overrides: ``stage.key=value`` overrides.
        address: the cluster's Jobs API address.
        cron: a 5-field cron expression (UTC); or ``every`` seconds.
        policy: ``skip`` or ``run_once`` for ticks missed while no scheduler ran.
        state_dir: where the lock, the state and the history live.
        printer: where progress lines go.
        clock / sleep: injectable for tests.
    """

    def __init__(
        self,
        file: str | Path,
        overrides: list[str] | tuple[str, ...],
        address: str,
        *,
        cron: str | None = None,
        every: float | None = None,
        policy: str = "skip",
        state_dir: str | Path = ".raypipe/schedules",
        printer: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if policy not in POLICIES:
            raise ScheduleError(f"unknown --missed policy {policy!r}; expected one of {POLICIES}")
        try:
            self.pipeline = spec_mod.load(file, list(overrides))
            submit_mod.project_path(file)
        except (spec_mod.PipelineError, submit_mod.SubmitError) as e:
            raise ScheduleError(str(e)) from None
        self.file, self.overrides, self.address = file, list(overrides), address
        self.ticks = Ticks(cron, every)
        self.policy = policy
        self.history = History(state_dir, self.pipeline.name)
        self.dir = self.history.dir
        self.print, self.clock, self.sleep = printer, clock, sleep
        self._client: submit_mod.JobsClient | None = None
        self._stop = False
        self._lock_fd: int | None = None

    # --- persistent state ------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any]:
        path = self.dir / name
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self.dir / name)

    def _hold_process_lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "scheduler.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ScheduleError(
                f"another scheduler (pid {other}) is running for pipeline "
                f"{self.pipeline.name!r} ({self.dir})",
                code=1,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_process_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def client(self) -> submit_mod.JobsClient:
        if self._client is None:
            self._client = submit_mod.JobsClient(self.address)
        return self._client

    # --- ticks -------------------------------------------------------------------------------

    def running_job(self) -> str | None:
        """The job holding the lock if it is still pending or running; records its outcome
        and releases the lock once it has ended."""
        lock = self._read("lock.json")
        job = lock.get("job")
        if not job:
            return None
        info = self.client.info(job)
        if info is None:  # written before a submission that never happened
            self._write("lock.json", {})
            return None
        status = str(info.status.value)
        if status not in submit_mod.TERMINAL:
            return job
        self.history.append(
            {"event": "finished", "job": job, "tick": lock.get("tick"), "status": status}
        )
        self.print(f"job {job} (tick {lock.get('tick')}): {status}")
        self._write("lock.json", {})
        return None

    def tick(self, t: float) -> dict[str, Any]:
        """Handles one tick: skip it while a run is going, else submit; returns the event."""
        when = iso(t)
        try:
            busy = self.running_job()
            if busy:
                event = self.history.append(
                    {
                        "event": "skipped",
                        "tick": when,
                        "job": busy,
                        "reason": "the previous run is still going",
                    }
                )
            else:
                sid = submit_mod.submission_id(self.pipeline, key=f"tick-{when}")
                # The lock names the job before it exists: a crash right after submitting
                # still leaves the next scheduler knowing which job to wait for.
                self._write("lock.json", {"job": sid, "tick": when})
                sub = submit_mod.submit(
                    self.file,
                    self.overrides,
                    self.address,
                    key=f"tick-{when}",
                    metadata={"raypipe_tick": when},
                    client=self.client,
                )
                event = self.history.append(
                    {
                        "event": "submitted" if sub.created else "existing",
                        "tick": when,
                        "job": sub.submission_id,
                        "status": sub.status,
                    }
                )
        except (submit_mod.SubmitError, spec_mod.PipelineError) as e:
            event = self.history.append({"event": "error", "tick": when, "reason": str(e)})
        self._write("state.json", {"last_tick": t, "last_tick_iso": when})
        self.print(f"tick {when}: {event['event']} {event.get('job') or event.get('reason', '')}")
        return event

    def _catch_up(self) -> None:
        last = self._read("state.json").get("last_tick")
        run, missed = due_ticks(self.ticks, last, self.clock(), self.policy)
        for t in missed[-MAX_MISSED_RECORDED:]:
            self.history.append({"event": "missed", "tick": iso(t), "reason": "scheduler down"})
        if missed:
            self.print(f"{len(missed)} missed ticks ({self.policy})")
            self._write("state.json", {"last_tick": missed[-1], "last_tick_iso": iso(missed[-1])})
        for t in run:
            self.tick(t)

    def run(self, max_ticks: int | None = None, poll: float = 1.0) -> None:
        """Runs until stopped (SIGINT/SIGTERM) or after ``max_ticks`` ticks."""
        self._hold_process_lock()
        previous = {
            sig: signal.signal(sig, lambda *_: setattr(self, "_stop", True))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.client  # noqa: B018 - fail now if the cluster is unreachable
            self.print(f"scheduling {self.pipeline.name} on {self.client.address}")
            self._catch_up()
            done = 0
            while not self._stop and (max_ticks is None or done < max_ticks):
                last = self._read("state.json").get("last_tick") or self.clock()
                nxt = self.ticks.next_after(max(last, self.clock() - 1e-6))
                while not self._stop and self.clock() < nxt:
                    self.sleep(min(poll, max(0.0, nxt - self.clock())))
                    try:
                        self.running_job()  # records outcomes as soon as jobs end
                    except submit_mod.SubmitError as e:
                        self.print(f"cannot check the running job: {e}")
                if self._stop:
                    break
                self.tick(nxt)
                done += 1
        except submit_mod.SubmitError as e:
            raise ScheduleError(str(e), e.code) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_process_lock()
