"""Data files that state numbers they do not hold, or that libraries choke on (issue 16, items
5, 6 and 7), as stages of one pipeline on the session's Ray:

- a label of 10**12 is quarantined (labels stay below ``MAX_CLASSES``) and the split loops over
  the labels present, never ``range(label)``; an IDX header declaring billions of records in a
  small file is refused before any task is planned;
- a Parquet ``list<int64>`` column, duplicate column names (Parquet, CSV), a label-only CSV
  and an empty delimiter are one line of raypipe's own naming the file, not a library's error;
- two 1 MB non-numeric cells give a bounded error, run record, report and `show`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability_helpers import assert_one_line_error, invoke

from pipelines import engine, spec

pytestmark = pytest.mark.reliability

MB = 1 << 20


def make_inputs(d: Path) -> dict[str, tuple[dict, str]]:
    """{stage: (data.prepare source, words of its one-line error; "" when it succeeds)}."""
    rows = "".join(f"{i},{i % 2}\n" for i in range(8))
    (d / "huge-label.csv").write_text(f"x,label\n{rows}9,1000000000000\n")
    (d / "huge-cells.csv").write_text(f"x,label\n{'v' * MB},0\n{'w' * MB},1\n1,0\n")
    (d / "label-only.csv").write_text("label\n0\n1\n")
    (d / "dup.csv").write_text("x,x,label\n1,2,0\n3,4,1\n")
    listed = pa.array([[1, 2], [3]], pa.list_(pa.int64()))
    pq.write_table(pa.table({"x": listed, "label": [0, 1]}), d / "list.parquet")
    dup = pa.table([pa.array([1, 2]), pa.array([3, 4]), pa.array([0, 1])], ["x", "x", "label"])
    pq.write_table(dup, d / "dup.parquet")
    (d / "images.idx").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", 4_000_000_000, 8, 8))
    (d / "labels.idx").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 1) + b"\0")
    csv = lambda name: {"kind": "csv", "paths": [str(d / name)]}  # noqa: E731
    parquet = lambda name: {"kind": "parquet", "paths": [str(d / name)]}  # noqa: E731
    idx = {"kind": "mnist_idx", "images": [str(d / "images.idx")]}
    idx["labels"] = [str(d / "labels.idx")]
    return {
        "huge_label": (csv("huge-label.csv"), ""),
        "huge_cells": (csv("huge-cells.csv"), "were quarantined"),
        "label_only": (csv("label-only.csv"), "label-only.csv: no feature columns"),
        "dup_csv": (csv("dup.csv"), "dup.csv: duplicate column name(s) 'x'"),
        "list_column": (parquet("list.parquet"), "list.parquet: column 'x' holds list<"),
        "dup_parquet": (parquet("dup.parquet"), "dup.parquet: duplicate column name(s) 'x'"),
        "idx_declares_billions": (idx, "images.idx: the header declares 4,000,000,000 records"),
    }


def test_numbers_in_files_and_library_errors_are_bounded(ray_local, tmp_path):
    cases = make_inputs(tmp_path)
    stages = "".join(
        f"  {name}:\n    uses: data.prepare\n    with: {{source: {json.dumps(source)}, "
        "split: {val: 0.25, test: 0.0}, clean: {max_rejected_fraction: 0.5}}\n"
        for name, (source, _) in cases.items()
    )
    store = tmp_path / "store"
    path = tmp_path / "p.yaml"
    path.write_text(f"name: data-limits\nstorage: {store}\nstages:\n{stages}")
    lines: list[str] = []
    record = engine.run_pipeline(spec.load(path), printer=lines.append)
    for name, (_, words) in cases.items():
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
    assert max(map(len, lines)) < 2000, max(map(len, lines))
    run_dir = store / "runs" / record.run_id
    code, shown = invoke("show", record.run_id, "--storage", str(store))
    code_report, _ = invoke("report", record.run_id, "--storage", str(store))
    assert (code, code_report) == (0, 0), shown
    assert len(shown) < 20_000 and (run_dir / "run.json").stat().st_size < 200_000
    assert (run_dir / "report.html").stat().st_size < 300_000


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
