"""The typed configuration of ``data.prepare`` (the ``with:`` block of a pipeline stage).

Every default lives here, documented once. Importing this module costs pydantic and the
standard library only, so that validating a pipeline file never imports numpy, pyarrow or Ray.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from components.api import StrictModel

#: Classes a dataset may have: the split, the confusion matrix (classes squared) and the models'
#: output layers hold per-class arrays.
MAX_CLASSES = 10_000

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class SklearnDigitsSource(StrictModel):
    """scikit-learn's bundled digits: 1,797 real 8x8 handwritten digits (values 0..16)."""

    kind: Literal["sklearn_digits"]


class MnistIdxSource(StrictModel):
    """MNIST-style IDX files (``idx3-ubyte`` images, ``idx1-ubyte`` labels), plain or ``.gz``.

    Attributes:
        images: image files, (N, H, W) or (N, H, W, C) unsigned bytes.
        labels: label files, one per image file and in the same order.
        num_classes: labels must lie in ``[0, num_classes)``.
        class_names: names of the classes (default ``"0"``, ``"1"``, ...).
    """

    kind: Literal["mnist_idx"]
    images: list[str] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    num_classes: int = Field(10, ge=1, le=MAX_CLASSES)
    class_names: list[str] | None = None

    @model_validator(mode="after")
    def _paired(self) -> MnistIdxSource:
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"source.images has {len(self.images)} files but source.labels has "
                f"{len(self.labels)}: give one labels file per images file"
            )
        return self


class Cifar10BinarySource(StrictModel):
    """CIFAR-10 binary batches (``data_batch_*.bin``): records of 1 label byte + 3x32x32 bytes.

    The python (pickled) batches are never read: unpickling input files runs arbitrary code.

    Attributes:
        paths: the ``.bin`` files, read in the order given.
        class_names: names of the ten classes.
    """

    kind: Literal["cifar10_binary"]
    paths: list[str] = Field(min_length=1)
    class_names: list[str] = Field(default_factory=lambda: list(CIFAR10_CLASSES))


class ImageFolderSource(StrictModel):
    """One sub-folder per class (sorted names give the labels), PNG/JPEG/... files inside.

    Files directly under ``root`` belong to no class and are quarantined (``label_missing``);
    hidden files (names starting with ``.``) are skipped.

    Attributes:
        root: the folder holding one sub-folder per class.
        size: ``[height, width]`` every image is resized to (bilinear).
        channels: 1 (grayscale) or 3 (RGB).
        convert_channels: convert grayscale to RGB and back (and drop alpha); when false an
            image whose channel count differs from ``channels`` is quarantined.
        max_pixels: images with more pixels are rejected before decoding (decompression bombs).
    """

    kind: Literal["image_folder"]
    root: str
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (32, 32)
    channels: Literal[1, 3] = 3
    convert_channels: bool = False
    max_pixels: int = Field(50_000_000, ge=1)


class _TabularSource(StrictModel):
    """Fields shared by the tabular sources.

    Attributes:
        paths: the files, read in the order given.
        label_column: integer class labels.
        feature_columns: feature columns (default: every column but the label).
        categorical_columns: features kept as strings, neither normalized nor jittered; every
            other feature must be numeric.
        num_classes: labels must lie in ``[0, num_classes)``; default: labels in
            ``[0, MAX_CLASSES)``, ``num_classes`` = largest label + 1.
    """

    paths: list[str] = Field(min_length=1)
    label_column: str = "label"
    feature_columns: list[str] | None = None
    categorical_columns: list[str] = []
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)


class CsvSource(_TabularSource):
    """CSV files with a header row. Each file is read by one task: split big tables into files."""

    kind: Literal["csv"]
    delimiter: str = ","

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, delimiter: str) -> str:
        # pandas reads longer separators as regular expressions and an empty one as an error
        # of its own; a line break or a quote would split rows or fields wrongly.
        if len(delimiter) != 1 or delimiter in '\r\n"':
            raise ValueError("a delimiter is one character, not a line break or a quote")
        return delimiter


class ParquetSource(_TabularSource):
    """Parquet files; each row group is read by its own task."""

    kind: Literal["parquet"]


Source = Annotated[
    SklearnDigitsSource
    | MnistIdxSource
    | Cifar10BinarySource
    | ImageFolderSource
    | CsvSource
    | ParquetSource,
    Field(discriminator="kind"),
]


class CleanConfig(StrictModel):
    """Attributes:
    drop_duplicates: remove exact duplicates (same content hash), keeping the first in source
        order; when false, duplicates are kept but always land in the same split.
    max_rejected_fraction: fail the stage when more than this fraction of the input rows is
        quarantined (duplicates do not count).
    """

    drop_duplicates: bool = True
    max_rejected_fraction: float = Field(0.5, ge=0.0, le=1.0)


class NormalizeConfig(StrictModel):
    """Attributes:
    method: ``standard`` (per-channel mean/std), ``minmax`` (per-channel to [0, 1]) or ``none``;
        statistics come from the train split's original rows.
    """

    method: Literal["standard", "minmax", "none"] = "standard"


class AugmentConfig(StrictModel):
    """Augmentation of the train split (images; tabular rows only get ``jitter``).

    Attributes:
        copies: augmented copies per original train row (originals are kept).
        hflip: probability of a horizontal flip.
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]).
        shift: maximum translation as a fraction of the width/height.
        zoom: maximum relative zoom (scale uniform in [1 - zoom, 1 + zoom]).
        shear: maximum shear in degrees.
        noise: standard deviation of Gaussian pixel noise, on the [0, 1] pixel scale (at most
            1: more is noise alone).
        jitter: standard deviation of Gaussian noise added to normalized numeric tabular
            features (at most 100, so float32 features stay finite); tabular copies are made
            only when it is positive.
        seed: seeds every row's draw, together with the row's id and copy number.
    """

    copies: int = Field(0, ge=0)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    rotate: float = Field(0.0, ge=0.0, le=180.0)
    shift: float = Field(0.0, ge=0.0, lt=1.0)
    zoom: float = Field(0.0, ge=0.0, lt=1.0)
    shear: float = Field(0.0, ge=0.0, lt=90.0)
    noise: float = Field(0.0, ge=0.0, le=1.0)
    jitter: float = Field(0.0, ge=0.0, le=100.0)
    seed: int = 0


class SplitConfig(StrictModel):
    """Attributes:
    val: fraction of each class that goes to the validation split.
    test: fraction of each class that goes to the test split.
    seed: seeds the stratified split.
    """

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"split.val + split.test must be < 1, got {self.val + self.test}")
        return self


class PrepareConfig(StrictModel):
    """The ``with:`` block of a ``data.prepare`` stage.

    Attributes:
        source: where the rows come from (``kind`` picks the reader).
        clean: cleaning and quarantine.
        split: the seeded stratified train/val/test split.
        normalize: normalization, fitted on the train split.
        augment: augmentation of the train split.
        rows_per_shard: rows per Parquet shard (the last shard of a split may be shorter).
        chunk_rows: input rows per read task; bounds each task's memory, not the output.
        tasks: Ray tasks in flight at once (default: the cluster's CPUs); not the output.
    """

    source: Source = Field(default_factory=lambda: SklearnDigitsSource(kind="sklearn_digits"))
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    augment: AugmentConfig = AugmentConfig()
    rows_per_shard: int = Field(4096, ge=1)
    chunk_rows: int = Field(8192, ge=1)
    tasks: int | None = Field(None, ge=1)
