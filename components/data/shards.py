"""Shard tables and byte-deterministic Parquet writing.

Image shards hold ``image`` as Ray's fixed-shape tensor extension type (float32, (C, H, W)):
``ray.data.read_parquet`` gives it back as an (N, C, H, W) ndarray, and plain pandas/pyarrow
read it as a list<float> column (one flat array per row; the shape is in ``dataset.json``).
Every shard also has ``label`` (int64), ``row_id`` (the original's global input position,
int64) and ``copy`` (0 for an original, 1.. for augmented copies, int32).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Writer options pinned so the same table always gives the same bytes.
WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_statistics": False,
    "version": "2.6",
    "data_page_version": "1.0",
    "write_page_index": False,
    "write_page_checksum": False,
}
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("index", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("label", pa.string()),
    ]
)


def image_table(
    images: np.ndarray, labels: np.ndarray, row_ids: np.ndarray, copies: np.ndarray
) -> pa.Table:
    """Builds an image shard from float32 (N, C, H, W) images."""
    return pa.table(
        {
            "image": tensor_array(images),
            "label": pa.array(labels, pa.int64()),
            "row_id": pa.array(row_ids, pa.int64()),
            "copy": pa.array(copies, pa.int32()),
        }
    )


def tensor_array(images: np.ndarray) -> pa.ExtensionArray:
    """Wraps (N, ...) float32 data as Ray's fixed-shape tensor column, without copying.

    ``ArrowTensorArray.from_numpy`` gives the same array but walks the rows in Python (over a
    second per shard); the storage is a large_list with one ``prod(shape)`` run per row.
    """
    from ray.data.extensions import ArrowTensorTypeV2

    images = np.ascontiguousarray(images, dtype=np.float32)
    n, size = len(images), int(np.prod(images.shape[1:]))
    tensor_type = ArrowTensorTypeV2(images.shape[1:], pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int64))
    storage = pa.LargeListArray.from_arrays(
        offsets, pa.array(images.reshape(-1)), type=tensor_type.storage_type
    )
    return pa.ExtensionArray.from_storage(tensor_type, storage)


class ShardWriteError(OSError):
    """A shard could not be written (disk full, quota, permissions); names the file."""


def encode_table(table: pa.Table) -> pa.Buffer:
    """Encodes one shard (one row group) as Parquet with the pinned options, in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, table.num_rows), **WRITE_OPTIONS)
    return sink.getvalue()


def write_file(data: bytes | pa.Buffer, path: Path) -> dict[str, Any]:
    """Writes encoded bytes under a temporary name, then renames; returns bytes and sha256.

    Raises:
        ShardWriteError: the file could not be written; no part of it is left behind.
    """
    view = memoryview(data)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(view)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ShardWriteError(
            e.errno, f"cannot write shard {path} ({view.nbytes} bytes): {e.strerror or e}"
        ) from None
    return {"bytes": view.nbytes, "sha256": hashlib.sha256(view).hexdigest()}


def write_table(table: pa.Table, path: Path) -> dict[str, Any]:
    """Writes one shard (one row group) with pinned options; returns its rows, bytes, sha256.

    The file is encoded in memory, hashed, then written under a temporary name and renamed,
    so a listed sha256 always describes a whole file.

    Raises:
        ShardWriteError: the file could not be written; no part of it is left behind.
    """
    return {"rows": table.num_rows, **write_file(encode_table(table), path)}


def shard_name(split: str, index: int) -> str:
    """Returns the artifact-relative path of a split's shard number ``index``."""
    return f"{split}/part-{index:05d}.parquet"
