"""The scheduler's clock logic (no cluster): tick times, missed-tick policies, history, ids;
what a submission ships and where it goes; the shipped retraining pipeline validates and, on
the session's cluster, runs on a schedule without overlapping itself."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from cluster_helpers import (
    PIPELINE,
    ROOT,
    cli,
    cli_env,
    history,
    shrunk,
    start_cli,
    stop,
    wait_for,
)

from pipelines import spec
from pipelines.schedule import History, ScheduleError, Ticks, due_ticks, format_history, iso
from pipelines.submit import (
    EXCLUDES,
    JobsClient,
    SubmitError,
    check_storage,
    entrypoint,
    project_path,
    project_root,
    submission_id,
)


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def test_cron_and_interval_ticks():
    weekly = Ticks(cron="0 3 * * 1")
    # 2026-11-22 is a Sunday: the next tick is Monday 03:00 UTC.
    assert iso(weekly.next_after(ts("2026-11-22T13:00:00"))) == "2026-11-23T03:00:00Z"
    every = Ticks(every=2)
    assert every.next_after(101.0) == 102.0 and every.next_after(102.0) == 104.0
    assert every.between(100.0, 107.0) == [102.0, 104.0, 106.0]
    with pytest.raises(ScheduleError, match="5-field cron"):
        Ticks(cron="* * *")
    with pytest.raises(ScheduleError, match="give a cron"):
        Ticks()


def test_missed_tick_policies():
    every = Ticks(every=10)
    assert due_ticks(every, None, 1000.0, "skip") == ([], [])  # first start: nothing missed
    assert due_ticks(every, 960.0, 1005.0, "skip") == ([], [970.0, 980.0, 990.0, 1000.0])
    assert due_ticks(every, 960.0, 1005.0, "run_once") == ([1000.0], [970.0, 980.0, 990.0])
    assert due_ticks(every, 1000.0, 1005.0, "run_once") == ([], [])
    with pytest.raises(ScheduleError, match="unknown"):
        due_ticks(every, 0.0, 1.0, "run_all")


def test_history_survives_a_torn_line_and_formats_outcomes(tmp_path):
    history = History(tmp_path, "p")
    history.append({"event": "submitted", "tick": "t1", "job": "raypipe-p-1", "status": "PENDING"})
    history.append({"event": "skipped", "tick": "t2", "job": "raypipe-p-1", "reason": "busy"})
    with history.path.open("a") as f:
        f.write('{"event": "fini')  # a crash mid-write
    history.append({"event": "finished", "tick": "t1", "job": "raypipe-p-1", "status": "FAILED"})
    events = History(tmp_path, "p").read()
    assert [e["event"] for e in events] == ["submitted", "skipped", "finished"]
    lines = format_history(events)
    assert len(lines) == 2 and lines[0].split()[1:] == ["submitted", "raypipe-p-1", "FAILED"]


def test_submission_ids_entrypoint_and_storage_rules(tmp_path):
    p = spec.load(ROOT / PIPELINE)
    same = spec.load(ROOT / PIPELINE)
    assert submission_id(p, "k") == submission_id(same, "k")
    assert submission_id(p, "k") != submission_id(p, "k2")
    changed = spec.load(ROOT / PIPELINE, ["left.seconds=2"])
    assert submission_id(changed, "k") != submission_id(p, "k")
    assert submission_id(p, "k").startswith("raypipe-cluster-sleep-")
    assert project_path(ROOT / PIPELINE) == PIPELINE
    outside = tmp_path / "p.yaml"
    outside.write_text((ROOT / PIPELINE).read_text())
    with pytest.raises(SubmitError, match="must be inside the project"):
        project_path(outside, ROOT)
    assert entrypoint(PIPELINE, ["a.b=c d"]) == (
        f"python -m pipelines.cli run {PIPELINE} 'a.b=c d' --ray-address auto"
    )
    with pytest.raises(SubmitError, match="relative path"):
        check_storage(p, 1, "http://h:8265")  # ./runs would vanish with the job's working_dir
    with pytest.raises(SubmitError, match="local path"):
        check_storage(spec.load(ROOT / PIPELINE, [f"storage={tmp_path}"]), 2, "http://h:8265")
    check_storage(spec.load(ROOT / PIPELINE, [f"storage={tmp_path}"]), 1, "http://h:8265")
    check_storage(spec.load(ROOT / PIPELINE, ["storage=s3://b/p"]), 5, "http://h:8265")


def test_retrain_pipeline_validates():
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "validate", "pipelines/retrain.yaml"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "prepare: data.prepare" in result.stdout and "classifier: vision.train" in result.stdout
    assert spec.load(ROOT / "pipelines/retrain.yaml").spec.schedule == "0 3 * * 1"


def test_the_project_a_submission_ships_is_said_not_guessed(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYPIPE_PROJECT", raising=False)
    # A checkout: the nearest folder with a pyproject.toml.
    assert project_root(ROOT / PIPELINE) == ROOT
    # A folder of pipeline files and no project: that folder (the cluster's raypipe runs them).
    mine = tmp_path / "mine" / "nightly.yaml"
    mine.parent.mkdir()
    mine.write_text((ROOT / PIPELINE).read_text())
    assert project_root(mine) == mine.parent and project_path(mine) == "nightly.yaml"
    # Said explicitly (the images say /home/ray/raypipe): that folder, and nothing outside it.
    monkeypatch.setenv("RAYPIPE_PROJECT", str(tmp_path))
    assert project_path(mine) == "mine/nightly.yaml"
    with pytest.raises(SubmitError, match="RAYPIPE_PROJECT"):
        project_path(ROOT / PIPELINE)


def test_a_job_ships_every_file_of_the_project_and_no_output():
    """The working_dir as Ray packs it (its own code, the excludes and .gitignore)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list = []
    _dir_travel(ROOT, [_get_excludes(ROOT, EXCLUDES)], files.append, include_gitignore=True)
    shipped = {p.relative_to(ROOT).as_posix() for p in files if p.is_file()}
    code = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/**/*.py") if "/." not in str(p)}
    code = {c for c in code if "__pycache__" not in c and not c.startswith(".")}
    assert {c for c in code if c.startswith(("components/", "pipelines/"))} <= shipped
    assert "components/data/prepare.py" in shipped  # a bare `data` exclude once dropped it
    assert not [f for f in shipped if f.startswith(("runs/", ".venv/", ".git/", ".raypipe/"))]


def test_addresses_have_one_meaning_each(tmp_path):
    env = cli_env(RAYPIPE_CLUSTER_DIR=str(tmp_path))  # no cluster recorded there
    env.pop("RAYPIPE_ADDRESS", None)
    nowhere = cli("submit", PIPELINE, "storage=/tmp/x", env=env)
    assert nowhere.returncode == 2
    assert "no cluster address" in nowhere.stderr and "raypipe cluster up" in nowhere.stderr
    # run's old --address still works, with a notice; a Jobs API URL is not a Ray address.
    old = cli("run", PIPELINE, "--address", "http://127.0.0.1:8265", env=env)
    assert old.returncode == 2, old.stderr
    assert "`--address` of run/resume is deprecated; use --ray-address" in old.stderr
    assert "is a Jobs API (dashboard) address" in old.stderr and "raypipe submit" in old.stderr


@pytest.mark.slow
def test_scheduled_retrain_skips_a_tick_while_it_runs_then_runs_again(pipeline_cluster, tmp_path):
    """`raypipe schedule pipelines/retrain.yaml --every 3` on the session's cluster (found
    without --address): the first tick submits, a tick during that run is skipped, and the
    first tick after it ended submits again; the two jobs never overlap.

    The first run trains for real (a seed no other test uses): a cached rerun of the whole
    pipeline can end within one 3 s tick, leaving no tick to skip."""
    state = tmp_path / "schedules"
    overrides = [*shrunk("retrain.yaml", pipeline_cluster["tmp"]), "classifier.seed=4242"]
    args = ["schedule", "pipelines/retrain.yaml", *overrides]
    scheduler = start_cli(
        *args, "--every", "3", "--state-dir", str(state), env=pipeline_cluster["env"]
    )

    def two_runs_finished():
        events = history(state, "digits-retrain")
        runs = [e["job"] for e in events if e["event"] == "submitted"]
        ended = {e["job"] for e in events if e["event"] == "finished"}
        return events if len(runs) >= 2 and set(runs[:2]) <= ended else None

    try:
        events = wait_for(two_runs_finished, 600, "two scheduled runs of retrain.yaml to end")
    finally:
        out = stop(scheduler)
    order = [(e["event"], e.get("job")) for e in events]
    first, second = [job for event, job in order if event == "submitted"][:2]
    assert first != second
    assert (
        order.index(("submitted", first))
        < order.index(("skipped", first))
        < order.index(("finished", first))
        < order.index(("submitted", second))
    ), out
    finished = {e["job"]: e["status"] for e in events if e["event"] == "finished"}
    assert finished[first] == finished[second] == "SUCCEEDED", out
    ticks = [e["tick"] for e in events if e["event"] in ("submitted", "skipped")]
    assert ticks == sorted(set(ticks)), "a tick was handled twice"
    client = JobsClient(pipeline_cluster["info"].dashboard_url)
    spans = sorted(
        (client.require(j).start_time, client.require(j).end_time) for j in (first, second)
    )
    assert spans[0][1] <= spans[1][0], spans
