"""Readers for every text ``source.kind``: resolve the paths, then read and check one file.

Each file is read by one Ray task into a :class:`TextChunk`: the texts that passed every check
(with their labels and where they came from) and a ``Reject`` for every text that did not. A
file that cannot be read as its kind at all (a binary file given as CSV, a missing column, a
text column of numbers) is a ``SourceError``: one line naming the file, before any output.

Nothing here imports Ray: the functions are plain and run the same in a task or in a test.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import importlib.util
import io
import json
import lzma
import os
import re
from dataclasses import dataclass, field
from typing import Any

from components.data.sources import Reject, SourceError
from pipelines.guards import not_unicode

#: Every reason a text can be quarantined for, in the order reports list them.
REASONS = (
    "undecodable",
    "binary",
    "malformed",
    "empty",
    "too_long",
    "not_text",
    "text_missing",
    "label_missing",
    "label_invalid",
)
DUPLICATE = "duplicate"
PACKAGE = "package://"
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_OPENERS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}


@dataclass
class TextChunk:
    """What reading one file gives.

    Attributes:
        path: the file, as resolved.
        rows_in: texts (rows, documents) the file held: kept + rejected.
        texts: the kept texts (line endings ``\\n``; classification texts stripped).
        labels: the label of each kept text (None without a label column).
        index: where each kept text starts: its line (1-based; CSV, JSONL) or row (0-based;
            Parquet); 1 for a text file.
        rejects: the file's quarantined texts.
    """

    path: str
    rows_in: int = 0
    texts: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def resolve_paths(paths: list[str]) -> list[str]:
    """Expands ``package://NAME/...`` and glob patterns into existing files, in order.

    Raises:
        SourceError: a package that is not installed, or a path that matches no file.
    """
    found: list[str] = []
    for given in paths:
        path = given
        if given.startswith(PACKAGE):
            name, _, rest = given[len(PACKAGE) :].partition("/")
            spec = importlib.util.find_spec(name)  # finds it without importing it
            if spec is None or not spec.submodule_search_locations:
                raise SourceError(
                    f"{given}: package {name!r} is not installed (`make install` installs the "
                    "corpora raypipe uses; see the README)"
                )
            path = os.path.join(list(spec.submodule_search_locations)[0], rest)
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise SourceError(f"{given}: no such file")
        found += matches
    return found


def read(source: Any, path: str, task: str, classes: list[str] | None, max_chars: int):
    """Reads and checks one file of ``source``; returns its :class:`TextChunk`.

    Raises:
        SourceError: the file cannot be read as ``source.kind`` (the message names it).
    """
    reader = {
        "csv": _read_csv,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "text_files": _read_text_file,
    }[source.kind]
    chunk = TextChunk(path)
    labelled = task == "classification"
    numbers = 0
    unit = "row" if source.kind == "parquet" else "line"
    for index, text, label, problem in reader(source, path, labelled):
        chunk.rows_in += 1
        numbers += _is_number(text)
        where = f"{unit} {index}"
        reason, detail = problem or _check(text, label, labelled, classes, max_chars, where)
        if reason:
            shown = None if label is None else str(label)
            chunk.rejects.append(Reject(path, index, reason, detail, shown))
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        chunk.texts.append(text.strip() if labelled else text)
        chunk.labels.append(str(label).strip() if labelled else None)
        chunk.index.append(index)
    if source.kind != "text_files" and chunk.rows_in and numbers == chunk.rows_in:
        raise SourceError(
            f"{path}: column {source.text_column!r} holds numbers, not text: is text_column "
            "the right column?"
        )
    return chunk


def _check(
    text: Any, label: Any, labelled: bool, classes, max_chars: int, where: str
) -> tuple[str, str]:
    """The reason and detail a text is quarantined for, or ("", "")."""
    if text is None:
        return "text_missing", f"{where}: no text"
    if not isinstance(text, str):
        return "not_text", f"{where}: a {type(text).__name__}, {text!r}"[:200]
    bad = _UNDECODABLE.search(text) or (
        labelled and isinstance(label, str) and _UNDECODABLE.search(label)
    )
    if bad:
        return "undecodable", f"{where}: {_undecodable_detail(bad.group())}"
    # a JSON "\ud800" escape parses to a lone surrogate: no tokenizer can encode it
    problem = not_unicode(text) or (labelled and isinstance(label, str) and not_unicode(label))
    if problem:
        return "undecodable", f"{where}: {problem}"
    if not text.strip():
        return "empty", "empty or whitespace only"
    if len(text) > max_chars:
        return "too_long", f"{len(text)} characters, more than clean.max_chars={max_chars}"
    if labelled:
        if label is None or (isinstance(label, str) and not label.strip()):
            return "label_missing", "no label"
        if classes is not None and str(label).strip() not in classes:
            return "label_invalid", f"label {str(label)!r} not in classes {classes}"
    return "", ""


def _undecodable_detail(char: str, line: int | None = None, column: int | None = None) -> str:
    where = f"line {line}, column {column}: " if line is not None else ""
    return f"{where}byte 0x{ord(char) - 0xDC00:02x} does not decode"


def _is_number(value: Any) -> bool:
    """Whether a text column's value is a number (``3``, ``"2.5"``), not a text."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _raw(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    opener = _OPENERS.get(os.path.splitext(path)[1].lower())
    if opener is None:
        return data
    try:
        return opener(data)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise SourceError(f"{path}: cannot decompress: {e}") from None


def _decoded(path: str, source: Any, what: str) -> str:
    """The file's text; undecodable bytes kept as surrogates (each text is checked alone).

    Raises:
        SourceError: a binary file (a NUL byte) given as a table of texts.
    """
    data = _raw(path)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise SourceError(f"{path}: a binary file (NUL byte at offset {nul}), not {what}")
    try:
        return data.decode(source.encoding, errors="surrogateescape")
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {source.encoding!r}") from None


def _missing_column(path: str, column: str, have: list[str]) -> SourceError:
    return SourceError(f"{path}: no column {column!r}; the file has {have}")


def _read_csv(source: Any, path: str, labelled: bool):
    text = _decoded(path, source, "CSV")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=source.delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise SourceError(f"{path}: empty file, no CSV header row") from None
    except csv.Error as e:
        raise SourceError(f"{path}: cannot parse CSV: {e}") from None
    wanted = [source.text_column] + ([source.label_column] if labelled else [])
    for column in wanted:
        if column not in header:
            raise _missing_column(path, column, header)
    t = header.index(source.text_column)
    lab = header.index(source.label_column) if labelled else None
    line = reader.line_num
    while True:
        start = line + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise SourceError(f"{path}: line {start}: cannot parse CSV: {e}") from None
        line = reader.line_num
        if not row:
            continue  # a blank line holds no record
        if len(row) != len(header):
            detail = f"line {start}: {len(row)} fields, the header has {len(header)}"
            yield start, None, None, ("malformed", detail)
            continue
        yield start, row[t], row[lab] if labelled else None, None


def _read_jsonl(source: Any, path: str, labelled: bool):
    text = _decoded(path, source, "JSON Lines")
    seen = {source.text_column: False, source.label_column: not labelled}
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        bad = _UNDECODABLE.search(line)
        if bad:
            detail = _undecodable_detail(bad.group(), number, bad.start() + 1)
            rows.append((number, None, None, ("undecodable", detail)))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((number, None, None, ("malformed", f"line {number}: not JSON: {e.msg}")))
            continue
        if not isinstance(obj, dict):
            rows.append((number, None, None, ("malformed", f"line {number}: not a JSON object")))
            continue
        for key in seen:
            seen[key] = seen[key] or key in obj
        label = obj.get(source.label_column) if labelled else None
        rows.append((number, obj.get(source.text_column), label, None))
    for column, present in seen.items():
        if rows and not present:
            raise SourceError(f"{path}: no line has the key {column!r}")
    yield from rows


def _read_parquet(source: Any, path: str, labelled: bool):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise SourceError(f"{path}: not a readable Parquet file: {e}") from None
    names = table.column_names
    for column in [source.text_column] + ([source.label_column] if labelled else []):
        if column not in names:
            raise _missing_column(path, column, names)
    kind = table.schema.field(source.text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{path}: column {source.text_column!r} is {kind}, not text")
    texts = table.column(source.text_column).to_pylist()
    labels = table.column(source.label_column).to_pylist() if labelled else [None] * len(texts)
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        yield i, text, label, None


def _read_text_file(source: Any, path: str, labelled: bool):
    data = _raw(path)
    nul = data.find(b"\x00")
    if nul >= 0:
        yield 1, None, None, ("binary", f"a binary file (NUL byte at offset {nul})")
        return
    try:
        text = data.decode(source.encoding, errors="surrogateescape")
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {source.encoding!r}") from None
    bad = _UNDECODABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        detail = _undecodable_detail(bad.group(), line, column)
        yield line, None, None, ("undecodable", f"{detail} as {source.encoding}")
        return
    yield 1, text, None, None
