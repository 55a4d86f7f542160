"""Engine overhead, tracking, CLI-run and cached-rerun figures, as JSON.

    .venv/bin/python benchmarks/engine.py [--only overhead|rerun|tracking|cli|parts] [--stages 20]
        [--rounds 5] [--untracked | --tracking-wait S] [--against CHECKOUT]

1. overhead: a chain of N trivial stages run by the engine (MLflow tracking and the report on,
   as the CLI runs it: what tracking has not logged by the run's end is left to a background
   process), against the same component code run as a chain of plain Ray tasks in the
   same process (same Ray instance), the two sides interleaved in rounds: min/median/max of
   the ratio and of the per-stage overhead in ms, of when the engine's last stage was done
   (before the report is drawn), and of when MLflow had the whole run. Goal: ratio at most 1.5.
   ``--untracked`` runs the chain with no MLflow (the engine's own cost); ``--tracking-wait``
   sets how long a run waits for its tracking before leaving the rest to the background.
2. rerun: `raypipe run pipelines/demo.yaml` (shrunk by the cluster tests' overrides) once,
   then again with every stage cached, each time in a fresh process as a user runs it:
   min/median/max wall time over rounds (goal: under 2 s), beside `raypipe validate` of the
   same file and overrides in the same round (the CLI's floor: Python, parsing, validation),
   and how long after each rerun its MLflow run appears (logged in the background).
3. tracking: what MLflow costs a stage, the nested run the engine logs for it (params, metrics,
   tags, one artifact file): into raypipe's own SQLite database written directly (as the
   engine does once MLflow has made it) and through MLflow's client (write-ahead logged, no
   fsync a commit), and into a database a user names (MLflow's client, SQLite's defaults),
   interleaved in rounds in this process: min/median/max of the ms a stage and the ratios.
4. cli: `raypipe run` of a chain of three trivial stages in a fresh process (its own embedded
   Ray), wall and CPU seconds, MLflow holding the whole run when the command returns; with
   ``--against``, another checkout's run of the same in the same rounds, and the ratios.
5. parts (only when asked for): the chain of 1. as the CLI runs it, with MLflow tracking, the
   report or the record's saves during the run switched off, each alone and all three, against
   the plain chain in the same rounds: what each costs, and what the engine costs without them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The chain's stages are the tests' engine exercisers (test.sleep), registered by name.
os.environ.setdefault("RAYPIPE_COMPONENTS", "tests.engine_components")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # where the cluster tests' helpers import theirs from

from benchmarks.figures import spread  # noqa: E402
from components.api import InputArtifact, Resources, StageContext  # noqa: E402
from pipelines import engine, spec  # noqa: E402
from tests.cluster.cluster_helpers import SHRINK  # noqa: E402
from tests.engine_components import Sleep  # noqa: E402


def plain_stage(prev_dir: str | None, out_dir: str, value: float) -> str:
    """The same component work as one engine stage, with no engine around it."""
    inputs = {}
    if prev_dir:
        inputs["prev"] = InputArtifact(
            "prev",
            Path(prev_dir),
            {"component": "test.sleep", "kind": "test/value", "files": {"out.json": {}}},
        )
    ctx = StageContext(
        stage="s",
        run_id="plain",
        out_dir=Path(out_dir),
        scratch_dir=out_dir,
        inputs=inputs,
        resources=Resources(),
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Sleep().run(ctx, Sleep.Config(value=value))
    return out_dir


def chain_yaml(n: int, storage: Path, first_value: int = 0) -> str:
    lines = [f"name: bench-chain\nstorage: {storage}\nstages:"]
    for i in range(n):
        needs = f", needs: [s{i - 1}]" if i else ""
        lines.append(f"  s{i}: {{uses: test.sleep, with: {{value: {first_value + i}}}{needs}}}")
    return "\n".join(lines) + "\n"


def bench_overhead(n: int, rounds: int, untracked: bool = False) -> dict:
    """The chain of ``n`` stages by the engine and as plain Ray tasks, interleaved in rounds;
    ``untracked``: with no MLflow at all (the engine's own cost)."""
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    remote_plain = ray.remote(num_cpus=0, max_retries=0)(plain_stage)
    ray.get(remote_plain.remote(None, tempfile.mkdtemp(), 0))  # warm a worker
    engine_s, plain_s, last_done_s, in_mlflow_s = [], [], [], []
    # One store for every round, as a user's runs share theirs (MLflow's database is made
    # once); each round's values are new, so no stage is cached.
    store = Path(tempfile.mkdtemp()) / "store"
    for r in range(rounds + 1):  # round 0 warms both sides (imports, MLflow's database)
        path = store.parent / "chain.yaml"
        path.write_text(chain_yaml(n, store, first_value=1000 * r))
        pipeline = spec.load(path)
        t0, wall0 = time.perf_counter(), time.time()
        # As the CLI runs it: MLflow is not waited for (what tracking has not logged when the
        # run is done is left to a background process).
        with _without(("tracking",) if untracked else ()):
            runner = engine.Runner(pipeline, printer=lambda _line: None, track_later=True)
            record = runner.run()
        seconds = time.perf_counter() - t0
        last_done_s.append(max(s.end for s in record.stages.values()) - wall0)
        assert record.ok and not any(s.cache_hit for s in record.stages.values())
        assert (store / "runs" / record.run_id / "report.html").is_file()
        engine_s.append(seconds)
        # Untimed: MLflow has the whole run before the next round starts.
        final = _caught_up(store, record.run_id)
        in_mlflow_s.append(time.perf_counter() - t0)
        assert untracked or final["mlflow_run_id"], final
        assert final["tracking_error"] is None, final["tracking_error"]
        _wait_for_loggers_to_exit()
        plain_s.append(_plain_chain(remote_plain, n))
    ray.shutdown()
    shutil.rmtree(store.parent, ignore_errors=True)
    engine_s, plain_s, last_done_s = engine_s[1:], plain_s[1:], last_done_s[1:]
    in_mlflow_s = in_mlflow_s[1:]
    return {
        "stages": n,
        "rounds": rounds,
        "tracking": None if untracked else {"wait_s": engine.TRACKING_WAIT_S},
        "engine_s": spread(engine_s),
        "plain_ray_tasks_s": spread(plain_s),
        "ratio": spread([e / p for e, p in zip(engine_s, plain_s, strict=True)]),
        "overhead_ms_per_stage": spread(
            [1000 * (e - p) / n for e, p in zip(engine_s, plain_s, strict=True)], 1
        ),
        # When the last stage's artifact was published: the run's result is there; the rest
        # of engine_s is MLflow catching up (and the report).
        "engine_last_stage_done_s": spread(last_done_s),
        "ratio_last_stage_done": spread([d / p for d, p in zip(last_done_s, plain_s, strict=True)]),
        # From the run's start until MLflow has all of it (its driver's tracking, then the
        # background logger's), and that over the plain chain.
        "engine_in_mlflow_s": spread(in_mlflow_s),
        "ratio_in_mlflow": spread([m / p for m, p in zip(in_mlflow_s, plain_s, strict=True)]),
        "goal_ratio_at_most": 1.5,
    }


#: What ``--only parts`` switches off, each alone and all together: MLflow tracking, the
#: report, and the record's saves while the run goes (its final save stays).
PARTS = ("tracking", "report", "record")


@contextlib.contextmanager
def _without(parts: tuple[str, ...]):
    """The engine with ``parts`` (of :data:`PARTS`) switched off in this process, for one run."""
    saved = engine.default_tracking_uri, engine.Runner._write_report, engine.Runner.save
    if "tracking" in parts:
        engine.default_tracking_uri = lambda _store: None  # the only database the chain uses
    if "report" in parts:
        engine.Runner._write_report = lambda _self: None
    if "record" in parts:
        engine.Runner.save = lambda _self, wait=False: None
    try:
        yield
    finally:
        engine.default_tracking_uri, engine.Runner._write_report, engine.Runner.save = saved


def bench_parts(n: int, rounds: int) -> dict:
    """The chain of ``n`` stages as the CLI runs it, then with each of :data:`PARTS` off, then
    with all of them off, against the plain chain, interleaved in rounds (each round's order
    rotated): what each part costs, and what the engine costs with none of them."""
    import ray

    variants = {"whole": (), **{f"no_{p}": (p,) for p in PARTS}, "none_of_them": PARTS}
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    remote_plain = ray.remote(num_cpus=0, max_retries=0)(plain_stage)
    ray.get(remote_plain.remote(None, tempfile.mkdtemp(), 0))  # warm a worker
    store = Path(tempfile.mkdtemp()) / "store"
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, "plain"]}
    made: dict[str, dict[str, bool]] = {}  # what each variant's last run left: switched off?
    value = 0
    for r in range(rounds + 1):  # round 0 warms every side
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in [*names, "plain"]:
            if name == "plain":
                seconds["plain"].append(_plain_chain(remote_plain, n))
                continue
            value += 1000  # new values: no stage is cached
            path = store.parent / "chain.yaml"
            path.write_text(chain_yaml(n, store, first_value=value))
            pipeline = spec.load(path)
            with _without(variants[name]):
                t0 = time.perf_counter()
                record = engine.Runner(pipeline, printer=lambda _line: None, track_later=True).run()
                seconds[name].append(time.perf_counter() - t0)
            assert record.ok and not any(s.cache_hit for s in record.stages.values())
            final = _caught_up(store, record.run_id)  # untimed
            _wait_for_loggers_to_exit()
            made[name] = {
                "mlflow_run": final["mlflow_run_id"] is not None,
                "report": (store / "runs" / record.run_id / "report.html").is_file(),
            }
    ray.shutdown()
    shutil.rmtree(store.parent, ignore_errors=True)
    plain = seconds.pop("plain")[1:]
    return {
        "stages": n,
        "rounds": rounds,
        "plain_ray_tasks_s": spread(plain),
        "ratio": {
            name: spread([e / p for e, p in zip(runs[1:], plain, strict=True)])
            for name, runs in seconds.items()
        },
        "made": made,
        "goal_ratio_at_most": 1.5,
    }


def _plain_chain(remote_plain: Any, n: int) -> float:
    """Seconds for the chain of ``n`` stages as plain Ray tasks, one after the other."""
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prev = None
        for j in range(n):
            prev = ray.get(remote_plain.remote(prev, f"{tmp}/s{j}", j))
        return time.perf_counter() - t0


def _caught_up(store: Path, run_id: str) -> dict:
    """The run's saved record once MLflow has all of it (nothing left to the background)."""
    saved = store / "runs" / run_id / "run.json"
    t0 = time.perf_counter()
    while (final := json.loads(saved.read_text()))["tracked_later"] is not None:
        assert time.perf_counter() - t0 < 300, f"run {run_id} never caught up"
        time.sleep(0.01)
    return final


def _wait_for_loggers_to_exit() -> None:
    """Waits until no background logger (``python -m pipelines.tracking``) is left running:
    one still exiting (MLflow's teardown) would share the CPUs with the next round."""
    t0 = time.perf_counter()
    while subprocess.run(["pgrep", "-f", "pipelines[.]tracking"], capture_output=True).stdout:
        assert time.perf_counter() - t0 < 60, "a background logger did not exit"
        time.sleep(0.01)


def bench_tracking(n: int, rounds: int) -> dict:
    """``n`` stages logged into raypipe's own database, written directly (as the engine does)
    and through MLflow's client, and into a named database (MLflow's client, SQLite's
    defaults), in rounds."""
    import sqlite3

    from pipelines.mlflow_sqlite import SqliteTracker
    from pipelines.record import StageEntry, Status
    from pipelines.tracking import Tracker, open_tracker

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        artifact = root / "artifact"
        artifact.mkdir()
        (artifact / "out.json").write_text('{"value": 1.0}')
        databases = {"own": root / "own" / "mlflow.db", "named": root / "named.db"}
        trackers = {}
        for name, db in databases.items():
            db.parent.mkdir(exist_ok=True)
            uri = f"sqlite:///{db}"
            trackers[name] = Tracker(uri, "bench", str(root / f"{name}-artifacts"), name == "own")
        trackers["own_direct"] = open_tracker(f"sqlite:///{databases['own']}", "bench", None, True)
        assert isinstance(trackers["own_direct"], SqliteTracker)
        for tracker in trackers.values():
            tracker.start("bench", "bench", [], None)
        manifest = {
            "config": {"value": 1.0, "steps": 3},
            "resources": {"workers": 1},
            "files": {"out.json": {"bytes": 14}},
        }
        entry = StageEntry(
            uses="test.sleep",
            status=Status.SUCCEEDED,
            artifact=str(artifact),
            metrics={"value": 1.0, "train/loss": 0.5},
        )
        ms: dict[str, list[float]] = {name: [] for name in trackers}
        for _ in range(rounds + 1):  # round 0 warms them (the first connections, the cache)
            for name, tracker in trackers.items():
                t0 = time.perf_counter()
                for i in range(n):
                    tracker.stage(f"s{i}", entry, manifest)
                ms[name].append(1000 * (time.perf_counter() - t0) / n)
        journal = {}
        for name, db in databases.items():
            with sqlite3.connect(db) as connection:
                journal[name] = connection.execute("PRAGMA journal_mode").fetchone()[0]
    direct, own, named = ms["own_direct"][1:], ms["own"][1:], ms["named"][1:]
    return {
        "stages": n,
        "rounds": rounds,
        "journal_mode": journal,
        "own_database_direct_ms_per_stage": spread(direct, 2),
        "own_database_ms_per_stage": spread(own, 1),
        "named_database_ms_per_stage": spread(named, 1),
        "ratio_direct_over_client": spread([d / o for d, o in zip(direct, own, strict=True)]),
        "ratio_own_over_named": spread([o / m for o, m in zip(own, named, strict=True)]),
    }


def _timed_cli(checkout: Path, *command: str) -> tuple[float, float, str]:
    """Runs ``python -m pipelines.cli COMMAND`` with a checkout's code; returns its wall and CPU
    seconds (its own, user + system: what a loaded machine inflates least) and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *command],
        check=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        cwd=checkout,  # the current directory's `pipelines` wins over the installed one
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, out.stdout


def _printed_run_id(shown: str) -> str:
    """The id of the run a `raypipe run` printed as succeeded."""
    return re.search(r"^run (\S+): succeeded$", shown, re.M).group(1)


def _wait_tracked(store: Path, shown: str) -> float:
    """Seconds until the run printed in ``shown`` has its MLflow run (logged in the
    background after a fully cached run)."""
    run_id = _printed_run_id(shown)
    t0 = time.perf_counter()
    while not json.loads((store / "runs" / run_id / "run.json").read_text())["mlflow_run_id"]:
        assert time.perf_counter() - t0 < 300, f"run {run_id} never reached MLflow"
        time.sleep(0.1)
    return time.perf_counter() - t0


def bench_cached_rerun(rounds: int, storage: str | None, against: str | None) -> dict:
    """The demo's cached rerun in fresh processes; see the module's docstring.

    Args:
        rounds: rounds of (validate, rerun[, the other checkout's rerun]).
        storage: a folder to keep the demo's store in (a second call finds the first run
            cached), else a temporary one.
        against: another checkout of raypipe (e.g. ``git worktree add /tmp/base main``) whose
            cached rerun of the same store runs in the same rounds: the ratio is this
            checkout's time over its.
    """
    # A one-epoch classifier need not pass the shipped gate: the first run must succeed whole.
    overrides = [*SHRINK["demo.yaml"], "gate.min={}"]
    checkouts = {"this": ROOT, **({"against": Path(against).resolve()} if against else {})}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(storage or tmp).resolve() / "store"
        args = ["pipelines/demo.yaml", f"storage={store}", *overrides]
        first, _, _ = _timed_cli(ROOT, "run", *args)
        figures: dict[str, list[float]] = {}
        for _ in range(rounds):
            wall, cpu, _ = _timed_cli(ROOT, "validate", *args)
            figures.setdefault("validate_s", []).append(wall)
            figures.setdefault("validate_cpu_s", []).append(cpu)
            for name, checkout in checkouts.items():
                wall, cpu, shown = _timed_cli(checkout, "run", *args)
                assert shown.count(": cached") == 7 and ": started" not in shown, shown
                figures.setdefault(f"{name}_rerun_s", []).append(wall)
                figures.setdefault(f"{name}_rerun_cpu_s", []).append(cpu)
                # Untimed: the background logger finishes before the next command starts.
                figures.setdefault(f"{name}_in_mlflow_after_s", []).append(
                    _wait_tracked(store, shown)
                )
    ratios = {"rerun_over_validate": ("this_rerun_s", "validate_s")}
    if against:
        ratios["rerun_over_against"] = ("this_rerun_s", "against_rerun_s")
        ratios["rerun_cpu_over_against"] = ("this_rerun_cpu_s", "against_rerun_cpu_s")
    for name, (top, bottom) in ratios.items():
        figures[name] = [a / b for a, b in zip(figures[top], figures[bottom], strict=True)]
    return {
        "overrides": "tests/cluster/cluster_helpers.py SHRINK['demo.yaml'] + gate.min={}",
        "against": against,
        "rounds": rounds,
        "first_run_s": round(first, 1),
        **{name: spread(values) for name, values in figures.items()},
        "goal_cached_rerun_under_s": 2.0,
    }


def bench_cli_run(rounds: int, against: str | None) -> dict:
    """A chain of three trivial stages run by `raypipe run` in a fresh process (an embedded
    Ray each time), as a user runs a small pipeline; with ``against``, the same with another
    checkout's code in the same rounds. Each run's values are new, so every stage runs. The
    store (and raypipe's MLflow database in it) is made by an untimed first run, as a user's
    first run made theirs."""
    checkouts = {"this": ROOT, **({"against": Path(against).resolve()} if against else {})}
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: Path(tmp) / f"store-{name}" for name in checkouts}
        for r in range(rounds + 1):
            for name, checkout in checkouts.items():
                path = Path(tmp) / f"{name}.yaml"
                path.write_text(chain_yaml(3, stores[name], first_value=1000 * r))
                wall, cpu, shown = _timed_cli(checkout, "run", str(path))
                run_id = _printed_run_id(shown)
                saved = json.loads((stores[name] / "runs" / run_id / "run.json").read_text())
                if name == "this":  # MLflow has the whole run when the command returns
                    assert saved["mlflow_run_id"] and saved["tracked_later"] is None, shown
                if r:  # round 0 makes the stores
                    figures.setdefault(f"{name}_run_s", []).append(wall)
                    figures.setdefault(f"{name}_run_cpu_s", []).append(cpu)
                _wait_for_loggers_to_exit()
    if against:
        for what in ("run_s", "run_cpu_s"):
            figures[f"{what}_over_against"] = [
                a / b
                for a, b in zip(figures[f"this_{what}"], figures[f"against_{what}"], strict=True)
            ]
    return {
        "stages": 3,
        "against": against,
        "rounds": rounds,
        **{name: spread(values) for name, values in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["overhead", "rerun", "tracking", "cli", "parts"])
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--storage", help="rerun: keep the demo's store here (default: temp)")
    parser.add_argument(
        "--against", help="rerun, cli: another checkout to compare, in the same rounds"
    )
    parser.add_argument(
        "--tracking-wait",
        type=float,
        help="overhead: seconds a run waits for its tracking before leaving the rest to the "
        f"background logger (default {engine.TRACKING_WAIT_S:g})",
    )
    parser.add_argument(
        "--untracked", action="store_true", help="overhead: no MLflow (the engine's own cost)"
    )
    args = parser.parse_args()
    if args.tracking_wait is not None:
        engine.TRACKING_WAIT_S = args.tracking_wait
    result = {}
    if args.only in (None, "overhead"):
        result["overhead"] = bench_overhead(args.stages, args.rounds, args.untracked)
    if args.only in (None, "rerun"):
        result["cached_rerun"] = bench_cached_rerun(args.rounds, args.storage, args.against)
    if args.only in (None, "tracking"):
        result["tracking"] = bench_tracking(args.stages, args.rounds)
    if args.only in (None, "cli"):
        result["cli_run"] = bench_cli_run(args.rounds, args.against)
    if args.only == "parts":  # a diagnosis, not a figure of the full run
        result["parts"] = bench_parts(args.stages, args.rounds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
