"""Reading a ``data.prepare`` artifact: what trainers, evaluators and inference use.

>>> info = load_dataset_info(artifact_dir)          # shapes, classes, normalization, shards
>>> ds = read_split(artifact_dir, "train")          # ray.data.Dataset: image (N, C, H, W), label
>>> x, y = load_numpy(artifact_dir, "val")          # small data, no Ray
>>> pixels01 = denormalize(x, info)                  # back to the [0, 1] pixel scale
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATASET_FILE = "dataset.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """The description of a prepared dataset (``dataset.json``).

    Attributes:
        path: the artifact directory.
        kind: ``image`` or ``tabular``.
        image_shape: (C, H, W) of the ``image`` column (images only).
        num_classes: labels are ints in ``[0, num_classes)`` (None for a regression).
        class_names: a name per label (None for a regression).
        feature_columns: numeric feature columns, float32, normalized (tabular only).
        categorical_columns: string feature columns (tabular only).
        normalization: ``method``, per-channel ``mean``/``std``/``min``/``max`` on the [0, 1]
            scale, ``shift``/``divisor`` (normalized = (x - shift) / divisor), ``pixel_scale``.
        accounting: rows in, kept, quarantined by reason, duplicates, rows per split.
        splits: per split: ``rows``, ``originals`` and its shard paths.
        shards: every shard: ``path``, ``split``, ``rows``, ``bytes``, ``sha256``.
        raw: the whole ``dataset.json``.
        task: ``classification`` or ``regression`` (tables).
        label_column: the shards' target column (``label``; ``target`` for a regression).
    """

    path: Path
    kind: str
    image_shape: tuple[int, int, int] | None
    num_classes: int | None
    class_names: list[str] | None
    feature_columns: list[str]
    categorical_columns: list[str]
    normalization: dict[str, Any]
    accounting: dict[str, Any]
    splits: dict[str, Any]
    shards: list[dict[str, Any]]
    raw: dict[str, Any]
    task: str = "classification"
    label_column: str = "label"

    def shard_paths(self, split: str) -> list[Path]:
        """Returns the shard files of a split (``train``, ``val``, ``test`` or ``quarantine``)."""
        if split == "quarantine":
            return [self.path / s["path"] for s in self.raw["quarantine"]["shards"]]
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in {self.path}; splits: {list(self.splits)}")
        return [self.path / p for p in self.splits[split]["shards"]]


@dataclass(frozen=True)
class ImageSpec:
    """What a model of images needs to know of its data, in every worker (picklable).

    Attributes:
        image_shape: (C, H, W).
        num_classes: labels are ints in ``[0, num_classes)``.
        class_names: a name per label.
        normalization: as in :class:`DatasetInfo` (``shift``/``divisor`` per channel...).
        rows: rows per split (a trainer sizes what it holds in memory by them).
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    normalization: dict[str, Any]
    rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, info: DatasetInfo) -> ImageSpec:
        rows = {split: int(entry["rows"]) for split, entry in info.splits.items()}
        return cls(
            tuple(info.image_shape),
            info.num_classes,
            list(info.class_names),
            info.normalization,
            rows,
        )

    def bytes_per_row(self) -> int:
        """Bytes of one float32 image and its label in memory."""
        c, h, w = self.image_shape
        return 4 * c * h * w + 8

    def input_spec(self) -> dict[str, Any]:
        """The bundle input spec of a model taking these images (``components/bundle.py``)."""
        return {
            "type": "image",
            "shape": list(self.image_shape),
            "dtype": "float32",
            "normalization": self.normalization,
        }


def read_image_dataset(artifact, component: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of an input artifact that must hold images.

    Raises:
        ValueError: the artifact is another kind of dataset (names its stage and kind).
    """
    return _read_kind(artifact, component, "image", "an image")


def read_table_dataset(artifact, component: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of an input artifact that must hold a table.

    Raises:
        ValueError: the artifact is another kind of dataset (names its stage and kind).
    """
    return _read_kind(artifact, component, "tabular", "a tabular")


def _read_kind(artifact, component: str, kind: str, noun: str) -> DatasetInfo:
    info = load_dataset_info(artifact.path)
    if info.kind != kind:
        raise ValueError(
            f"{component} needs {noun} dataset; stage {artifact.stage!r} produced {info.kind}"
        )
    return info


def load_dataset_info(artifact_dir: str | Path) -> DatasetInfo:
    """Reads ``dataset.json`` of a ``data.prepare`` artifact.

    Raises:
        FileNotFoundError: the directory is not a prepared dataset.
    """
    path = Path(artifact_dir)
    file = path / DATASET_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; is {path} a data.prepare artifact?")
    raw = json.loads(file.read_text())
    shape = raw.get("image_shape")
    return DatasetInfo(
        path=path,
        kind=raw["kind"],
        image_shape=tuple(shape) if shape else None,
        num_classes=raw["num_classes"],
        class_names=raw["class_names"],
        feature_columns=raw["feature_columns"],
        categorical_columns=raw["categorical_columns"],
        normalization=raw["normalization"],
        accounting=raw["accounting"],
        splits=raw["splits"],
        shards=raw["shards"],
        raw=raw,
        task=raw.get("task", "classification"),
        label_column=raw.get("label_column", "label"),
    )


def read_split(artifact_dir: str | Path, split: str, **read_parquet_args: Any):
    """Returns a split as a ``ray.data.Dataset`` (columns ``image`` or features, ``label``,
    ``row_id``, ``copy``); ``image`` batches are float32 (N, C, H, W) ndarrays/tensors.

    Rows are in source order, augmented copies next to their original: shuffle for training
    (e.g. ``iter_torch_batches(local_shuffle_buffer_size=...)``).
    """
    import ray

    info = load_dataset_info(artifact_dir)
    paths = [str(p) for p in info.shard_paths(split)]
    if not paths:
        raise ValueError(f"split {split!r} of {info.path} has no rows")
    return ray.data.read_parquet(paths, **read_parquet_args)


def load_numpy(artifact_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split into memory without Ray (for small data and tests).

    Returns:
        ``(x, y)``: float32 (N, C, H, W) images or (N, F) numeric features, and int64 labels
        (float64 targets, in their own units, for a regression).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = load_dataset_info(artifact_dir)
    paths = info.shard_paths(split)
    if not paths:
        width = info.image_shape or (len(info.feature_columns),)
        y_type = np.float64 if info.task == "regression" else np.int64
        return np.zeros((0, *width), np.float32), np.zeros(0, y_type)
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    y = table.column(info.label_column).to_numpy()
    y = y.astype(np.float64 if info.task == "regression" else np.int64)
    if info.kind == "image":
        return image_column(table.column("image"), info.image_shape), y
    x = np.stack([table.column(c).to_numpy() for c in info.feature_columns], axis=1)
    return x.astype(np.float32), y


def image_column(column: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Turns a shard's ``image`` column (tensor extension or plain list) into (N, C, H, W)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(arr), *shape)


def normalize(x: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Normalizes images on the [0, 1] scale (N, C, H, W) or raw features (N, F) like the
    shards were."""
    from components.data import normalization as norm

    return norm.apply(x, info.normalization)


def normalize_raw(pixels: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Normalizes raw pixel values (e.g. ``uint8`` 0..255, or 0..16 for the digits)."""
    scale = info.normalization.get("pixel_scale") or 1.0
    return normalize(np.asarray(pixels, dtype=np.float32) / np.float32(scale), info)


def denormalize(x: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Inverts :func:`normalize`: images back to the [0, 1] scale, features to raw units."""
    from components.data import normalization as norm

    return norm.invert(x, info.normalization)


def verify(artifact_dir: str | Path) -> None:
    """Checks every listed shard's sha256 and row count.

    Raises:
        ValueError: a shard is missing or differs from ``dataset.json`` (names the file).
    """
    import pyarrow.parquet as pq

    info = load_dataset_info(artifact_dir)
    for shard in info.shards + info.raw["quarantine"]["shards"]:
        file = info.path / shard["path"]
        if not file.is_file():
            raise ValueError(f"{file}: listed in dataset.json but missing")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest != shard["sha256"]:
            raise ValueError(f"{file}: sha256 {digest} differs from dataset.json")
        if pq.ParquetFile(file).metadata.num_rows != shard["rows"]:
            raise ValueError(f"{file}: row count differs from dataset.json")
