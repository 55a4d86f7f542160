"""A corpus of bad inputs: every bad row lands in quarantine with its reason and location,
the accounting adds up exactly, and unreadable sources fail naming the path."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_writers import digit_like, quarantine_rows, run_stage, write_cifar, write_idx, write_png
from pydantic import ValidationError

from components.data.config import PrepareConfig
from components.data.prepare import RejectedRowsError
from components.data.sources import SourceError

pytestmark = pytest.mark.reliability


def _reasons(out):
    return sorted((r["source"], r["index"], r["reason"]) for r in quarantine_rows(out))


def _accounting(out):
    acc = json.loads((out / "dataset.json").read_text())["accounting"]
    assert acc["rows_in"] == acc["kept"] + acc["quarantined"] + acc["duplicates_removed"]
    assert acc["balanced"]
    assert sum(acc["originals_by_split"].values()) == acc["kept"]
    assert sum(acc["quarantined_by_reason"].values()) == acc["quarantined"]
    return acc


def test_idx_truncated_labels_missing_out_of_range_duplicate(ray_local, tmp_path):
    images = digit_like(10, 6, 6, seed=3)[:, 0]
    images[5] = images[1]  # an exact duplicate
    labels = np.arange(10) % 10
    labels[2] = 12  # out of range
    a = write_idx(tmp_path / "a-images.idx", images)
    # cut inside record 7: records 7, 8, 9 are truncated
    a.write_bytes(a.read_bytes()[: 16 + 7 * 36 + 20])
    al = write_idx(tmp_path / "a-labels.idx", labels)
    b = write_idx(tmp_path / "b-images.idx.gz", digit_like(5, 6, 6, seed=4)[:, 0], gz=True)
    bl = write_idx(tmp_path / "b-labels.idx.gz", np.arange(4), gz=True)  # one label short
    config = {
        "source": {"kind": "mnist_idx", "images": [str(a), str(b)], "labels": [str(al), str(bl)]},
        "clean": {"max_rejected_fraction": 0.5},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 3,
    }
    out, metrics = run_stage(tmp_path, config)
    assert _reasons(out) == sorted(
        [
            (str(a), 2, "label_out_of_range"),
            (str(a), 5, "duplicate"),
            (str(a), 7, "truncated"),
            (str(a), 8, "truncated"),
            (str(a), 9, "truncated"),
            (str(b), 4, "label_missing"),
        ]
    )
    dup = [r for r in quarantine_rows(out) if r["reason"] == "duplicate"][0]
    assert dup["detail"] == f"same content as {a}:1 (different label)"
    acc = _accounting(out)
    assert (acc["rows_in"], acc["kept"], acc["quarantined"], acc["duplicates_removed"]) == (
        15,
        9,
        5,
        1,
    )
    assert acc["quarantined_by_reason"] == {
        "label_missing": 1,
        "label_out_of_range": 1,
        "truncated": 3,
    }
    assert metrics["train/rows"] == 9


def test_idx_wrong_magic_fails_with_path(ray_local, tmp_path):
    bad = tmp_path / "images.idx"
    bad.write_bytes(b"\x00\x00\x07\x03" + b"\x00" * 40)
    labels = write_idx(tmp_path / "labels.idx", np.zeros(2))
    config = {"source": {"kind": "mnist_idx", "images": [str(bad)], "labels": [str(labels)]}}
    with pytest.raises(SourceError, match=f"{bad}: not an IDX file"):
        run_stage(tmp_path, config)


def _corrupt(data: bytes) -> bytes:
    """Flips bytes inside a PNG's IDAT chunk (its CRC no longer matches)."""
    at = data.index(b"IDAT") + 10
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]


def test_image_folder_corpus(ray_local, tmp_path):
    root = tmp_path / "images"
    imgs = digit_like(6, 12, 12, seed=5, channels=3)
    for i in range(4):
        write_png(root / "a" / f"good{i}.png", imgs[i])
    good = (root / "a" / "good0.png").read_bytes()
    (root / "a" / "corrupt.png").write_bytes(_corrupt(good))
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("this is not an image\n")
    rgba = np.concatenate([imgs[4], np.full((1, 12, 12), 255, np.uint8)])
    write_png(root / "b" / "rgba.png", rgba)
    shutil.copy(root / "a" / "good1.png", root / "b" / "same-as-good1.png")
    write_png(root / "b" / "good5.png", imgs[5])
    write_png(root / "stray.png", imgs[5])
    config = {
        "source": {"kind": "image_folder", "root": str(root), "size": [12, 12], "channels": 3},
        "clean": {"max_rejected_fraction": 0.6},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 4,
    }
    out, metrics = run_stage(tmp_path, config)
    assert _reasons(out) == sorted(
        [
            (str(root / "a" / "corrupt.png"), 0, "undecodable"),
            (str(root / "a" / "truncated.png"), 0, "truncated"),
            (str(root / "b" / "notes.txt"), 0, "undecodable"),
            (str(root / "b" / "rgba.png"), 0, "wrong_channels"),
            (str(root / "b" / "same-as-good1.png"), 0, "duplicate"),
            (str(root / "stray.png"), 0, "label_missing"),
        ]
    )
    acc = _accounting(out)
    assert (acc["rows_in"], acc["kept"], acc["quarantined"], acc["duplicates_removed"]) == (
        11,
        5,
        5,
        1,
    )
    assert metrics["train/rows"] == 5


def test_csv_corpus(ray_local, tmp_path):
    text = "\n".join(
        [
            "a,b,city,label",
            "1.5,3,paris,0",  # line 2: fine
            "nan,3,lima,1",  # nan
            "2.0,inf,lima,1",  # inf
            "2.5,abc,oslo,2",  # non_numeric
            ",4,oslo,2",  # missing_value
            "3.0,5,oslo,",  # label_missing
            "3.5,6,oslo,7",  # label_out_of_range (num_classes 3)
            "4.0,7,oslo,x",  # label_invalid
            "1.5,3,paris,0",  # duplicate of line 2
            "5.0,-inf,oslo,1",  # inf
            "6.0,8,paris,1",
            "7.0,9,lima,2",
            "8.0,10,lima,0",
            "9.0,11,oslo,1",
            "10.0,12,paris,2",
        ]
    )
    path = tmp_path / "mixed.csv"
    path.write_text(text + "\n")
    config = {
        "source": {
            "kind": "csv",
            "paths": [str(path)],
            "label_column": "label",
            "categorical_columns": ["city"],
            "num_classes": 3,
        },
        "clean": {"max_rejected_fraction": 0.6},
        "split": {"val": 0.0, "test": 0.0},
    }
    out, _ = run_stage(tmp_path, config)
    p = str(path)
    assert _reasons(out) == sorted(
        [
            (p, 3, "nan"),
            (p, 4, "inf"),
            (p, 5, "non_numeric"),
            (p, 6, "missing_value"),
            (p, 7, "label_missing"),
            (p, 8, "label_out_of_range"),
            (p, 9, "label_invalid"),
            (p, 10, "duplicate"),
            (p, 11, "inf"),
        ]
    )
    rows = {r["index"]: r for r in quarantine_rows(out)}
    assert rows[5]["detail"] == "column 'b': 'abc'" and rows[9]["label"] == "x"
    acc = _accounting(out)
    assert (acc["rows_in"], acc["kept"], acc["quarantined"], acc["duplicates_removed"]) == (
        15,
        6,
        8,
        1,
    )


def test_parquet_typed_nan_null_inf(ray_local, tmp_path):
    table = pa.table(
        {
            "x": pa.array([1.0, float("nan"), None, float("inf"), 2.0, 3.0], pa.float64()),
            "label": pa.array([0, 1, 1, 0, None, 1], pa.int64()),
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=4)
    config = {
        "source": {"kind": "parquet", "paths": [str(path)], "label_column": "label"},
        "clean": {"max_rejected_fraction": 0.9},
        "split": {"val": 0.0, "test": 0.0},
    }
    out, _ = run_stage(tmp_path, config)
    p = str(path)
    assert _reasons(out) == [
        (p, 1, "nan"),
        (p, 2, "missing_value"),
        (p, 3, "inf"),
        (p, 4, "label_missing"),
    ]
    _accounting(out)


def test_too_many_rejected_fails_with_counts(ray_local, tmp_path):
    root = tmp_path / "images"
    write_png(root / "a" / "ok.png", digit_like(1, 8, 8, channels=3)[0])
    for i in range(3):
        (root / "a" / f"junk{i}.txt").write_text("junk")
    config = {"source": {"kind": "image_folder", "root": str(root), "size": [8, 8]}}
    with pytest.raises(RejectedRowsError, match=r"3 of 4 input rows \(75.0%\).*undecodable=3") as e:
        run_stage(tmp_path, config)
    assert str(root / "a" / "junk0.txt") in str(e.value)


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "csv", "paths": ["{tmp}/missing.csv"]}, "{tmp}/missing.csv: no such file"),
        (
            {"kind": "parquet", "paths": ["{tmp}/not.parquet"]},
            "{tmp}/not.parquet: not a readable Parquet",
        ),
        (
            {"kind": "cifar10_binary", "paths": ["{tmp}/batch.pkl"]},
            "{tmp}/batch.pkl: looks like a pickled",
        ),
        ({"kind": "image_folder", "root": "{tmp}/nowhere"}, "{tmp}/nowhere: no such folder"),
        (
            {"kind": "csv", "paths": ["{tmp}/nolabel.csv"]},
            r"{tmp}/nolabel.csv: missing column\(s\) \['label'\]",
        ),
    ],
)
def test_unreadable_sources_fail_with_path(tmp_path, source, message):
    # these fail while planning, on the driver, before any Ray task starts
    from components.data.sources import plan

    (tmp_path / "not.parquet").write_text("a,b\n1,2\n")
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n")
    (tmp_path / "batch.pkl").write_bytes(pickle.dumps({"data": [1, 2, 3]}, protocol=4))
    source = {
        k: (
            v.replace("{tmp}", str(tmp_path))
            if isinstance(v, str)
            else [p.replace("{tmp}", str(tmp_path)) for p in v]
        )
        for k, v in source.items()
    }
    config = PrepareConfig.model_validate({"source": source})
    with pytest.raises(SourceError, match=message.replace("{tmp}", str(tmp_path))):
        plan(config.source, 100)


def test_cifar_truncated_and_bad_label(ray_local, tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    path = write_cifar(tmp_path / "data_batch_1.bin", images, [0, 1, 2, 11, 4, 5])
    path.write_bytes(path.read_bytes()[:-100])
    config = {
        "source": {"kind": "cifar10_binary", "paths": [str(path)]},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 2,
    }
    out, metrics = run_stage(tmp_path, config)
    assert _reasons(out) == [(str(path), 3, "label_out_of_range"), (str(path), 5, "truncated")]
    assert metrics["train/rows"] == 4


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="clean.max_rejected"):
        PrepareConfig.model_validate({"clean": {"max_rejected": 0.1}})
    with pytest.raises(ValidationError, match="source"):
        PrepareConfig.model_validate({"source": {"kind": "mnist"}})
    with pytest.raises(ValidationError, match="one labels file per images file"):
        PrepareConfig.model_validate(
            {"source": {"kind": "mnist_idx", "images": ["a"], "labels": ["b", "c"]}}
        )
    with pytest.raises(ValidationError, match="split.val \\+ split.test"):
        PrepareConfig.model_validate({"split": {"val": 0.5, "test": 0.5}})


def test_no_duplicate_crosses_splits_when_kept(ray_local, tmp_path):
    images = digit_like(40, 6, 6, seed=7)[:, 0]
    images[20:] = images[:20]  # every image twice
    labels = np.arange(40) % 2
    labels[20:] = labels[:20]
    a = write_idx(tmp_path / "i.idx", images)
    al = write_idx(tmp_path / "l.idx", labels)
    config = {
        "source": {"kind": "mnist_idx", "images": [str(a)], "labels": [str(al)]},
        "clean": {"drop_duplicates": False},
        "split": {"val": 0.25, "test": 0.25},
    }
    out, _ = run_stage(tmp_path, config)
    acc = _accounting(out)
    assert acc["duplicates_kept"] == 20 and acc["duplicates_removed"] == 0
    split_of = {}
    for split in ("train", "val", "test"):
        for f in sorted((out / split).glob("*.parquet")):
            for rid in pd.read_parquet(f)["row_id"]:
                split_of[rid] = split
    assert all(split_of[i] == split_of[i + 20] for i in range(20))
    assert len(set(split_of.values())) == 3
