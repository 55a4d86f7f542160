"""What a trainer sees: Ray Data and pandas reads of the shards, and the reader API."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from data_writers import digit_like, run_stage, write_idx

from components.data import (
    denormalize,
    load_dataset_info,
    load_numpy,
    normalize,
    normalize_raw,
    read_split,
    verify,
)


@pytest.fixture
def prepared(ray_local, tmp_path):
    images = digit_like(120, 12, 10, seed=9)[:, 0]
    labels = np.arange(120) % 4
    a = write_idx(tmp_path / "i.idx", images)
    al = write_idx(tmp_path / "l.idx", labels)
    config = {
        "source": {"kind": "mnist_idx", "images": [str(a)], "labels": [str(al)], "num_classes": 4},
        "augment": {"copies": 1, "rotate": 10},
        "rows_per_shard": 64,
    }
    out, metrics = run_stage(tmp_path, config)
    return out, metrics, images


def test_ray_data_read_gives_declared_tensors(prepared):
    import torch

    out, metrics, _ = prepared
    info = load_dataset_info(out)
    assert info.image_shape == (1, 12, 10)
    assert info.raw["columns"]["image"] == {"dtype": "float32", "shape": [1, 12, 10]}
    ds = read_split(out, "train")
    assert ds.count() == metrics["train/rows"]
    seen = 0
    for batch in ds.iter_torch_batches(batch_size=32):
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
        assert tuple(batch["image"].shape[1:]) == (1, 12, 10)
        seen += len(batch["label"])
    assert seen == metrics["train/rows"]
    shards = info.shard_paths("train")
    assert len(shards) == -(-metrics["train/rows"] // 64)
    rows = [s["rows"] for s in info.shards if s["split"] == "train"]
    assert all(r == 64 for r in rows[:-1]) and 0 < rows[-1] <= 64
    # the raw ray.data.read_parquet path (what trainers call) works the same
    import ray

    batch = next(iter(ray.data.read_parquet([str(p) for p in shards]).iter_batches(batch_size=8)))
    assert batch["image"].shape == (8, 1, 12, 10) and batch["image"].dtype == np.float32


def test_pandas_and_numpy_reads_and_normalization_round_trip(prepared):
    out, _, images = prepared
    info = load_dataset_info(out)
    shard = info.shard_paths("val")[0]
    df = pd.read_parquet(shard)
    assert list(df.columns) == ["image", "label", "row_id", "copy"]
    x, y = load_numpy(out, "val")
    assert x.shape == (len(df), 1, 12, 10) and x.dtype == np.float32 and y.dtype == np.int64
    # plain pandas (no Ray in the process): one flat float32 array per row
    code = (
        f"import sys, numpy as np, pandas as pd; df = pd.read_parquet({str(shard)!r}); "
        "assert 'ray' not in sys.modules; x = np.stack(df['image']); "
        "print(x.shape, x.dtype, df['label'].dtype, float(x.sum()))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.split()[:4] == [f"({len(df)},", "120)", "float32", "int64"]
    assert float(got.stdout.split()[4]) == pytest.approx(float(x.sum()), rel=1e-5, abs=1e-3)
    raw = images[df["row_id"].to_numpy()][:, None]
    np.testing.assert_allclose(normalize_raw(raw, info), x, atol=1e-5)
    np.testing.assert_allclose(denormalize(x, info), raw / 255.0, atol=1e-6)
    np.testing.assert_allclose(normalize(raw / 255.0, info), x, atol=1e-5)
    verify(out)
    victim = info.shard_paths("test")[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="sha256"):
        verify(out)


def test_stage_metrics_and_progress(prepared):
    out, metrics, _ = prepared
    assert metrics["data/rows_in"] == 120 and metrics["data/quarantined"] == 0
    assert (
        metrics["train/rows"] + metrics["val/rows"] + metrics["test/rows"]
        == 120 + metrics["train/rows"] // 2
    )
    assert {p.name for p in out.iterdir()} >= {"dataset.json", "train", "val", "test"}


def test_component_import_is_light():
    code = (
        "import sys, components.registry as r; c = r.get('data.prepare'); c.Config(); "
        "heavy = ('numpy', 'pyarrow', 'ray', 'torch', 'pandas'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_progress_is_reported(ray_local, tmp_path):
    from components.api import Resources, StageContext
    from components.data.prepare import Prepare

    points = []
    ctx = StageContext(
        stage="prepare",
        run_id="test",
        out_dir=tmp_path,
        scratch_dir=str(tmp_path / "scratch"),
        inputs={},
        resources=Resources(),
        on_progress=points.append,
    )
    config = Prepare.Config.model_validate({"chunk_rows": 600, "rows_per_shard": 400})
    metrics = Prepare().run(ctx, config)
    read = [p["rows_done"] for p in points if p["phase"] == "read"]
    write = [p["rows_done"] for p in points if p["phase"] == "write"]
    assert read == sorted(read) and read[-1] == 1797 and len(read) == 3
    total = metrics["train/rows"] + metrics["val/rows"] + metrics["test/rows"]
    assert write == sorted(write) and write[-1] == total
