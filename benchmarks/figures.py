"""What the benchmarks share: how a figure measured over interleaved rounds is reported."""

from __future__ import annotations

import statistics


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """min, median and max of a figure over rounds."""
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }
