"""Seeded augmentation: random affine warps, flips and noise for images, jitter for tables.

Every random number is a hash of (seed, row id, copy number, draw number) — a counter-based
generator (SplitMix64) evaluated for a whole batch at once. A row's augmented copies therefore
depend only on that row, never on which task handled it or in what order, and a batch of
thousands of rows costs a handful of numpy operations instead of one generator per row.
"""

from __future__ import annotations

import numpy as np

from components.data.config import AugmentConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_BATCH = 1024  # rows warped at once: bounds the temporary (B, H*W) coordinate arrays


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective hash of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_keys(seed: int, row_ids: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Returns one uint64 key per (seed, row id, copy): the root of that row's random draws."""
    key = _mix(np.full(len(row_ids), seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _mix(key ^ np.asarray(row_ids).astype(np.uint64))
    return _mix(key ^ np.asarray(copies).astype(np.uint64))


def uniform(keys: np.ndarray, draw: int | np.ndarray) -> np.ndarray:
    """Returns uniform floats in [0, 1), one per key, for the numbered draw."""
    with np.errstate(over="ignore"):
        z = _mix(keys ^ (np.asarray(draw, dtype=np.uint64) * _M2 + np.uint64(1)))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def normal(keys: np.ndarray, size: int, first_draw: int) -> np.ndarray:
    """Returns standard normal floats, (len(keys), size), by Box-Muller on hashed uniforms."""
    draws = np.arange(first_draw, first_draw + 2 * size, dtype=np.uint64)
    u = uniform(keys[:, None], draws[None, :])
    u1, u2 = u[:, :size], u[:, size:]
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def affine_matrices(keys: np.ndarray, cfg: AugmentConfig, h: int, w: int) -> np.ndarray:
    """Draws each row's warp; returns (B, 2, 3) matrices mapping output (x, y) to input (x, y)."""
    sym = [2.0 * uniform(keys, i) - 1.0 for i in range(5)]
    angle = np.deg2rad(sym[0] * cfg.rotate)
    shear = np.deg2rad(sym[1] * cfg.shear)
    zoom = 1.0 + sym[2] * cfg.zoom
    tx, ty = sym[3] * cfg.shift * w, sym[4] * cfg.shift * h
    flip = np.where(uniform(keys, 5) < cfg.hflip, -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    # forward A = rotation @ shear @ zoom @ flip, about the image centre, then a translation
    a = np.empty((len(keys), 2, 2))
    a[:, 0, 0] = cos * zoom * flip
    a[:, 0, 1] = (cos * np.tan(shear) - sin) * zoom
    a[:, 1, 0] = sin * zoom * flip
    a[:, 1, 1] = (sin * np.tan(shear) + cos) * zoom
    inv = np.linalg.inv(a)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    centre = np.stack([cx + tx, cy + ty], axis=1)
    offset = np.array([cx, cy]) - np.einsum("bij,bj->bi", inv, centre)
    return np.concatenate([inv, offset[:, :, None]], axis=2)


def warp(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Bilinear resampling of (B, C, H, W) float32 images; outside the image reads as 0.

    The images get a one-pixel border of zeros and source coordinates are clipped onto it, so
    every one of the four corner reads is a valid index and no masks are needed.
    """
    b, c, h, w = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = xs.ravel()[None, :], ys.ravel()[None, :]
    m = matrices.astype(np.float32)
    sx = m[:, 0, 0:1] * xs + m[:, 0, 1:2] * ys + m[:, 0, 2:3]
    sy = m[:, 1, 0:1] * xs + m[:, 1, 1:2] * ys + m[:, 1, 2:3]
    np.clip(sx, -1.0, w, out=sx)
    np.clip(sy, -1.0, h, out=sy)
    x0, y0 = np.floor(sx), np.floor(sy)
    wx, wy = sx - x0, sy - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w), np.minimum(y0 + 1, h)
    pw = w + 2
    padded = np.zeros((c, b, h + 2, pw), dtype=np.float32)
    padded[:, :, 1:-1, 1:-1] = images.transpose(1, 0, 2, 3)
    flat = padded.reshape(c, -1)
    base = (np.arange(b, dtype=np.int64) * ((h + 2) * pw))[:, None]
    row0, row1 = base + (y0 + 1) * pw + 1, base + (y1 + 1) * pw + 1
    v00, v01 = flat[:, row0 + x0], flat[:, row0 + x1]
    v10, v11 = flat[:, row1 + x0], flat[:, row1 + x1]
    top = v00 + wx * (v01 - v00)
    bottom = v10 + wx * (v11 - v10)
    out = top + wy * (bottom - top)  # (C, B, H*W)
    return np.ascontiguousarray(out.reshape(c, b, h, w).transpose(1, 0, 2, 3))


def augment_images(
    images: np.ndarray, row_ids: np.ndarray, copies: np.ndarray, cfg: AugmentConfig
) -> np.ndarray:
    """Returns augmented copies of (B, C, H, W) float32 images on the [0, 1] scale.

    Args:
        images: the originals, one per output row (repeat an original for each copy).
        row_ids: the global id of each row's original.
        copies: the copy number of each row (1, 2, ...); part of the seed.
        cfg: what to draw.
    """
    out = np.empty_like(images, dtype=np.float32)
    _, c, h, w = images.shape
    for s in range(0, len(images), _BATCH):
        sl = slice(s, s + _BATCH)
        keys = row_keys(cfg.seed, row_ids[sl], copies[sl])
        x = warp(images[sl].astype(np.float32), affine_matrices(keys, cfg, h, w))
        if cfg.noise > 0:
            noise = normal(keys, c * h * w, first_draw=16).astype(np.float32)
            x += cfg.noise * noise.reshape(x.shape)
        out[sl] = np.clip(x, 0.0, 1.0)
    return out


def jitter_features(
    features: np.ndarray, row_ids: np.ndarray, copies: np.ndarray, cfg: AugmentConfig
) -> np.ndarray:
    """Adds seeded Gaussian noise (std ``cfg.jitter``) to (B, F) normalized features."""
    keys = row_keys(cfg.seed, row_ids, copies)
    noise = normal(keys, features.shape[1], first_draw=16).astype(np.float32)
    return (features + cfg.jitter * noise).astype(np.float32)
