"""data.prepare on tables: CSV files read in pieces, regression targets, package data, and bad
input (each a one-line error naming the file and column, or a counted quarantine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_writers import quarantine_rows, run_stage, shard_digests
from tabular_helpers import regression_source

from components.data.prepare import RejectedRowsError
from components.data.sources import SourceError, csv_pieces


def test_csv_pieces_end_at_records_outside_quotes(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'a,b\n1,"x\ny"\n2,"say ""hi"",\nok"\n3,z\n4,w')  # no final newline
    header, pieces = csv_pieces(str(path), 2)
    assert header == 4
    assert [(first, end) for _, _, first, end in pieces] == [(0, 2), (2, 4)]
    data = path.read_bytes()
    assert data[pieces[0][0] : pieces[0][1]] == b'1,"x\ny"\n2,"say ""hi"",\nok"\n'
    assert data[pieces[1][0] : pieces[1][1]] == b"3,z\n4,w"


def test_a_csv_read_in_pieces_gives_the_same_shards(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    n = 57
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=n).round(5),
            "note": [f'line {i}\nwith "quotes", and commas' for i in range(n)],
            "y": rng.normal(size=n).round(5),
        }
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    source = regression_source(tmp_path / "t.csv", "y", ["note"], max_levels=100)
    outs = []
    for name, chunk_rows in (("whole", 1000), ("pieces", 5)):
        out, metrics = run_stage(tmp_path, {"source": source, "chunk_rows": chunk_rows}, name)
        assert metrics["data/rows_in"] == n and metrics["data/quarantined"] == 0
        outs.append(out)
    assert shard_digests(outs[0]) == shard_digests(outs[1])
    train = pd.concat(pd.read_parquet(p) for p in sorted((outs[1] / "train").glob("*.parquet")))
    assert (train["note"].to_numpy() == frame["note"].to_numpy()[train["row_id"]]).all()
    assert (train["target"].to_numpy() == frame["y"].to_numpy()[train["row_id"]]).all()


def test_a_bad_line_in_a_later_piece_is_named_by_its_line_in_the_file(ray_local, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(10)) + "5,1,7,7\n")
    with pytest.raises(SourceError, match=r"ragged.csv: cannot parse CSV: .*line 12, saw 4"):
        run_stage(tmp_path, {"source": {"kind": "csv", "paths": [str(path)]}, "chunk_rows": 4})


def test_parquet_regression_with_a_categorical_of_integers(ray_local, tmp_path):
    table = pa.table(
        {
            "size": pa.array([1.0, 2.0, None, 4.0, 5.0, 6.0, 7.0, 8.0], pa.float64()),
            "zone": pa.array([1, 2, 1, 2, 3, 1, 2, None], pa.int64()),
            "price": pa.array([10.5, 20.0, 31.0, 40.0, 52.0, 61.0, 70.5, 80.0]),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    source = regression_source(tmp_path / "t.parquet", "price", ["zone"], impute="mode")
    out, _ = run_stage(tmp_path, {"source": source, "split": {"val": 0.0, "test": 0.0}})
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["levels"] == {"zone": ["1", "2", "3"]}
    assert dataset["fill"] == {"size": 1.0, "zone": "1"}  # the most frequent; ties: smallest
    assert dataset["accounting"]["imputed_by_column"] == {"size": 1, "zone": 1}
    prices = table.column("price").to_numpy()
    assert dataset["target_normalization"]["mean"] == pytest.approx(prices.mean(), rel=1e-12)
    assert dataset["target_normalization"]["scale"] == pytest.approx(prices.std(), rel=1e-12)


def test_package_paths_resolve_inside_the_installed_package(ray_local, tmp_path, monkeypatch):
    package = tmp_path / "site" / "shipsdata"
    (package / "tables").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (package / "tables" / "t.csv").write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(9)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = {
        "kind": "csv",
        "package": "shipsdata",
        "paths": ["tables/t.csv"],
        "task": "regression",
        "label_column": "y",
    }
    _, metrics = run_stage(tmp_path, {"source": source, "split": {"val": 0.0, "test": 0.0}})
    assert metrics["data/rows_in"] == 9
    missing = {**source, "package": "no_such_package_here"}
    with pytest.raises(SourceError, match="'no_such_package_here' is not installed"):
        run_stage(tmp_path, {"source": missing}, "missing")
    from components.data.config import PrepareConfig

    with pytest.raises(ValueError, match="must be relative to the package's folder"):
        PrepareConfig.model_validate({"source": {**source, "paths": ["../../etc/passwd"]}})


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def bad_tables(d: Path) -> dict[str, tuple[dict, str, str]]:
    """{case: (source, outcome, words)}: ``failed`` with the words in a one-line error, or
    ``quarantined`` with the words as the reason of every quarantined row."""
    rows = "".join(f"{i},{i % 5}.5,{i * 3}\n" for i in range(30))
    no_b = "".join(f"{i},{{b}},{i * 3}\n" for i in range(30))  # column b: all missing
    text_target = "".join(f"{i},{i % 5}.5,much\n" for i in range(30))
    infs = "".join(f"{i},{i % 5}.5,{'inf' if i % 10 == 3 else i * 3}\n" for i in range(30))
    regression = {"kind": "csv", "task": "regression", "label_column": "y"}
    return {
        "non_numeric_target": (
            {**regression, "paths": [_write(d, "text.csv", "a,b,y\n" + text_target)]},
            "failed",
            "30 of 30 input rows (100.0%) were quarantined",
        ),
        "target_with_inf": (
            {**regression, "paths": [_write(d, "inf.csv", "a,b,y\n" + infs)]},
            "quarantined",
            "label_invalid",
        ),
        "all_nan_column_imputed": (
            {
                **regression,
                "paths": [_write(d, "nan.csv", "a,b,y\n" + no_b.format(b="nan"))],
                "impute": "median",
            },
            "failed",
            "column 'b' has no value in the train split to impute from",
        ),
        "all_nan_column_quarantined": (
            {**regression, "paths": [_write(d, "nan2.csv", "a,b,y\n" + no_b.format(b=""))]},
            "failed",
            "missing_value=30",
        ),
        "header_without_the_target": (
            {**regression, "paths": [_write(d, "nohead.csv", "a,b,z\n" + rows)]},
            "failed",
            "nohead.csv: missing column(s) ['y']",
        ),
    }


@pytest.mark.reliability
@pytest.mark.parametrize(
    "case",
    [
        "all_nan_column_imputed",
        "all_nan_column_quarantined",
        "header_without_the_target",
        "non_numeric_target",
        "target_with_inf",
    ],
)
def test_bad_tables_fail_in_one_line_or_are_counted(ray_local, tmp_path, case):
    cases = bad_tables(tmp_path)
    assert len(cases) == 5  # each of them is a case above
    source, outcome, words = cases[case]
    config = {"source": source, "split": {"val": 0.1, "test": 0.1}}
    if outcome == "failed":
        with pytest.raises((SourceError, RejectedRowsError)) as error:
            run_stage(tmp_path, config)
        message = str(error.value)
        assert words in message and "\n" not in message, message
        return
    out, metrics = run_stage(tmp_path, config)
    reasons = [r["reason"] for r in quarantine_rows(out)]
    assert reasons == [words] * 3 and metrics["data/quarantined"] == 3
    detail = {r["detail"] for r in quarantine_rows(out)}
    assert detail == {"column 'y': 'inf'"}


@pytest.mark.reliability
def test_a_category_of_a_million_distinct_values_fails_on_a_piece_of_rows(ray_local, tmp_path):
    n = 1_000_000
    path = tmp_path / "ids.csv"
    frame = pd.DataFrame({"customer": np.arange(n), "x": np.arange(n) % 7, "y": np.arange(n) % 3})
    frame.to_csv(path, index=False)
    source = regression_source(path, "y", ["customer"])
    with pytest.raises(SourceError) as error:
        run_stage(tmp_path, {"source": source, "chunk_rows": 8192})
    message = str(error.value)
    assert "\n" not in message and f"{path}: categorical column 'customer'" in message
    # Whichever piece is read first fails (pieces run at once): a whole piece of 8192 rows,
    # named by its lines in the file (the header is line 1).
    found = re.search(r"more than 1000 distinct values \(8192 in rows (\d+)\.\.(\d+)\)", message)
    assert found, message
    first, last = int(found[1]), int(found[2])
    assert last - first + 1 == 8192 and (first - 2) % 8192 == 0, message
