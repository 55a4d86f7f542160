"""Damaged run records (issue 16, item 1): truncated, mistyped, non-UTF-8, oversized, not a
file, or naming paths outside the store. `show`, `runs`, `resume` and `report` answer with one
line naming the file and key (exit 2), and one damaged record never hides the others: `runs`
lists the good records and each damaged one with why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from reliability_helpers import assert_one_line_error, good_record, invoke

from pipelines.record import PIPELINE_FILE, RUN_FILE, RunRecord, StageEntry
from pipelines.store import Store

pytestmark = pytest.mark.reliability


def with_(**changes) -> bytes:
    """A good record with some keys replaced (a key set to ... is removed)."""
    data = good_record("{id}")
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


# Each: the bytes of run.json (``{id}`` is the run's id), and words the error must hold.
DAMAGED = {
    "truncated": (b'{"run_id": "{id}", "pipel', "not JSON"),
    "empty": (b"", "not JSON"),
    "not_utf8": (b'\xff\xfe{"run_id": "{id}"}', "not UTF-8"),
    "a_list": (b"[1, 2, 3]", "Input should be"),
    "no_run_id": (with_(run_id=...), "run_id: Field required"),
    "stages_a_string": (with_(stages="abc"), "stages: Input should be a valid dictionary"),
    "stage_without_uses": (with_(stages={"a": {"status": "failed"}}), "stages.a.uses"),
    "stage_of_unknown_status": (
        with_(stages={"a": {"uses": "test.sleep", "status": "exploded"}}),
        "stages.a.status",
    ),
    "seconds_a_word": (
        with_(stages={"a": {"uses": "test.sleep", "seconds": "fast"}}),
        "stages.a.seconds",
    ),
    "time_infinite": (with_(created=float("inf")), "created: Input should be a finite number"),
    "metrics_a_list": (with_(stages={"a": {"uses": "x.y", "metrics": [1]}}), "stages.a.metrics"),
    "overrides_numbers": (with_(overrides=[1, 2]), "overrides.0"),
    "nested_100k_deep": (
        b'{"run_id": "{id}", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "not JSON",
    ),
    "a_5000_digit_number": (b'{"run_id": "{id}", "resumed": 1' + b"0" * 5000 + b"}", "not JSON"),
    "stage_name_a_path": (with_(stages={"../x": {"uses": "test.sleep"}}), "not a valid name"),
    "component_a_path": (
        with_(stages={"a": {"uses": "../../etc", "status": "succeeded"}}),
        "stages.a.uses: not a valid name",
    ),
    "cache_key_a_path": (
        with_(stages={"a": {"uses": "test.sleep", "cache_key": "../../../etc"}}),
        "stages.a.cache_key",
    ),
    "pipeline_name_with_escapes": (with_(pipeline="p\x1b[2J"), "pipeline: not a valid name"),
    "another_runs_id": (with_(run_id="elsewhere"), "run_id: 'elsewhere' is not this run's id"),
}


def plant(store: Path, run_id: str, content: bytes | str) -> Path:
    folder = store / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_FILE
    if content == "fifo":
        os.mkfifo(path)  # a FIFO with no writer: opening it must not block
    elif content == "directory":
        path.mkdir()
    elif content == "sparse_40MiB":
        with open(path, "wb") as f:
            f.truncate(40 << 20)  # a sparse file: sized without being written
    else:
        path.write_bytes(content.replace(b"{id}", run_id.encode()))
    return path


SPECIAL = {
    "fifo": "not JSON",  # read as empty, at once
    "directory": "Is a directory",
    "sparse_40MiB": "41,943,040 bytes",
}


def test_damaged_records_are_one_line_and_never_hide_the_others(tmp_path):
    store = tmp_path / "store"
    cases = {**DAMAGED, **{k: (k, w) for k, w in SPECIAL.items()}}
    for i, (name, (content, _)) in enumerate(cases.items()):
        plant(store, f"r{i:02d}-{name}", content)
    plant(store, "r00-aaa-good", json.dumps(good_record("r00-aaa-good")).encode())
    plant(store, "r99-zzz-good", json.dumps(good_record("r99-zzz-good")).encode())

    for i, (name, (_, words)) in enumerate(cases.items()):
        run_id = f"r{i:02d}-{name}"
        for command in (["show", run_id], ["report", run_id]):
            code, output = invoke(*command, "--storage", str(store))
            line = assert_one_line_error(code, output, words)
            assert f"runs/{run_id}/{RUN_FILE}" in line, line
            assert "\x1b" not in output
        assert not (store / "runs" / run_id / "report.html").exists()
        code, output = invoke("resume", run_id, "--storage", str(store))
        assert_one_line_error(code, output, words)

    code, output = invoke("runs", "--storage", str(store))
    assert code == 0, output
    lines = output.splitlines()
    assert len(lines) == len(cases) + 2, output
    assert lines[0].startswith("r00-aaa-good  good"), output
    assert lines[-1].startswith("r99-zzz-good  good"), output
    for i, (name, (_, words)) in enumerate(cases.items()):
        (row,) = [line for line in lines if line.startswith(f"r{i:02d}-{name}  damaged: ")]
        assert words in row, row
    assert "\x1b" not in output
    code, output = invoke("runs", "--storage", str(store), "--pipeline", "good")
    assert code == 0 and "r00-aaa-good" in output and "r99-zzz-good" in output, output
    assert f"{len(cases)} damaged run records left out" in output
    code, output = invoke("show", "r00-truncated", "--json", "--storage", str(store))
    assert_one_line_error(code, output, "not JSON")
    for good in ("r00-aaa-good", "r99-zzz-good"):
        code, output = invoke("show", good, "--storage", str(store))
        assert code == 0 and f"run {good}  pipeline good  status succeeded" in output, output


def test_run_ids_that_are_not_names(tmp_path):
    store = tmp_path / "store"
    (store / "runs" / "evil\nline").mkdir(parents=True)
    (store / "runs" / "evil\nline" / RUN_FILE).write_text(json.dumps(good_record("x")))
    for bad in ("evil\nline", "a b", "..", ".hidden", "x" * 500):
        code, output = invoke("show", bad, "--storage", str(store))
        assert_one_line_error(code, output, "not a run id")
    code, output = invoke("runs", "--storage", str(store))
    assert code == 0 and output.splitlines() == [
        "evil\\nline  damaged: " + f"{store}: no run 'evil\\nline': not a run id"
    ], output


def test_resume_refuses_a_record_that_disagrees_with_its_pipeline(tmp_path):
    store = Store(str(tmp_path / "store"))
    record = RunRecord("r1", "x", "p.yaml", store.root, None, [], [])
    record.stages = {"a": StageEntry(uses="test.sleep"), "b": StageEntry(uses="test.sleep")}
    store.write_run_file("r1", RUN_FILE, record.to_json())
    code, output = invoke("resume", "r1", "--storage", store.root)
    assert_one_line_error(code, output, f"runs/r1/{PIPELINE_FILE}: missing")
    store.write_run_file(
        "r1", PIPELINE_FILE, "name: x\nstages:\n  a: {uses: test.sleep}\n  c: {uses: test.fail}\n"
    )
    code, output = invoke("resume", "r1", "--storage", store.root)
    assert_one_line_error(code, output, f"runs/r1/{RUN_FILE}: stages: the record's stages (a, b)")
    store.write_run_file("r1", PIPELINE_FILE, "name: x\nstages: {a: {uses: test.sleep}\n")
    code, output = invoke("resume", "r1", "--storage", store.root)
    assert_one_line_error(code, output, f"runs/r1/{PIPELINE_FILE}: stages: invalid YAML at line")


def test_an_os_error_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path, monkeypatch):
    """An error that is not raypipe's own account of bad input (here the OS refusing to write
    the report over a folder of its name) is one line naming a log file; the log holds the
    command and the whole traceback."""
    store = tmp_path / "store"
    plant(store, "r1", json.dumps(good_record("r1")).encode())
    (store / "runs" / "r1" / "report.html").mkdir()
    monkeypatch.setenv("RAYPIPE_LOG_DIR", str(tmp_path / "logs"))
    code, output = invoke("report", "r1", "--storage", str(store))
    line = assert_one_line_error(code, output, "IsADirectoryError", "report.html", "traceback in")
    [log] = (tmp_path / "logs").iterdir()
    assert line.endswith(f"(traceback in {log})"), line
    text = log.read_text()
    assert text.startswith(f"raypipe report r1 --storage {store}\n"), text[:200]
    assert "Traceback (most recent call last)" in text and "IsADirectoryError" in text


def test_a_bug_is_exit_3_naming_its_log_and_a_bad_plugin_variable_is_bad_input(
    tmp_path, monkeypatch
):
    """What raypipe cannot account for (here a report writer that divides by zero) is a bug:
    exit 3, one line naming the log with the traceback. A module in RAYPIPE_COMPONENTS that
    cannot be imported is the user's environment, not a bug: exit 2, naming the variable."""
    from components import registry
    from pipelines import report

    store = tmp_path / "store"
    plant(store, "r1", json.dumps(good_record("r1")).encode())
    monkeypatch.setenv("RAYPIPE_LOG_DIR", str(tmp_path / "logs"))

    def broken(*_args, **_kwargs):
        return 1 / 0

    monkeypatch.setattr(report, "write_report", broken)
    code, output = invoke("report", "r1", "--storage", str(store))
    line = assert_one_line_error(code, output, "a bug in raypipe", "ZeroDivisionError", exit_code=3)
    [log] = (tmp_path / "logs").iterdir()
    assert line.endswith(f"(traceback in {log})") and "1 / 0" in log.read_text()

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: p\nstorage: {store}\nstages:\n  a: {{uses: data.prepare}}\n")
    for value, problem in (
        ("no_such_module_here", "'no_such_module_here' cannot be imported here"),
        ("json", "'json' has no COMPONENTS dict"),
    ):
        monkeypatch.setenv(registry.PLUGINS_ENV, value)
        registry._table.cache_clear()
        registry.get.cache_clear()
        try:
            code, output = invoke("run", str(pipeline))
        finally:
            registry._table.cache_clear()
            registry.get.cache_clear()
        assert_one_line_error(code, output, "$RAYPIPE_COMPONENTS", problem)
