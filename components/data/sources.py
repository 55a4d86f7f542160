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
    SklearnDiabetesSource,
    SklearnDigitsSource,
)
from components.data.table import MISSING_REASONS, category_text, parse_numeric
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
        byte_range: the bytes of a CSV piece (whole records), read after the file's header.
        header_bytes: the length of the CSV file's header line.
    """

    paths: list[str]
    start: int = 0
    stop: int = 0
    labels: list[int | None] = field(default_factory=list)
    row_group: int = 0
    byte_range: tuple[int, int] | None = None
    header_bytes: int = 0


@dataclass
class Chunk:
    """What reading one unit gives.

    Attributes:
        rows_in: input rows the unit held (kept + rejected).
        pos: position of each kept row among the unit's input rows.
        labels: int64 label (float64 regression target) of each kept row.
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
        task: ``classification`` or ``regression`` (tabular).
        target: the label (target) column (tabular).
        impute: ``quarantine``, ``median`` or ``mode`` (tabular: see the source's config).
        max_levels: the most distinct values of a categorical column (tabular).
    """

    kind: str
    shape: tuple[int, int, int] | None = None
    pixel_scale: float = 255.0
    num_classes: int | None = None
    class_names: list[str] | None = None
    feature_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)
    task: str = "classification"
    target: str = "label"
    impute: str = "quarantine"
    max_levels: int = 1000


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
        "sklearn_diabetes": _plan_diabetes,
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
        "sklearn_diabetes": _read_diabetes,
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
#
# Every count and type a reader sizes work by is checked on the driver, while planning, against
# what the files hold: columns and their types, header names, the number of classes. A reader
# task then only meets row-level problems (quarantined) or a file that changed underneath it.

_CSV_BLOCK = 1 << 24  # bytes scanned at a time when cutting a CSV into pieces


def _resolve(source: CsvSource | ParquetSource) -> list[str]:
    """The source's files (``package:`` paths resolved to the installed package's folder).

    Raises:
        SourceError: the package is not installed.
    """
    try:
        return source.files()
    except ModuleNotFoundError as e:
        raise SourceError(f"source.package: {e}") from None


def _arrow_kind(t: Any) -> str | None:
    """``number``, ``text`` or None (a type no feature or label can be read from)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _arrow_kind(t.value_type)
    if (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
    ):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    return None


def _tabular_columns(
    source: CsvSource | ParquetSource, path: str, names: list[str], types: dict | None = None
) -> tuple[list[str], list[str]]:
    """Returns (numeric features, categorical features) after checking the file's columns:
    names unique, the wanted ones present, at least one feature, and (Parquet) types that a
    number or a category can be read from."""
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        shown = ", ".join(quote(n, 40) for n in duplicated[:20])
        raise SourceError(f"{path}: duplicate column name(s) {shown}")
    wanted = [source.label_column, *(source.feature_columns or []), *source.categorical_columns]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; the file has {_names(names)}")
    features = list(source.feature_columns or [c for c in names if c != source.label_column])
    for c in source.categorical_columns:
        if c not in features:
            features.append(c)
    if not features:
        raise SourceError(
            f"{path}: no feature columns (the file has only the label column "
            f"{source.label_column!r})"
        )
    for c in [source.label_column, *features] if types else []:
        if _arrow_kind(types[c]) is None:
            raise SourceError(
                f"{path}: column {quote(c, 40)} holds {types[c]}; a feature or label must be a"
                " number or a string"
            )
    numeric = [c for c in features if c not in source.categorical_columns]
    return numeric, [c for c in features if c in source.categorical_columns]


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(quote(n, 40) for n in names[:limit])  # a name may be megabytes
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} columns)"


def _tabular_info(source: CsvSource | ParquetSource, numeric, categorical) -> SourceInfo:
    return SourceInfo(
        "tabular",
        num_classes=source.num_classes,
        feature_columns=numeric,
        categorical_columns=categorical,
        task=source.task,
        target=source.label_column,
        impute=source.impute,
        max_levels=source.max_levels,
    )


def _csv_header(source: CsvSource, path: str) -> list[str]:
    import pandas as pd

    try:
        # the names as written (read_csv's own header renames duplicates to 'x.1')
        first = pd.read_csv(
            path, nrows=1, header=None, dtype=str, sep=source.delimiter, keep_default_na=False
        )
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise SourceError(f"{path}: cannot read a CSV header: {_first_line(e)}") from None
    return [str(n) for n in first.iloc[0].tolist()]


def csv_pieces(path: str, rows: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Cuts a CSV file into pieces of at most ``rows`` records, scanning it once in blocks.

    A record ends at a newline outside double quotes (a quoted field may hold newlines; a
    doubled quote inside one keeps the count even).

    Returns:
        (the header's length in bytes, [(first byte, end byte, first record, end record)]),
        records counted from 0 after the header.
    """
    ends: list[int] = []  # the byte after each piece's last record
    header_end = None
    quotes = bounds_seen = offset = 0
    last = b""
    with open(path, "rb") as f:
        while block := f.read(_CSV_BLOCK):
            data = np.frombuffer(block, dtype=np.uint8)
            quote_at = np.flatnonzero(data == ord('"'))
            newline_at = np.flatnonzero(data == ord("\n"))
            outside = (np.searchsorted(quote_at, newline_at) + quotes) % 2 == 0
            bounds = newline_at[outside] + offset + 1
            index = bounds_seen + np.arange(len(bounds))  # bound 0 ends the header
            if header_end is None and len(bounds):
                header_end = int(bounds[0])
            ends.extend(int(b) for b in bounds[(index > 0) & (index % rows == 0)])
            bounds_seen += len(bounds)
            quotes += len(quote_at)
            offset += len(block)
            last = block[-1:]
    if header_end is None:
        return offset, []
    records = bounds_seen - 1
    if last != b"\n" and offset > (ends[-1] if ends else header_end) and offset > header_end:
        records += 1  # a last record without a newline
    if offset > (ends[-1] if ends else header_end):
        ends.append(offset)
    pieces, start = [], header_end
    for j, end in enumerate(ends):
        first = j * rows
        pieces.append((start, end, first, min(first + rows, records)))
        start = end
    return header_end, [p for p in pieces if p[1] > p[0]]


def _plan_csv(source: CsvSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    import pandas as pd

    numeric = categorical = None
    units = []
    for path in _resolve(source):
        _check_file(path)
        try:
            pd.read_csv(path, nrows=0, sep=source.delimiter)
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise SourceError(f"{path}: cannot read a CSV header: {_first_line(e)}") from None
        this = _tabular_columns(source, path, _csv_header(source, path))
        if numeric is not None and this != (numeric, categorical):
            raise SourceError(f"{path}: columns {this} differ from the first file's")
        numeric, categorical = this
        header_end, pieces = csv_pieces(path, chunk_rows)
        units += [
            Unit([path], first, end_record, byte_range=(lo, hi), header_bytes=header_end)
            for lo, hi, first, end_record in pieces
        ]
    return _tabular_info(source, numeric, categorical), units


def _plan_parquet(source: ParquetSource, chunk_rows: int) -> tuple[SourceInfo, list[Unit]]:
    import pyarrow.parquet as pq

    numeric = categorical = None
    units = []
    for path in _resolve(source):
        _check_file(path)
        try:
            file = pq.ParquetFile(path)
            meta, schema = file.metadata, file.schema_arrow
        except Exception as e:  # pyarrow raises several types for a non-Parquet file
            raise SourceError(f"{path}: not a readable Parquet file: {_first_line(e)}") from None
        types = {f.name: f.type for f in schema}
        this = _tabular_columns(source, path, schema.names, types)
        if numeric is not None and this != (numeric, categorical):
            raise SourceError(f"{path}: columns {this} differ from the first file's")
        numeric, categorical = this
        start = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            units.append(Unit([path], start, start + n, row_group=g))
            start += n
    return _tabular_info(source, numeric, categorical), units


_DIABETES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def _plan_diabetes(source: SklearnDiabetesSource, chunk_rows: int) -> tuple[SourceInfo, list]:
    info = SourceInfo(
        "tabular", feature_columns=list(_DIABETES), task="regression", target="progression"
    )
    return info, [Unit(["sklearn_diabetes"], s, e) for s, e in _ranges(442, chunk_rows)]


def _read_diabetes(source: SklearnDiabetesSource, info: SourceInfo, unit: Unit) -> Chunk:
    import pyarrow as pa
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    x, y = data.data[unit.start : unit.stop], data.target[unit.start : unit.stop]
    columns = {name: pa.chunked_array([x[:, j]]) for j, name in enumerate(_DIABETES)}
    columns["progression"] = pa.chunked_array([y])
    return _table_chunk(info, columns, "sklearn_diabetes", unit.start, 0)


def _parse_labels(values: Any, info: SourceInfo) -> tuple[np.ndarray, np.ndarray, float]:
    """Class ids (int64) or regression targets (float64), a reason per bad row, and the
    exclusive upper bound class ids were checked against (inf for a regression)."""
    nums, reason = parse_numeric(values)
    reason = np.where(reason == "missing_value", "label_missing", reason)
    reason = np.where(np.isin(reason, ["nan", "inf", "non_numeric"]), "label_invalid", reason)
    if info.task == "regression":
        return np.where(reason == "", nums, 0.0), reason, np.inf
    whole = nums == np.rint(nums)
    reason = np.where((reason == "") & ~whole, "label_invalid", reason)
    # Without num_classes the count is inferred from the largest label: bounded, so that one
    # huge label cannot size the work after it (class lists, the split's strata).
    high = info.num_classes or MAX_CLASSES
    out = (nums < 0) | (nums >= high)
    reason = np.where((reason == "") & out, "label_out_of_range", reason)
    return np.where(reason == "", nums, 0).astype(np.int64), reason, high


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message as one bounded line (pandas' parser errors span several)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_tabular(source: CsvSource | ParquetSource, info: SourceInfo, unit: Unit) -> Chunk:
    path = unit.paths[0]
    if source.kind == "csv":
        columns = _read_csv_piece(source, unit)
        return _table_chunk(info, columns, path, unit.start, 2)  # line numbers after the header
    import pyarrow.parquet as pq

    wanted = [info.target, *info.feature_columns, *info.categorical_columns]
    try:
        table = pq.ParquetFile(path).read_row_group(unit.row_group, columns=wanted)
    except Exception as e:  # the file changed since it was planned
        message = f"{path}: cannot read row group {unit.row_group}: {_first_line(e)}"
        raise SourceError(message) from None
    columns = {c: table.column(c) for c in table.column_names}
    return _table_chunk(info, columns, path, unit.start, 0)


def _read_csv_piece(source: CsvSource, unit: Unit) -> dict[str, Any]:
    """The columns of one piece of a CSV file (its header, then its byte range), as text."""
    import io
    import re

    import pandas as pd

    path = unit.paths[0]
    lo, hi = unit.byte_range
    with open(path, "rb") as f:
        header = f.read(unit.header_bytes)
        f.seek(lo)
        body = f.read(hi - lo)
    try:
        df = pd.read_csv(
            io.BytesIO(header + body),
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            sep=source.delimiter,
        )
    except (ValueError, UnicodeDecodeError, OSError) as e:
        # the parser counts lines from this piece's header: name the file's own line
        message = re.sub(
            r"line (\d+)", lambda m: f"line {int(m.group(1)) + unit.start}", _first_line(e)
        )
        raise SourceError(f"{path}: cannot parse CSV: {message}") from None
    return {c: df[c] for c in df.columns}


def _table_chunk(
    info: SourceInfo, columns: dict[str, Any], path: str, base: int, first_row: int
) -> Chunk:
    """Checks and parses the rows of one unit of a table: bad rows become rejects; missing
    numeric values become NaN where the source imputes (filled once the train split's median or
    mode is known); categories become text (None when missing)."""
    import pyarrow as pa

    target = info.target
    n = len(next(iter(columns.values()))) if columns else 0
    labels, reason, high = _parse_labels(columns[target], info)
    # the first failing column of each row, the label first, then features in order
    bad_column = np.where(reason != "", target, "").astype(object)
    parsed = {}
    for col in info.feature_columns:
        vals, why = parse_numeric(columns[col])
        if info.impute != "quarantine":
            fillable = np.isin(why, MISSING_REASONS)
            vals[fillable], why[fillable] = np.nan, ""
        fresh = (reason == "") & (why != "")
        reason[fresh] = why[fresh]
        bad_column[fresh] = col
        parsed[col] = vals
    categories = {c: category_text(columns[c]) for c in info.categorical_columns}
    for c, values in categories.items():
        distinct = len(set(values) - {None})
        if distinct > info.max_levels:
            raise SourceError(
                f"{path}: categorical column {c!r} has more than {info.max_levels} distinct "
                f"values ({distinct} in rows {base + first_row}..{base + first_row + n - 1}), "
                "more than source.max_levels: an identifier is not a category (leave it out "
                "of the features) or raise max_levels"
            )
    rejects = []
    for i in np.flatnonzero(reason != ""):
        col = bad_column[i]
        raw, raw_label = _cell(columns[col], i), _cell(columns[target], i)
        label = None if raw_label is None or raw_label == "" else str(raw_label)[:200]
        detail = f"column {quote(col, 40)}: {quote(raw)}"
        if reason[i] == "label_out_of_range":
            detail += f" not in [0, {high})" + ("" if info.num_classes else " (num_classes)")
        rejects.append(Reject(path, int(base + i + first_row), reason[i], detail, label))
    keep = np.flatnonzero(reason == "")
    arrays = {c: pa.array(parsed[c][keep], pa.float64()) for c in info.feature_columns}
    for c in info.categorical_columns:
        arrays[c] = pa.array([categories[c][i] for i in keep], pa.string())
    table = pa.table(arrays) if arrays else pa.table({})
    hashes = np.empty(len(keep), dtype="S16")
    numeric = (
        np.stack([parsed[c][keep] for c in info.feature_columns], axis=1)
        if info.feature_columns
        else np.zeros((len(keep), 0))
    )
    cats = [[categories[c][i] for i in keep] for c in info.categorical_columns]
    if info.task == "regression":
        # The same features with another outcome are two observations, not one row twice.
        numeric = np.concatenate([numeric, labels[keep, None].astype(np.float64)], axis=1)
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


def _cell(column: Any, i: int) -> Any:
    value = column[i] if not hasattr(column, "iloc") else column.iloc[i]
    return value.as_py() if hasattr(value, "as_py") else value
