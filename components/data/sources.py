"""Readers for every ``source.kind``: plan the work in units, then read and check one unit.

A *unit* is a contiguous piece of the source in its global order (a record range of one IDX or
CIFAR file, a run of image files, one CSV file, one Parquet row group). Units are planned on
the driver from headers and listings only; each is read by one Ray task into a :class:`Chunk`:
the rows that passed every check (images as ``uint8`` (N, C, H, W), tables as typed columns),
their labels, content hashes and source locations, and a :class:`Reject` for every row that did
not. Row checks live here because decoding is where most of them are found.

Nothing here imports Ray: the functions are plain and run the same in a task or in a test.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from components.data.config import (
    MAX_CLASSES,
    Cifar10BinarySource,
    CsvSource,
    ImageFolderSource,
    MnistIdxSource,
    ParquetSource,
    SklearnDigitsSource,
)
from pipelines.guards import quote

#: Records an IDX file may declare beyond those it holds: a file cut short loses a few (each
#: quarantined as truncated); a header declaring billions in a small file is refused, so no
#: loop or task list grows with a number the file states but does not hold.
MAX_MISSING_RECORDS = 10_000
#: What a gzip stream can expand to per compressed byte (deflate's limit is about 1032).
GZIP_MAX_RATIO = 1100

#: Every reason a row can be quarantined for, in the order reports list them.
REASONS = (
    "undecodable",
    "truncated",
    "too_large",
    "wrong_channels",
    "wrong_shape",
    "missing_value",
    "nan",
    "inf",
    "non_numeric",
    "label_missing",
    "label_invalid",
    "label_out_of_range",
)
DUPLICATE = "duplicate"

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CIFAR_RECORD = 1 + 3 * 32 * 32
_MISSING_STRINGS = ("", "na", "n/a", "null", "none")


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, wrong format); names the path."""


class Reject(NamedTuple):
    """One quarantined row: where it came from and why."""

    source: str
    index: int
    reason: str
    detail: str
    label: str | None


@dataclass
class Unit:
    """A contiguous piece of a source, read by one task.

    Attributes:
        paths: files the unit reads (image folder: one per row; IDX: images then labels).
        start: first record of the range (record-range units).
        stop: one past the last record.
        labels: the class of each file (image folder), ``None`` for files outside a class.
        row_group: the Parquet row group the unit reads.
    """

    paths: list[str]
    start: int = 0
    stop: int = 0
    labels: list[int | None] = field(default_factory=list)
    row_group: int = 0


@dataclass
class Chunk:
    """What reading one unit gives.

    Attributes:
        rows_in: input rows the unit held (kept + rejected).
        pos: position of each kept row among the unit's input rows.
        labels: int64 label of each kept row.
        hashes: 16-byte content hash of each kept row (dtype ``S16``).
        sources: files named by ``loc_file``.
        loc_file: index into ``sources`` of each kept row.
        loc_index: record index of each kept row inside its file.
        data: kept rows: ``uint8`` (N, C, H, W) images or a ``pyarrow.Table`` of features.
        rejects: the unit's quarantined rows.
    """

    rows_in: int
    pos: np.ndarray
    labels: np.ndarray
    hashes: np.ndarray
    sources: list[str]
    loc_file: np.ndarray
    loc_index: np.ndarray
    data: Any
    rejects: list[Reject]

    def meta(self) -> Chunk:
        """The chunk without its data: what the driver needs to dedup and split."""
        return Chunk(**{**self.__dict__, "data": None})


@dataclass(frozen=True)
class SourceInfo:
    """What the driver knows of a source before reading rows.

    Attributes:
        kind: ``image`` or ``tabular``.
        shape: (C, H, W) of every image (images only).
        pixel_scale: raw pixel value that means full intensity (255, or 16 for the digits).
        num_classes: number of classes, ``None`` when a tabular source infers it.
        class_names: names of the classes, when known.
        feature_columns: numeric features (tabular only).
        categorical_columns: string features (tabular only).
    """

    kind: str
    shape: tuple[int, int, int] | None = None
    pixel_scale: float = 255.0
    num_classes: int | None = None
    class_names: list[str] | None = None
    feature_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)


def content_hashes(rows: np.ndarray) -> np.ndarray:
    """Returns a 16-byte BLAKE2b hash of each row's bytes (first axis), as an ``S16`` array."""
    flat = np.ascontiguousarray(rows).reshape(len(rows), int(np.prod(rows.shape[1:])))
    out = np.empty(len(rows), dtype="S16")
    for i, row in enumerate(flat):
        out[i] = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
    return out


def plan(source: Any, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    """Describes a source and cuts it into units of at most ``chunk_rows`` rows.

    Raises:
        SourceError: a file is missing or is not in the source's format (names the path).
    """
    planner = {
        "sklearn_digits": _plan_digits,
        "mnist_idx": _plan_idx,
        "cifar10_binary": _plan_cifar,
        "image_folder": _plan_folder,
        "csv": _plan_csv,
        "parquet": _plan_parquet,
    }[source.kind]
    return planner(source, chunk_rows)


def read(source: Any, info: SourceInfo, unit: Unit) -> Chunk:
    """Reads one unit, checking every row; rows that fail a check become rejects."""
    reader = {
        "sklearn_digits": _read_digits,
        "mnist_idx": _read_idx,
        "cifar10_binary": _read_cifar,
        "image_folder": _read_folder,
        "csv": _read_tabular,
        "parquet": _read_tabular,
    }[source.kind]
    return reader(source, info, unit)


def _ranges(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")


# -- images from arrays -------------------------------------------------------------------------


def _image_chunk(
    images: np.ndarray,
    labels: np.ndarray,
    pos: np.ndarray,
    rows_in: int,
    source: str,
    first_index: int,
    rejects: list[Reject],
    num_classes: int,
) -> Chunk:
    """Builds a chunk from decoded images, rejecting labels outside ``[0, num_classes)``."""
    bad = (labels < 0) | (labels >= num_classes)
    for i in np.flatnonzero(bad):
        rejects.append(
            Reject(
                source,
                int(first_index + pos[i]),
                "label_out_of_range",
                f"label {int(labels[i])} not in [0, {num_classes})",
                str(int(labels[i])),
            )
        )
    keep = ~bad
    images, labels, pos = images[keep], labels[keep].astype(np.int64), pos[keep]
    return Chunk(
        rows_in=rows_in,
        pos=pos.astype(np.int64),
        labels=labels,
        hashes=content_hashes(images),
        sources=[source],
        loc_file=np.zeros(len(pos), dtype=np.int32),
        loc_index=(first_index + pos).astype(np.int64),
        data=np.ascontiguousarray(images),
        rejects=sorted(rejects, key=lambda r: r.index),
    )


def _plan_digits(source: SklearnDigitsSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    info = SourceInfo(
        kind="image",
        shape=(1, 8, 8),
        pixel_scale=16.0,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
    )
    return info, [Unit(["sklearn_digits"], s, e) for s, e in _ranges(1797, chunk_rows)]


def _read_digits(source: SklearnDigitsSource, info: SourceInfo, unit: Unit) -> Chunk:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[unit.start : unit.stop]
    # The bundled values are whole numbers 0..16; bytes keep hashing and storage exact.
    images = np.rint(images).astype(np.uint8)[:, None, :, :]
    labels = digits.target[unit.start : unit.stop].astype(np.int64)
    n = unit.stop - unit.start
    return _image_chunk(images, labels, np.arange(n), n, "sklearn_digits", unit.start, [], 10)


# -- IDX ----------------------------------------------------------------------------------------


def _open(path: str):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _idx_header(path: str) -> tuple[str, tuple[int, ...], int]:
    """Returns (numpy dtype, dims, header bytes) of an IDX file."""
    _check_file(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
                raise SourceError(f"{path}: not an IDX file (magic bytes {head.hex() or 'none'})")
            ndim = head[3]
            raw = f.read(4 * ndim)
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read IDX header: {e}") from None
    if ndim == 0 or len(raw) < 4 * ndim:
        raise SourceError(f"{path}: IDX header truncated ({ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", raw)
    return _IDX_DTYPES[head[2]], dims, 4 + 4 * ndim


def _read_records(path: str, offset: int, record: int, start: int, stop: int) -> bytes:
    """Reads records ``[start, stop)``; returns fewer bytes when the file ends early."""
    want = (stop - start) * record
    with _open(path) as f:
        try:
            f.seek(offset + start * record)
        except EOFError:
            return b""
        parts, got = [], 0
        while got < want:
            try:
                block = f.read(min(1 << 20, want - got))
            except EOFError:  # a gzip stream cut short: keep what decompressed
                break
            if not block:
                break
            parts.append(block)
            got += len(block)
    return b"".join(parts)


def _check_declared(path: str, header: int, declared: int, record: int) -> None:
    """Refuses an IDX header that declares far more records than its file can hold."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    most = size * GZIP_MAX_RATIO if gz else max(size - header, 0)
    held = most // max(record, 1)
    if declared > held + MAX_MISSING_RECORDS:
        bound = "at most " if gz else ""
        raise SourceError(
            f"{path}: the header declares {declared:,} records of {record:,} bytes; the file "
            f"({size:,} bytes) holds {bound}{held:,}"
        )


def _plan_idx(source: MnistIdxSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    shape = None
    units = []
    for img_path, lbl_path in zip(source.images, source.labels, strict=True):
        dtype, dims, header = _idx_header(img_path)
        if dtype != "u1" or len(dims) not in (3, 4):
            raise SourceError(
                f"{img_path}: IDX images must be unsigned bytes of shape (N, H, W) or "
                f"(N, H, W, C); got dtype {dtype} and shape {dims}"
            )
        c = dims[3] if len(dims) == 4 else 1
        if c not in (1, 3):
            raise SourceError(f"{img_path}: images have {c} channels; expected 1 or 3")
        this = (c, dims[1], dims[2])
        if shape is not None and this != shape:
            raise SourceError(f"{img_path}: image shape {this} differs from {shape}")
        shape = this
        ldtype, ldims, lheader = _idx_header(lbl_path)
        if ldtype != "u1" or len(ldims) != 1:
            raise SourceError(
                f"{lbl_path}: IDX labels must be unsigned bytes of shape (N,); "
                f"got dtype {ldtype} and shape {ldims}"
            )
        _check_declared(img_path, header, dims[0], c * dims[1] * dims[2])
        _check_declared(lbl_path, lheader, ldims[0], 1)
        units += [Unit([img_path, lbl_path], s, e) for s, e in _ranges(dims[0], chunk_rows)]
    names = source.class_names or [str(i) for i in range(source.num_classes)]
    info = SourceInfo("image", shape, 255.0, source.num_classes, names)
    return info, units


def _read_idx(source: MnistIdxSource, info: SourceInfo, unit: Unit) -> Chunk:
    img_path, lbl_path = unit.paths
    _, dims, offset = _idx_header(img_path)
    c, h, w = info.shape
    record = c * h * w
    raw = _read_records(img_path, offset, record, unit.start, unit.stop)
    n_whole = len(raw) // record
    images = np.frombuffer(raw[: n_whole * record], dtype=np.uint8).reshape(n_whole, h, w, c)
    images = images.transpose(0, 3, 1, 2)
    _, ldims, loffset = _idx_header(lbl_path)
    lraw = _read_records(lbl_path, loffset, 1, unit.start, min(unit.stop, ldims[0]))
    labels = np.frombuffer(lraw, dtype=np.uint8).astype(np.int64)
    n = unit.stop - unit.start
    rejects = []
    for i in range(n_whole, n):
        got = len(raw) - i * record if i == n_whole else 0
        detail = f"the file ends {got} bytes into this {record}-byte record"
        label = str(labels[i]) if i < len(labels) else None
        rejects.append(Reject(img_path, unit.start + i, "truncated", detail, label))
    n_ok = min(n_whole, len(labels))
    for i in range(n_ok, n_whole):
        detail = f"no label for this record in {lbl_path} ({ldims[0]} labels declared)"
        rejects.append(Reject(img_path, unit.start + i, "label_missing", detail, None))
    return _image_chunk(
        images[:n_ok],
        labels[:n_ok],
        np.arange(n_ok),
        n,
        img_path,
        unit.start,
        rejects,
        info.num_classes,
    )


# -- CIFAR-10 binary ----------------------------------------------------------------------------


def _plan_cifar(source: Cifar10BinarySource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    units = []
    for path in source.paths:
        _check_file(path)
        size = os.path.getsize(path)
        if size == 0:
            raise SourceError(f"{path}: empty file, not a CIFAR-10 binary batch")
        with open(path, "rb") as f:
            head = f.read(2)
        # A pickle starts with the PROTO opcode (0x80, protocol 2..5); never unpickle it.
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and size % _CIFAR_RECORD:
            raise SourceError(f"{path}: looks like a pickled batch; give the binary .bin files")
        n = -(-size // _CIFAR_RECORD)  # a partial last record is a (truncated) row too
        units += [Unit([path], s, e) for s, e in _ranges(n, chunk_rows)]
    info = SourceInfo("image", (3, 32, 32), 255.0, len(source.class_names), source.class_names)
    return info, units


def _read_cifar(source: Cifar10BinarySource, info: SourceInfo, unit: Unit) -> Chunk:
    path = unit.paths[0]
    raw = _read_records(path, 0, _CIFAR_RECORD, unit.start, unit.stop)
    n_whole = len(raw) // _CIFAR_RECORD
    records = np.frombuffer(raw[: n_whole * _CIFAR_RECORD], dtype=np.uint8)
    records = records.reshape(n_whole, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    images = records[:, 1:].reshape(n_whole, 3, 32, 32)  # stored as R, G, B planes
    n = unit.stop - unit.start
    rejects = []
    if n_whole < n:
        got = len(raw) - n_whole * _CIFAR_RECORD
        detail = f"file ends inside the record ({got} of {_CIFAR_RECORD} bytes)"
        rejects.append(Reject(path, unit.start + n_whole, "truncated", detail, None))
    return _image_chunk(
        images, labels, np.arange(n_whole), n, path, unit.start, rejects, info.num_classes
    )


# -- image folders ------------------------------------------------------------------------------


def _plan_folder(source: ImageFolderSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    root = Path(source.root)
    if not root.is_dir():
        raise SourceError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: no class sub-folders")
    files: list[tuple[str, int | None]] = [
        (str(p), None) for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")
    ]
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            rel = p.relative_to(root / name).parts
            if p.is_file() and not any(part.startswith(".") for part in rel):
                files.append((str(p), label))
    if not files:
        raise SourceError(f"{root}: the class folders hold no files")
    units = [
        Unit([f for f, _ in files[s:e]], s, e, [lbl for _, lbl in files[s:e]])
        for s, e in _ranges(len(files), chunk_rows)
    ]
    h, w = source.size
    info = SourceInfo("image", (source.channels, h, w), 255.0, len(classes), classes)
    return info, units


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_image(path: str, source: ImageFolderSource) -> np.ndarray:
    """Decodes one image file into ``uint8`` (C, H, W) at the configured size and channels.

    Raises:
        _Rejected: the file is not a decodable image of an accepted kind (with the reason).
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = source.max_pixels
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > source.max_pixels:
                raise _Rejected("too_large", f"{w}x{h} pixels > max_pixels {source.max_pixels}")
            im.load()
            im = _to_channels(im, source)
            im = im.resize((source.size[1], source.size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise _Rejected("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise _Rejected("undecodable", "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "undecodable"
        raise _Rejected(reason, f"{type(e).__name__}: {e}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _to_channels(im, source: ImageFolderSource):
    if im.mode == "1":
        im = im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        raise _Rejected("wrong_channels", f"unsupported image mode {im.mode}")
    have = len(im.getbands())
    if have != source.channels and not source.convert_channels:
        raise _Rejected(
            "wrong_channels", f"{have} channels ({im.mode}); expected {source.channels}"
        )
    target = "L" if source.channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _read_folder(source: ImageFolderSource, info: SourceInfo, unit: Unit) -> Chunk:
    c, h, w = info.shape
    images = np.empty((len(unit.paths), c, h, w), dtype=np.uint8)
    labels, pos, rejects, files = [], [], [], []
    for i, (path, label) in enumerate(zip(unit.paths, unit.labels, strict=True)):
        if label is None:
            rejects.append(Reject(path, 0, "label_missing", "file is not in a class folder", None))
            continue
        try:
            images[len(pos)] = decode_image(path, source)
        except _Rejected as r:
            rejects.append(Reject(path, 0, r.reason, r.detail, str(label)))
            continue
        labels.append(label)
        pos.append(i)
        files.append(path)
    n = len(pos)
    images = images[:n]
    return Chunk(
        rows_in=len(unit.paths),
        pos=np.asarray(pos, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        hashes=content_hashes(images),
        sources=files,
        loc_file=np.arange(n, dtype=np.int32),
        loc_index=np.zeros(n, dtype=np.int64),
        data=np.ascontiguousarray(images),
        rejects=rejects,
    )


# -- tabular ------------------------------------------------------------------------------------


def _tabular_columns(
    source: CsvSource | ParquetSource, path: str, names: list[str]
) -> tuple[list[str], list[str]]:
    """Returns (numeric features, categorical features) after checking the file's columns."""
    seen: set[str] = set()
    twice = sorted({c for c in names if c in seen or seen.add(c)})
    if twice:
        raise SourceError(f"{path}: duplicate column name(s) {_listed(twice)}")
    wanted = [source.label_column, *(source.feature_columns or []), *source.categorical_columns]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {_listed(missing)}; the file has {_listed(names)}"
        )
    features = source.feature_columns or [c for c in names if c != source.label_column]
    if not features:
        raise SourceError(
            f"{path}: no feature columns (only the label column {quote(source.label_column)})"
        )
    for c in source.categorical_columns:
        if c not in features:
            features.append(c)
    numeric = [c for c in features if c not in source.categorical_columns]
    return numeric, [c for c in features if c in source.categorical_columns]


def _listed(names: list[str]) -> str:
    """Column names in a message: each quoted, at most 20 of them."""
    shown = ", ".join(quote(n, 40) for n in names[:20])
    return shown + (f" and {len(names) - 20:,} more" if len(names) > 20 else "")


def _csv_header(path: str, delimiter: str) -> list[str]:
    """The column names of a CSV file as pandas reads them, after checking that no name is
    given twice (pandas would rename the second ``a`` to ``a.1``)."""
    import pandas as pd

    try:
        raw = pd.read_csv(path, nrows=1, header=None, sep=delimiter, dtype=str)
        header = list(pd.read_csv(path, nrows=0, sep=delimiter).columns)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise SourceError(f"{path}: cannot read a CSV header: {e}") from None
    given = [name for name in raw.iloc[0] if isinstance(name, str)] if len(raw) else []
    seen: set[str] = set()
    twice = sorted({n for n in given if n in seen or seen.add(n)})
    if twice:
        raise SourceError(f"{path}: duplicate column name(s) {_listed(twice)}")
    return header


def _check_types(path: str, schema: Any, columns: list[str]) -> None:
    """Refuses Parquet columns that hold no scalar values (lists, structs, maps) or raw bytes:
    a cell of a feature or a label is one number or one string."""
    import pyarrow as pa

    for name in columns:
        kind = schema.field(name).type
        if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            raise SourceError(
                f"{path}: column {quote(name, 40)} holds {kind}; features and labels are "
                "numbers or strings"
            )


def _plan_csv(source: CsvSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    numeric = categorical = None
    for path in source.paths:
        _check_file(path)
        this = _tabular_columns(source, path, _csv_header(path, source.delimiter))
        if numeric is not None and this != (numeric, categorical):
            raise SourceError(f"{path}: columns {this} differ from the first file's")
        numeric, categorical = this
    info = SourceInfo(
        "tabular",
        num_classes=source.num_classes,
        feature_columns=numeric,
        categorical_columns=categorical,
    )
    return info, [Unit([p]) for p in source.paths]


def _plan_parquet(source: ParquetSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    import pyarrow.parquet as pq

    numeric = categorical = None
    units = []
    for path in source.paths:
        _check_file(path)
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise SourceError(f"{path}: not a readable Parquet file: {e}") from None
        schema = meta.schema.to_arrow_schema()
        this = _tabular_columns(source, path, schema.names)
        _check_types(path, schema, [source.label_column, *this[0], *this[1]])
        if numeric is not None and this != (numeric, categorical):
            raise SourceError(f"{path}: columns {this} differ from the first file's")
        numeric, categorical = this
        start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            units.append(Unit([path], start, start + n, row_group=g))
            start += n
    info = SourceInfo(
        "tabular",
        num_classes=source.num_classes,
        feature_columns=numeric,
        categorical_columns=categorical,
    )
    return info, units


def _parse_numeric(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Parses a column into float64; returns (values, reason per row or '' when fine)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray) and (
        pa.types.is_integer(values.type)
        or pa.types.is_floating(values.type)
        or pa.types.is_boolean(values.type)
        or pa.types.is_decimal(values.type)
    ):
        missing = pc.is_null(values).to_numpy(zero_copy_only=False)
        out = pc.cast(values, pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        reason = np.full(len(out), "", dtype=object)
        reason[np.isnan(out)] = "nan"
        reason[np.isinf(out)] = "inf"
        reason[missing] = "missing_value"
        return np.where(reason == "", out, 0.0), reason
    if isinstance(values, pa.ChunkedArray):
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = pc.cast(values, pa.string())
        text = pd.Series(values.to_pylist(), dtype=object)
    else:
        text = values
    missing_null = text.isna().to_numpy()
    text = text.fillna("").astype(str).str.strip()
    lower = text.str.lower()
    out = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    reason = np.full(len(out), "", dtype=object)
    reason[np.isnan(out) & lower.isin(["nan", "+nan", "-nan"]).to_numpy()] = "nan"
    reason[np.isnan(out) & (reason == "")] = "non_numeric"
    reason[np.isinf(out)] = "inf"
    reason[lower.isin(_MISSING_STRINGS).to_numpy() | missing_null] = "missing_value"
    return np.where(reason == "", out, 0.0), reason


def _parse_labels(values: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    nums, reason = _parse_numeric(values)
    reason = np.where(reason == "missing_value", "label_missing", reason)
    reason = np.where(np.isin(reason, ["nan", "inf", "non_numeric"]), "label_invalid", reason)
    whole = nums == np.rint(nums)
    reason = np.where((reason == "") & ~whole, "label_invalid", reason)
    # Without num_classes, labels are bounded all the same: the split, the confusion matrix and
    # the models' outputs hold one entry per class.
    high = MAX_CLASSES if num_classes is None else num_classes
    out = (nums < 0) | (nums >= high)
    reason = np.where((reason == "") & out, "label_out_of_range", reason)
    return np.where(reason == "", nums, 0).astype(np.int64), reason


def _read_tabular(source: CsvSource | ParquetSource, info: SourceInfo, unit: Unit) -> Chunk:
    import pandas as pd
    import pyarrow as pa

    path = unit.paths[0]
    if source.kind == "csv":
        try:
            df = pd.read_csv(
                path, dtype=str, keep_default_na=False, na_filter=False, sep=source.delimiter
            )
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise SourceError(f"{path}: cannot parse CSV: {e}") from None
        columns = {c: df[c] for c in df.columns}
        first_row = 2  # 1-based line numbers after the header
        base = 0
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(unit.row_group)
        columns = {c: table.column(c) for c in table.column_names}
        first_row = 0
        base = unit.start
    n = len(next(iter(columns.values()))) if columns else 0
    labels, reason = _parse_labels(columns[source.label_column], source.num_classes)
    # the first failing column of each row, the label first, then features in order
    bad_column = np.where(reason != "", source.label_column, "").astype(object)
    parsed = {}
    for col in info.feature_columns:
        vals, why = _parse_numeric(columns[col])
        fresh = (reason == "") & (why != "")
        reason[fresh] = why[fresh]
        bad_column[fresh] = col
        parsed[col] = vals
    rejects = []
    for i in np.flatnonzero(reason != ""):
        col = bad_column[i]
        raw, raw_label = columns[col][i], columns[source.label_column][i]
        raw = raw.as_py() if hasattr(raw, "as_py") else raw
        raw_label = raw_label.as_py() if hasattr(raw_label, "as_py") else raw_label
        label = None if raw_label is None or raw_label == "" else str(raw_label)
        detail = f"column {quote(col, 40)}: {quote(raw)}"  # a cell may hold megabytes
        rejects.append(Reject(path, int(base + i + first_row), reason[i], detail, label))
    keep = np.flatnonzero(reason == "")
    arrays = {c: pa.array(parsed[c][keep], pa.float64()) for c in info.feature_columns}
    for c in info.categorical_columns:
        col = columns[c]
        col = col.to_pylist() if hasattr(col, "to_pylist") else list(col)
        arrays[c] = pa.array([None if col[i] is None else str(col[i]) for i in keep], pa.string())
    table = pa.table(arrays)
    hashes = np.empty(len(keep), dtype="S16")
    numeric = (
        np.stack([parsed[c][keep] for c in info.feature_columns], axis=1)
        if info.feature_columns
        else np.zeros((len(keep), 0))
    )
    cats = [table.column(c).to_pylist() for c in info.categorical_columns]
    for j in range(len(keep)):
        h = hashlib.blake2b(numeric[j].tobytes(), digest_size=16)
        for col in cats:
            h.update(b"\x00" if col[j] is None else b"\x01" + col[j].encode() + b"\x00")
        hashes[j] = h.digest()
    return Chunk(
        rows_in=n,
        pos=keep.astype(np.int64),
        labels=labels[keep],
        hashes=hashes,
        sources=[path],
        loc_file=np.zeros(len(keep), dtype=np.int32),
        loc_index=(base + keep + first_row).astype(np.int64),
        data=table,
        rejects=rejects,
    )
