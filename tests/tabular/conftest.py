"""The tabular tests use the data stage's own test writers (tests/data/data_writers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
