"""Every source kind, on the bundled digits and on small files written in the exact format."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_writers import digit_like, run_stage, write_cifar, write_idx, write_png

from components.data import denormalize, load_dataset_info, load_numpy


def _all_rows(out):
    """(x on the [0, 1] scale, labels, row ids, copies) of every split's originals."""
    info = load_dataset_info(out)
    rows = {}
    for split in ("train", "val", "test"):
        if not info.shard_paths(split):
            continue
        x, y = load_numpy(out, split)
        meta = pd.concat(
            [pd.read_parquet(p, columns=["row_id", "copy"]) for p in info.shard_paths(split)]
        )
        rows[split] = (denormalize(x, info), y, meta["row_id"].to_numpy(), meta["copy"].to_numpy())
    return info, rows


def test_digits_split_normalize_augment(ray_local, tmp_path):
    from sklearn.datasets import load_digits

    config = {
        "source": {"kind": "sklearn_digits"},
        "augment": {"copies": 2, "rotate": 10, "shift": 0.1, "zoom": 0.1, "seed": 3},
        "split": {"val": 0.1, "test": 0.2, "seed": 1},
        "rows_per_shard": 500,
    }
    out, metrics = run_stage(tmp_path, config)
    info, rows = _all_rows(out)
    digits = load_digits()
    acc = info.accounting
    # the bundled digits are all distinct: every row is kept and accounted for
    assert acc["rows_in"] == 1797 == acc["kept"] + acc["quarantined"] + acc["duplicates_removed"]
    assert acc["kept"] == 1797
    assert metrics["train/rows"] == 3 * acc["originals_by_split"]["train"]
    assert info.image_shape == (1, 8, 8) and info.num_classes == 10

    ids = {s: set(r[2][r[3] == 0]) for s, r in rows.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
    assert sum(len(v) for v in ids.values()) == acc["kept"]
    for split, (x, y, row_id, copy) in rows.items():
        orig = copy == 0
        # originals come back exactly (normalize then denormalize, float32)
        np.testing.assert_allclose(x[orig, 0], digits.images[row_id[orig]] / 16.0, atol=1e-6)
        assert (y == digits.target[row_id]).all()
        # stratified: each class keeps about its share in every split
        share = {"train": 0.7, "val": 0.1, "test": 0.2}[split]
        counts = np.bincount(y[orig], minlength=10)
        expected = np.bincount(digits.target, minlength=10) * share
        assert np.abs(counts - expected).max() <= 1.5
    # train: every original is followed by 2 augmented copies that differ from it
    x, _, row_id, copy = rows["train"]
    assert (copy == np.tile([0, 1, 2], len(copy) // 3)).all()
    assert (row_id[1::3] == row_id[::3]).all()
    assert np.abs(x[1::3] - x[::3]).mean() > 0.02

    # normalization statistics == numpy on the train originals
    train = digits.images[np.sort(row_id[copy == 0])] / 16.0
    stats = info.normalization
    assert stats["method"] == "standard" and stats["pixel_scale"] == 16.0
    np.testing.assert_allclose(stats["mean"], [train.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats["std"], [train.std()], rtol=1e-12)
    assert stats["min"] == [train.min()] and stats["max"] == [train.max()]
    xt, _ = load_numpy(out, "train")
    orig = xt[0::3]
    np.testing.assert_allclose(orig.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(orig.std(), 1.0, atol=1e-4)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(ray_local, tmp_path, gz):
    images = digit_like(30, 10, 12, seed=1)[:, 0]
    labels = np.arange(30) % 10
    suffix = ".gz" if gz else ""
    a = write_idx(tmp_path / f"a-images-idx3-ubyte{suffix}", images[:18], gz=gz)
    al = write_idx(tmp_path / f"a-labels-idx1-ubyte{suffix}", labels[:18], gz=gz)
    b = write_idx(tmp_path / f"b-images-idx3-ubyte{suffix}", images[18:], gz=gz)
    bl = write_idx(tmp_path / f"b-labels-idx1-ubyte{suffix}", labels[18:], gz=gz)
    config = {
        "source": {"kind": "mnist_idx", "images": [str(a), str(b)], "labels": [str(al), str(bl)]},
        "normalize": {"method": "minmax"},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 7,
    }
    out, metrics = run_stage(tmp_path, config)
    info, rows = _all_rows(out)
    x, y, row_id, _ = rows["train"]
    assert info.image_shape == (1, 10, 12) and metrics["train/rows"] == 30
    assert (row_id == np.arange(30)).all() and (y == labels).all()
    np.testing.assert_allclose(x[:, 0], images / 255.0, atol=1e-6)
    assert info.normalization["min"] == [0.0] and info.normalization["max"] == [1.0]
    xn, _ = load_numpy(out, "train")
    assert xn.min() == 0.0 and xn.max() == 1.0


def test_cifar10_binary(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(25, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = 200  # the red plane: checks channel order
    labels = np.arange(25) % 10
    f1 = write_cifar(tmp_path / "data_batch_1.bin", images[:15], labels[:15])
    f2 = write_cifar(tmp_path / "data_batch_2.bin", images[15:], labels[15:])
    config = {
        "source": {"kind": "cifar10_binary", "paths": [str(f1), str(f2)]},
        "normalize": {"method": "none"},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 4,
    }
    out, _ = run_stage(tmp_path, config)
    info, rows = _all_rows(out)
    x, y, row_id, _ = rows["train"]
    assert info.image_shape == (3, 32, 32) and info.class_names[0] == "airplane"
    np.testing.assert_allclose(x, images[row_id] / 255.0, atol=1e-6)
    assert (x[:, 0] == np.float32(200 / 255)).all() and (y == labels).all()


@pytest.mark.reliability
def test_image_folder_png_jpeg_gray_rgb(ray_local, tmp_path):
    root = tmp_path / "folder"
    red = np.zeros((3, 20, 24), np.uint8)
    red[0] = 255
    write_png(root / "cat" / "red.png", red)
    write_png(root / "cat" / "gray.png", np.full((1, 7, 9), 100, np.uint8))  # converted to RGB
    write_png(
        root / "dog" / "blue.jpg",
        np.stack([np.zeros((16, 16))] * 2 + [np.full((16, 16), 255)]).astype(np.uint8),
        fmt="JPEG",
    )
    write_png(root / "dog" / "sub" / "noise.png", digit_like(1, 16, 16, channels=3)[0])
    config = {
        "source": {
            "kind": "image_folder",
            "root": str(root),
            "size": [8, 10],
            "channels": 3,
            "convert_channels": True,
        },
        "normalize": {"method": "none"},
        "split": {"val": 0.0, "test": 0.0},
        "chunk_rows": 3,
    }
    out, metrics = run_stage(tmp_path, config)
    info, rows = _all_rows(out)
    x, y, row_id, _ = rows["train"]
    assert info.class_names == ["cat", "dog"] and info.image_shape == (3, 8, 10)
    assert metrics["train/rows"] == 4 and (y == [0, 0, 1, 1]).all()
    # sorted file order: cat/gray.png, cat/red.png, dog/blue.jpg, dog/sub/noise.png
    np.testing.assert_allclose(x[0], 100 / 255, atol=1e-6)
    np.testing.assert_allclose(x[1, 0], 1.0) and np.testing.assert_allclose(x[1, 1:], 0.0)
    assert x[2, 2].mean() > 0.95 and x[2, :2].mean() < 0.05  # JPEG is lossy


def _mixed_frame(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "height": rng.normal(170, 10, n).round(3),
            "count": rng.integers(0, 50, n),
            "city": rng.choice(["paris", "lima", "oslo"], n),
            "score": rng.random(n),
            "target": np.arange(n) % 3,
        }
    )


def test_csv_mixed_types(ray_local, tmp_path):
    df = _mixed_frame()
    df.iloc[:20].to_csv(tmp_path / "a.csv", index=False)
    df.iloc[20:].to_csv(tmp_path / "b.csv", index=False)
    config = {
        "source": {
            "kind": "csv",
            "paths": [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
            "label_column": "target",
            "categorical_columns": ["city"],
        },
        "split": {"val": 0.2, "test": 0.2, "seed": 4},
    }
    out, _ = run_stage(tmp_path, config)
    info = load_dataset_info(out)
    assert info.kind == "tabular" and info.num_classes == 3
    assert info.feature_columns == ["height", "count", "score"]
    assert info.categorical_columns == ["city"]
    train = pd.concat([pd.read_parquet(p) for p in info.shard_paths("train")])
    assert (
        str(train["height"].dtype) == "float32"
        and train["city"].isin(["paris", "lima", "oslo"]).all()
    )
    assert str(train["label"].dtype) == "int64"
    raw = df.iloc[train["row_id"].to_numpy()]
    assert (raw["city"].to_numpy() == train["city"].to_numpy()).all()
    stats = info.normalization
    for j, col in enumerate(info.feature_columns):
        assert stats["mean"][j] == pytest.approx(raw[col].mean(), rel=1e-12)
        assert stats["std"][j] == pytest.approx(raw[col].std(ddof=0), rel=1e-12)
        np.testing.assert_allclose(
            train[col], (raw[col] - raw[col].mean()) / raw[col].std(ddof=0), atol=1e-5
        )
    x, y = load_numpy(out, "train")
    np.testing.assert_allclose(
        denormalize(x, info), raw[info.feature_columns].to_numpy(), rtol=1e-5
    )


def test_parquet_row_groups_and_jitter(ray_local, tmp_path):
    df = _mixed_frame(30, seed=2)
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=8)  # 4 row groups: 4 tasks
    config = {
        "source": {
            "kind": "parquet",
            "paths": [str(tmp_path / "t.parquet")],
            "label_column": "target",
            "feature_columns": ["height", "score"],
        },
        "augment": {"copies": 1, "jitter": 0.1},
        "split": {"val": 0.0, "test": 0.0},
    }
    out, metrics = run_stage(tmp_path, config)
    info = load_dataset_info(out)
    assert info.feature_columns == ["height", "score"] and metrics["train/rows"] == 60
    train = pd.concat([pd.read_parquet(p) for p in info.shard_paths("train")])
    orig, copy = train[train["copy"] == 0], train[train["copy"] == 1]
    assert (orig["row_id"].to_numpy() == np.arange(30)).all()
    noise = copy["height"].to_numpy() - orig["height"].to_numpy()
    assert 0.02 < noise.std() < 0.3
    assert json.loads((out / "dataset.json").read_text())["accounting"]["augmented_rows"] == 30
