"""Secrets in URIs (issue 16, item 8): credentials in a storage URI, a tracking URI, an
override or a stage's config never reach the console, a run record, the report, MLflow or a
log; and a tracking server that does not answer costs seconds, not minutes: the run goes on
with tracking marked off."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from reliability_helpers import assert_one_line_error, invoke, leaks

from pipelines import engine, spec
from pipelines.record import RUN_FILE, RunRecord

pytestmark = pytest.mark.reliability


def test_storage_credentials_are_never_printed(tmp_path):
    # (An endpoint that does not answer, with credentials in the URI, for `runs`, `show`,
    # `report`, `resume` and `run`: tests/reliability/test_storage.py, where its retries are
    # waited out once, in parallel.)
    # Credentials as query parameters: pyarrow refuses the URI, naming a parameter.
    in_query = "s3://bucket/x?secret_key=SECRETKEY2&access_key=AKIDSECRET1&token=TOKENVALUE3"
    for command in (["runs"], ["show", "r1"], ["report", "r1"], ["resume", "r1"]):
        code, output = invoke(*command, "--storage", in_query)
        line = assert_one_line_error(code, output, "secret_key=***&access_key=***&token=***")
        assert not leaks(output), line
    # A record written before records were redacted: shown redacted.
    store = tmp_path / "store"
    old = RunRecord("r1", "x", "p.yaml", "s3://AKIDSECRET1:SECRETKEY2@b/x", None, [], [])
    (store / "runs" / "r1").mkdir(parents=True)
    (store / "runs" / "r1" / RUN_FILE).write_text(old.to_json())
    code, output = invoke("show", "r1", "--json", "--storage", str(store))
    assert code == 0 and '"storage": "s3://***@b/x"' in output and not leaks(output), output


def run_quietly(path: Path, overrides: list[str]) -> tuple[RunRecord, list[str], float]:
    lines: list[str] = []
    start = time.time()
    record = engine.run_pipeline(spec.load(path, overrides), printer=lines.append)
    return record, lines, time.time() - start


def everything_written(store: Path, record: RunRecord) -> dict[str, str]:
    """Every file of the run's directory (run.json, the report, ...), by name."""
    folder = store / "runs" / record.run_id
    return {p.name: p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()}


def test_a_silent_tracking_server_and_secrets_in_uris_and_configs(ray_local, tmp_path):
    silent = socket.socket()  # listens, never accepts, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    tracking = f"http://me:PASSWORD4@127.0.0.1:{port}/mlflow?token=TOKENVALUE3"
    message = "cannot reach s3://AKIDSECRET1:SECRETKEY2@bucket/data?region=eu"
    path.write_text(
        f"name: secrets\nstorage: {store}\ntracking: {json.dumps(tracking)}\nstages:\n"
        "  a: {uses: test.sleep}\n  b: {uses: test.fail, needs: [a]}\n"
    )
    try:
        record, lines, seconds = run_quietly(path, [f"b.message={message}"])
    finally:
        silent.close()
    # Tracking was tried, found silent within its bound, and turned off; the run went on.
    assert record.stages["a"].status == "succeeded" and record.stages["b"].status == "failed"
    assert "did not answer within 5 s" in (record.tracking_error or ""), record.tracking_error
    assert any(line.startswith("tracking off: ") for line in lines), lines
    assert seconds < 100, seconds  # MLflow's defaults: 120 s a request, 7 retries
    assert record.tracking == f"http://***@127.0.0.1:{port}/mlflow?token=***", record.tracking
    assert "s3://***@bucket/data?region=eu" in record.stages["b"].error, record.stages["b"].error
    assert record.overrides == ["b.message=cannot reach s3://***@bucket/data?region=eu"]
    code, shown = invoke("show", record.run_id, "--storage", str(store))
    code_json, shown_json = invoke("show", record.run_id, "--json", "--storage", str(store))
    code_report, reported = invoke("report", record.run_id, "--storage", str(store))
    assert (code, code_json, code_report) == (0, 0, 0), shown + shown_json + reported
    written = everything_written(store, record)
    assert {"run.json", "report.html", "pipeline.yaml"} <= set(written)
    # The stage's own config is kept as given (it is its cache key); credentials belong in
    # the environment. Everything else is redacted.
    written["pipeline.yaml"] = written["pipeline.yaml"].replace(message, "")
    for where, text in {"console": "\n".join(lines), "show": shown + shown_json + reported}.items():
        assert not leaks(text), (where, leaks(text))
    for name, text in written.items():
        assert not leaks(text), (name, leaks(text))


def test_mlflow_params_and_tags_are_redacted(hostile_run):
    """The suite's hostile run has a stage whose error holds LEAKY_MESSAGE, given as an
    override: MLflow keeps both redacted."""
    record, store = hostile_run.record, hostile_run.store
    assert record.tracking_error is None and record.mlflow_run_id, record.tracking_error
    assert record.stages["leak"].status == "failed", record.stages["leak"]
    with sqlite3.connect(store / "mlflow.db") as db:
        params = db.execute("select key, value from params").fetchall()
        tags = db.execute("select key, value from tags").fetchall()
    shown = "s3://***@bucket/x?session_token=*** is unreachable"
    assert ("overrides", f"leak.message={shown}") in params, params
    error_tags = [value for key, value in tags if key == "raypipe.error" and shown in value]
    assert error_tags, tags
    assert not leaks(repr(params + tags)), leaks(repr(params + tags))
    assert not leaks("\n".join(hostile_run.lines))
