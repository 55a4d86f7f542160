"""Writers of small input files in the exact real formats, for the data stage's tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool = False, declared: int | None = None) -> Path:
    """Writes an IDX file (unsigned bytes): magic 0x0000 08 NDIM, big-endian dims, data.

    ``declared`` overrides the first dimension in the header (to write truncated files).
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    dims = list(array.shape)
    if declared is not None:
        dims[0] = declared
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *dims)
    data = head + array.tobytes()
    if gz:
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def write_cifar(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Writes a CIFAR-10 binary batch: per record 1 label byte, then R, G, B 32x32 planes."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 3 * 32 * 32)
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], images], axis=1)
    path.write_bytes(records.tobytes())
    return path


def digit_like(n: int, h: int, w: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Random distinct uint8 images (N, C, H, W): blobs on black, like scanned digits."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, channels, h, w), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(1, h - 3), rng.integers(1, w - 3)
        out[i, :, y : y + 3, x : x + 3] = rng.integers(60, 256, size=(channels, 3, 3))
        out[i, :, 0, 0] = i % 256  # keeps every image distinct
        out[i, :, 0, 1] = i // 256
    return out


def write_png(path: Path, image_chw: np.ndarray, fmt: str = "PNG") -> Path:
    """Writes a (C, H, W) uint8 image with Pillow (C = 1 gives grayscale)."""
    from PIL import Image

    arr = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format=fmt)
    return path


def run_stage(tmp_path: Path, config: dict, name: str = "out") -> tuple[Path, dict]:
    """Runs ``data.prepare`` through the component contract; returns (artifact dir, metrics)."""
    from components.api import Resources, StageContext
    from components.registry import get

    component = get("data.prepare")
    out = tmp_path / name
    out.mkdir()
    ctx = StageContext(
        stage="prepare",
        run_id="test",
        out_dir=out,
        scratch_dir=str(tmp_path / f"{name}-scratch"),
        inputs={},
        resources=Resources(),
    )
    metrics = component().run(ctx, component.Config.model_validate(config))
    return out, metrics


def shard_digests(out: Path) -> dict[str, str]:
    """Returns {shard path: sha256} of every shard listed in ``dataset.json``."""
    import json

    dataset = json.loads((out / "dataset.json").read_text())
    listed = dataset["shards"] + dataset["quarantine"]["shards"]
    return {s["path"]: s["sha256"] for s in listed}


def quarantine_rows(out: Path) -> list[dict]:
    """Returns the quarantine shards' rows as dicts, in order."""
    import pandas as pd

    files = sorted((out / "quarantine").glob("*.parquet"))
    if not files:
        return []
    return pd.concat([pd.read_parquet(f) for f in files]).to_dict("records")
