"""Data files that state numbers they do not hold, or that libraries choke on (issue 16, items
5, 6 and 7), as stages of one pipeline on the session's Ray:

- a label of 10**12 is quarantined (labels stay below ``MAX_CLASSES``) and the split loops over
  the labels present, never ``range(label)``; an IDX header declaring billions of records in a
  small file is refused before any task is planned;
- a Parquet ``list<int64>`` column, duplicate column names (Parquet, CSV), a label-only CSV
  and an empty delimiter are one line of raypipe's own naming the file, not a library's error;
- two 1 MB non-numeric cells give a bounded error, run record, report, `show` and MLflow tags.

The stages run in the suite's one hostile run (`hostile_run`, tests/reliability/conftest.py).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from reliability_helpers import assert_one_line_error, invoke

pytestmark = pytest.mark.reliability


def test_numbers_in_files_and_library_errors_are_bounded(hostile_run):
    record, store = hostile_run.record, hostile_run.store
    for name, (_, words) in hostile_run.cases.items():
        st = record.stages[name]
        if not words:
            assert st.status == "succeeded", (name, st.error)
            continue
        assert st.status == "failed" and words in (st.error or ""), (name, st.error)
        assert st.error.split(":")[0] in ("SourceError", "RejectedRowsError"), st.error
    dataset = json.loads((Path(record.stages["huge_label"].artifact) / "dataset.json").read_text())
    assert dataset["num_classes"] == 2, dataset["num_classes"]
    assert dataset["accounting"]["quarantined_by_reason"] == {"label_out_of_range": 1}
    # Two megabytes of cells cost a bounded prefix everywhere they are told.
    error = record.stages["huge_cells"].error
    assert "'vvvv" in error and "more characters" in error and len(error) < 1200, len(error)
    assert max(map(len, hostile_run.lines)) < 2000, max(map(len, hostile_run.lines))
    run_dir = store / "runs" / record.run_id
    code, shown = invoke("show", record.run_id, "--storage", str(store))
    code_report, _ = invoke("report", record.run_id, "--storage", str(store))
    assert (code, code_report) == (0, 0), shown
    assert len(shown) < 20_000 and (run_dir / "run.json").stat().st_size < 200_000
    # (The report embeds Plotly's script, megabytes of its own: what matters is that no more
    # than a prefix of a cell reaches it, nor the record.)
    for name in ("report.html", "run.json"):
        text = (run_dir / name).read_text()
        assert "v" * 200 not in text and "w" * 200 not in text, name
    with sqlite3.connect(store / "mlflow.db") as db:
        longest = db.execute("select max(length(value)) from tags").fetchone()[0]
    assert longest <= 5000, longest


def test_an_empty_or_long_delimiter_is_refused_naming_the_key(tmp_path):
    for delimiter in ("", ";;", "\n"):
        path = tmp_path / "p.yaml"
        source = {"kind": "csv", "paths": ["a.csv"], "delimiter": delimiter}
        path.write_text(
            "name: x\nstages:\n  prep:\n    uses: data.prepare\n"
            f"    with: {{source: {json.dumps(source)}}}\n"
        )
        code, output = invoke("validate", str(path))
        assert_one_line_error(
            code, output, "stages.prep.with.source.csv.delimiter: Value error, a delimiter is one"
        )
