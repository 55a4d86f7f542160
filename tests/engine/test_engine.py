"""The engine on real Ray: parallel stages, cache, force, corruption, failures, kill + resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import engine, spec
from pipelines.store import Store


def pipeline(tmp_path: Path, stages: str, *, storage: str | None = None, overrides=()):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: t\nstorage: {storage or tmp_path / 'store'}\nstages:\n{stages}")
    return spec.load(path, list(overrides))


DIAMOND = """\
  a: {uses: test.sleep, with: {seconds: 1.5, value: 1}}
  b: {uses: test.sleep, with: {seconds: 1.5, value: 2}}
  c: {uses: test.sleep, needs: [a, b], with: {value: 3}}
  d: {uses: test.sleep, needs: [c], with: {value: 4}}
  e: {uses: test.sleep, with: {value: 5}}
"""


def run(p, **kw):
    lines: list[str] = []
    record = engine.run_pipeline(p, printer=lines.append, **kw)
    return record, lines


def value_of(record, stage) -> float:
    return json.loads((Path(record.stages[stage].artifact) / "out.json").read_text())["value"]


def test_parallel_stages_overlap_and_dependents_wait(ray_local, tmp_path):
    record, _ = run(pipeline(tmp_path, DIAMOND))
    assert record.ok, record.error
    st = record.stages
    # a and b ran at the same time; c started only after both ended.
    assert st["a"].start < st["b"].end and st["b"].start < st["a"].end
    assert st["c"].start >= max(st["a"].end, st["b"].end)
    assert st["d"].start >= st["c"].end
    assert value_of(record, "d") == 1 + 2 + 3 + 4
    saved = json.loads((tmp_path / "store" / "runs" / record.run_id / "run.json").read_text())
    assert saved["status"] == "succeeded" and set(saved["stages"]) == set("abcde")
    manifest = json.loads((Path(st["c"].artifact) / "manifest.json").read_text())
    assert manifest["component"] == "test.sleep" and manifest["files"]["out.json"]["sha256"]
    assert set(manifest["inputs"]) == {"a", "b"} and manifest["config"]["value"] == 3


def test_rerun_is_all_cached_and_a_change_recomputes_only_descendants(ray_local, tmp_path):
    first, _ = run(pipeline(tmp_path, DIAMOND))
    second, _ = run(pipeline(tmp_path, DIAMOND))
    assert second.ok and all(s.cache_hit for s in second.stages.values())
    assert second.run_id != first.run_id
    changed, _ = run(pipeline(tmp_path, DIAMOND, overrides=["b.value=20"]))
    hits = {name: s.cache_hit for name, s in changed.stages.items()}
    assert hits == {"a": True, "b": False, "c": False, "d": False, "e": True}
    assert value_of(changed, "d") == 1 + 20 + 3 + 4


def test_force_recomputes_stage_and_descendants(ray_local, tmp_path):
    run(pipeline(tmp_path, DIAMOND))
    forced, _ = run(pipeline(tmp_path, DIAMOND), force=["c"])
    hits = {name: s.cache_hit for name, s in forced.stages.items()}
    assert hits == {"a": True, "b": True, "c": False, "d": False, "e": True}
    with pytest.raises(spec.PipelineError, match="no stage named 'zz'"):
        engine.Runner(pipeline(tmp_path, DIAMOND), force=["zz"])


@pytest.mark.reliability
@pytest.mark.parametrize("damage", ["delete", "corrupt", "truncate", "manifest"])
def test_broken_cached_artifact_is_detected_and_recomputed(ray_local, tmp_path, damage):
    first, _ = run(pipeline(tmp_path, DIAMOND))
    art = Path(first.stages["c"].artifact)
    target = art / "out.json"
    if damage == "delete":
        target.unlink()
    elif damage == "corrupt":
        target.write_text(target.read_text().replace("6", "7"))
    elif damage == "truncate":
        target.write_text("")
    else:
        (art / "manifest.json").unlink()
    again, lines = run(pipeline(tmp_path, DIAMOND))
    assert again.ok
    assert not again.stages["c"].cache_hit
    assert again.stages["a"].cache_hit and again.stages["b"].cache_hit
    if damage != "manifest":
        assert "out.json" in again.stages["c"].recomputed_because
        assert any("cached artifact is broken" in line for line in lines)
    assert value_of(again, "c") == 6
    Store(str(tmp_path / "store")).verify("test.sleep", again.stages["c"].cache_key)


@pytest.mark.reliability
def test_failing_stage_fails_run_publishes_nothing_and_skips_dependents(ray_local, tmp_path):
    stages = """\
  ok: {uses: test.sleep, with: {value: 1}}
  bad: {uses: test.fail, needs: [ok], with: {message: boom at row 7}}
  after: {uses: test.sleep, needs: [bad]}
  other: {uses: test.sleep, with: {seconds: 0.5}}
"""
    record, _ = run(pipeline(tmp_path, stages))
    assert record.status == "failed"
    assert record.stages["bad"].status == "failed"
    assert record.stages["bad"].error == "RuntimeError: boom at row 7"
    trace = record.stages["bad"].traceback
    assert "raise RuntimeError(config.message)" in trace and "\x1b[" not in trace
    assert record.stages["after"].status == "skipped"
    assert record.stages["other"].status == "succeeded"
    assert "stage 'bad' failed" in record.error
    artifacts = tmp_path / "store" / "artifacts"
    assert not (artifacts / "test.fail").exists(), "a failed stage published an artifact"
    assert not list((artifacts / ".tmp").iterdir()), "a failed stage left its output behind"


def test_store_on_a_pyarrow_uri(ray_local, tmp_path):
    uri = f"file://{tmp_path}/uri-store"
    first, _ = run(pipeline(tmp_path, DIAMOND, storage=uri))
    assert first.ok, first.error
    # Another store with the same stage keys but other bytes (each out.json holds its pid):
    # the local copies of the two stores' artifacts must never be mixed up.
    other, _ = run(pipeline(tmp_path, DIAMOND, storage=f"file://{tmp_path}/other-store"))
    assert other.ok and other.stages["a"].cache_key == first.stages["a"].cache_key
    second, lines = run(pipeline(tmp_path, DIAMOND, storage=uri))
    assert all(s.cache_hit for s in second.stages.values()), lines
    assert engine.load_record(Store(uri), first.run_id).status == "succeeded"


def _cli(*args, **kw):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "pipelines.cli", *args], env


def test_cli_run_exit_codes_and_show(tmp_path):
    stages = "  a: {uses: test.sleep}\n  b: {uses: test.fail, needs: [a]}\n"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'store'}\nstages:\n{stages}")
    cmd, env = _cli("run", str(path))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stage 'b' failed: RuntimeError: this stage always fails" in result.stderr
    run_id = result.stdout.split()[1]
    cmd, env = _cli("show", run_id, "--storage", str(tmp_path / "store"), "--json")
    shown = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    record = json.loads(shown.stdout)
    assert record == json.loads((tmp_path / "store" / "runs" / run_id / "run.json").read_text())
    cmd, env = _cli("show", "no-such-run", "--storage", str(tmp_path / "store"))
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


@pytest.mark.reliability
def test_driver_killed_mid_stage_then_resume(tmp_path):
    """SIGKILL the driver during a long stage; `raypipe resume` finishes without redoing."""
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"name: killed\nstorage: {store}\nstages:\n"
        "  first: {uses: test.sleep, with: {value: 1, payload_bytes: 100000}}\n"
        "  long: {uses: test.sleep, needs: [first], with: {seconds: 30, value: 2}}\n"
        "  last: {uses: test.sleep, needs: [long], with: {value: 3}}\n"
    )
    cmd, env = _cli("run", str(path))
    driver = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        run_dir = None
        while time.time() < deadline:
            runs = list((store / "runs").glob("*/run.json")) if (store / "runs").exists() else []
            if runs:
                run_dir = runs[0].parent
                stages = json.loads(runs[0].read_text())["stages"]
                if stages["long"]["status"] == "running":
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the long stage never started")
        time.sleep(1.0)  # well inside the long stage
        cmd, env = _cli("resume", run_dir.name, "--storage", str(store))
        early = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert early.returncode == 2 and "still running (pid" in early.stderr, early.stderr
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        # The driver's embedded Ray leaves helper processes in its process group: stop them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    run_id = run_dir.name
    dead = json.loads((run_dir / "run.json").read_text())
    assert dead["status"] == "running" and dead["stages"]["long"]["status"] == "running"
    first_manifest = (Path(dead["stages"]["first"]["artifact"]) / "manifest.json").read_text()
    # No artifact of the interrupted stage was published.
    assert not (
        store / "artifacts" / "test.sleep" / str(dead["stages"]["long"]["cache_key"])
    ).exists()

    cmd, env = _cli("resume", run_id, "--storage", str(store))
    resumed = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=240, start_new_session=True
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "first: completed before the resume; kept" in resumed.stdout
    final = json.loads((run_dir / "run.json").read_text())
    assert final["status"] == "succeeded" and final["resumed"] == 1
    assert final["stages"]["first"]["attempts"] == 1
    assert final["stages"]["long"]["attempts"] == 2
    # The completed stage was not recomputed: its artifact is the very same.
    assert (
        Path(final["stages"]["first"]["artifact"]) / "manifest.json"
    ).read_text() == first_manifest
    assert (
        json.loads((Path(final["stages"]["last"]["artifact"]) / "out.json").read_text())["value"]
        == 6
    )


def test_an_edited_source_file_is_read_again(ray_local, tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    stages = (
        "  prepare:\n    uses: data.prepare\n"
        f"    with: {{source: {{kind: csv, paths: [{csv}]}}, split: {{val: 0.2, test: 0.2}}}}\n"
    )
    first, _ = run(pipeline(tmp_path, stages))
    assert first.stages["prepare"].metrics["data/rows_in"] == 40
    again, _ = run(pipeline(tmp_path, stages))
    assert again.stages["prepare"].cache_hit
    csv.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(60)))
    stat = csv.stat()
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited, _ = run(pipeline(tmp_path, stages))
    assert not edited.stages["prepare"].cache_hit
    assert edited.stages["prepare"].metrics["data/rows_in"] == 60
