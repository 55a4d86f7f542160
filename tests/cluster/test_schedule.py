"""The scheduler's clock logic (no cluster): tick times, missed-tick policies, history, ids;
and the shipped retraining pipeline validates."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from cluster_helpers import PIPELINE, ROOT, cli_env

from pipelines import spec
from pipelines.schedule import History, ScheduleError, Ticks, due_ticks, format_history, iso
from pipelines.submit import SubmitError, check_storage, entrypoint, project_path, submission_id


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
        project_path(outside)
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
