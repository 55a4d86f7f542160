"""Normalization statistics (exact, so any partitioning of the rows gives the same bits) and
the functions that apply and invert them.

Statistics are per channel for images (N, C, H, W) and per numeric feature for tables (N, F),
always on the [0, 1] pixel scale for images (raw / ``pixel_scale``). Each task returns exact
partial sums (Python integers or fractions), the driver adds them: float rounding never depends
on how many tasks ran, so the normalized shards are byte-identical for one task or many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass
class Partial:
    """Exact partial sums over some rows, per channel (or feature)."""

    count: int
    sum: list[Fraction]
    sumsq: list[Fraction]
    min: list[float]
    max: list[float]

    def __add__(self, other: Partial) -> Partial:
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        return Partial(
            self.count + other.count,
            [a + b for a, b in zip(self.sum, other.sum, strict=True)],
            [a + b for a, b in zip(self.sumsq, other.sumsq, strict=True)],
            [min(a, b) for a, b in zip(self.min, other.min, strict=True)],
            [max(a, b) for a, b in zip(self.max, other.max, strict=True)],
        )


def exact_sum(x: np.ndarray) -> Fraction:
    """Returns the exact sum of a float64 array (no rounding at all), as a fraction.

    Each value is split into an integer mantissa and an exponent; mantissas with the same
    exponent are added as integers (in two 26-bit halves, so int64 never overflows).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[x != 0]
    if x.size == 0:
        return Fraction(0)
    m, e = np.frexp(x)
    mant = (m * 2.0**53).astype(np.int64)
    order = np.argsort(e, kind="stable")
    e, mant = e[order], mant[order]
    starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
    hi = np.add.reduceat(mant >> 26, starts)
    lo = np.add.reduceat(mant & ((1 << 26) - 1), starts)
    exps = e[starts]
    base = int(exps.min())
    total = 0
    for h, lo_part, ex in zip(hi.tolist(), lo.tolist(), exps.tolist(), strict=True):
        total += ((h << 26) + lo_part) << (ex - base)
    return Fraction(total) * Fraction(2) ** (base - 53)


def image_partial(images: np.ndarray) -> Partial:
    """Exact per-channel sums of ``uint8`` images (N, C, H, W), in raw pixel units.

    A 256-bin histogram per channel gives every sum exactly, without a wide integer copy.
    """
    c = images.shape[1]
    if len(images) == 0:
        return Partial(0, [Fraction(0)] * c, [Fraction(0)] * c, [math.inf] * c, [-math.inf] * c)
    values = np.arange(256, dtype=np.int64)
    sums, sumsq, lo, hi = [], [], [], []
    for ch in range(c):
        hist = np.bincount(np.ascontiguousarray(images[:, ch]).ravel(), minlength=256)
        hist = hist.astype(np.int64)
        present = np.flatnonzero(hist)
        sums.append(Fraction(int(hist @ values)))
        sumsq.append(Fraction(int(hist @ (values * values))))
        lo.append(float(present[0]))
        hi.append(float(present[-1]))
    count = int(images.shape[0]) * int(np.prod(images.shape[2:]))
    return Partial(count, sums, sumsq, lo, hi)


def table_partial(columns: list[np.ndarray]) -> Partial:
    """Exact per-feature sums of float64 columns (squares are rounded per value, then summed)."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        k = len(columns)
        return Partial(0, [Fraction(0)] * k, [Fraction(0)] * k, [math.inf] * k, [-math.inf] * k)
    return Partial(
        n,
        [exact_sum(col) for col in columns],
        [exact_sum(col * col) for col in columns],
        [float(col.min()) for col in columns],
        [float(col.max()) for col in columns],
    )


def finish(partial: Partial, method: str, scale: float = 1.0) -> dict[str, Any]:
    """Turns summed partials into the statistics stored in ``dataset.json``.

    Args:
        partial: sums over the train split, in raw units.
        method: ``standard``, ``minmax`` or ``none``.
        scale: raw value of full intensity; statistics are reported on raw / scale.

    Returns:
        ``method``, ``count``, per-channel ``mean``, ``std``, ``min``, ``max``, and the
        ``shift`` and ``divisor`` that :func:`apply` uses: ``(x - shift) / divisor``.
    """
    k = len(partial.sum)
    n = partial.count
    if n == 0:
        raise ValueError("the train split is empty: no rows to compute normalization from")
    scale_f = Fraction(scale)
    mean_q = [s / n / scale_f for s in partial.sum]
    var_q = [
        max(Fraction(0), ss / n / scale_f**2 - m * m)
        for ss, m in zip(partial.sumsq, mean_q, strict=True)
    ]
    mean = [float(m) for m in mean_q]
    std = [math.sqrt(float(v)) for v in var_q]
    lo = [v / scale for v in partial.min]
    hi = [v / scale for v in partial.max]
    if method == "standard":
        shift, divisor = mean, [s if s > 0 else 1.0 for s in std]
    elif method == "minmax":
        shift, divisor = lo, [(b - a) if b > a else 1.0 for a, b in zip(lo, hi, strict=True)]
    else:
        shift, divisor = [0.0] * k, [1.0] * k
    return {
        "method": method,
        "count": n,
        "mean": mean,
        "std": std,
        "min": lo,
        "max": hi,
        "shift": shift,
        "divisor": divisor,
    }


def _broadcast(values: list[float], ndim: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape((1, -1) + (1,) * (ndim - 2))


def apply(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Normalizes (N, C, H, W) images on the [0, 1] scale, or (N, F) features; float32 out."""
    x = np.asarray(x, dtype=np.float32)
    return (x - _broadcast(stats["shift"], x.ndim)) / _broadcast(stats["divisor"], x.ndim)


def invert(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Undoes :func:`apply`: back to the [0, 1] pixel scale (or raw feature units)."""
    x = np.asarray(x, dtype=np.float32)
    return x * _broadcast(stats["divisor"], x.ndim) + _broadcast(stats["shift"], x.ndim)
