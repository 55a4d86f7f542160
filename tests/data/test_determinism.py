"""Same config, same bytes: twice in a row, and with one task or many."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from data_writers import run_stage, shard_digests

from components.data.augment import augment_images
from components.data.config import AugmentConfig
from components.data.normalization import exact_sum, image_partial, table_partial

AUGMENT = {
    "copies": 2,
    "hflip": 0.5,
    "rotate": 15,
    "shift": 0.1,
    "zoom": 0.1,
    "shear": 5,
    "noise": 0.05,
    "seed": 7,
}


def test_same_config_twice_and_one_task_or_many(ray_local, tmp_path):
    config = {"source": {"kind": "sklearn_digits"}, "augment": AUGMENT, "rows_per_shard": 700}
    one, _ = run_stage(tmp_path, {**config, "tasks": 1, "chunk_rows": 2000}, "one")
    again, _ = run_stage(tmp_path, {**config, "tasks": 1, "chunk_rows": 2000}, "again")
    many, _ = run_stage(tmp_path, {**config, "tasks": 2, "chunk_rows": 150}, "many")
    digests = shard_digests(one)
    assert len(digests) >= 7  # train/val/test shards (+ quarantine if any)
    assert shard_digests(again) == digests
    assert shard_digests(many) == digests
    assert (one / "dataset.json").read_bytes() != b""
    for name in digests:
        assert (one / name).read_bytes() == (many / name).read_bytes()


def test_augmentation_is_per_row_not_per_batch():
    rng = np.random.default_rng(0)
    images = rng.random((5, 3, 9, 11)).astype(np.float32)
    cfg = AugmentConfig(**AUGMENT)
    ids, copies = np.array([4, 8, 15, 16, 23]), np.array([1, 2, 1, 1, 2])
    together = augment_images(images, ids, copies, cfg)
    alone = np.stack(
        [
            augment_images(images[i : i + 1], ids[i : i + 1], copies[i : i + 1], cfg)[0]
            for i in range(5)
        ]
    )
    np.testing.assert_array_equal(together, alone)
    other_seed = augment_images(images, ids, copies, cfg.model_copy(update={"seed": 8}))
    assert not np.array_equal(together, other_seed)


def test_augmentation_geometry():
    img = np.zeros((1, 1, 7, 7), np.float32)
    img[0, 0, 1, 2] = 1.0
    none = AugmentConfig(copies=1)
    np.testing.assert_array_equal(augment_images(img, np.array([0]), np.array([1]), none), img)
    flip = AugmentConfig(copies=1, hflip=1.0)
    np.testing.assert_array_equal(
        augment_images(img, np.array([0]), np.array([1]), flip), img[..., ::-1]
    )
    # a pure rotation keeps a centred blob's mass and moves it around the centre
    blob = np.zeros((1, 1, 15, 15), np.float32)
    blob[0, 0, 6:9, 6:9] = 1.0
    rot = augment_images(blob, np.array([1]), np.array([1]), AugmentConfig(copies=1, rotate=30))
    assert abs(rot.sum() - blob.sum()) < 0.5 and rot[0, 0, 7, 7] == 1.0


def test_exact_sums_do_not_depend_on_partitioning():
    x = np.random.default_rng(1).standard_normal(10_001) * 10.0 ** np.random.default_rng(
        2
    ).integers(-8, 8, 10_001)
    exact = sum((Fraction(v) for v in x.tolist()), Fraction(0))
    assert exact_sum(x) == exact
    whole = table_partial([x])
    parts = table_partial([x[:3000]]) + table_partial([x[3000:7777]]) + table_partial([x[7777:]])
    assert parts.sum == whole.sum and parts.sumsq == whole.sumsq


def test_image_partial_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (50, 3, 7, 9), dtype=np.uint8)
    part = image_partial(x[:20]) + image_partial(x[20:])
    per = x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.int64)
    assert part.count == 50 * 63
    assert part.sum == list(per.sum(axis=1)) and part.sumsq == list((per**2).sum(axis=1))
    assert part.min == list(per.min(axis=1).astype(float))
    assert part.max == list(per.max(axis=1).astype(float))
