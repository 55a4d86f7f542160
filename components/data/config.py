"""The typed configuration of ``data.prepare`` (the ``with:`` block of a pipeline stage).

Every default lives here, documented once. Importing this module costs pydantic and the
standard library only, so that validating a pipeline file never imports numpy, pyarrow or Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from components.api import StrictModel

#: The most classes a classification source may have (given or inferred from its labels). Work
#: and memory downstream grow with it (class-name lists, the split's strata, a confusion
#: matrix of C x C counts), so a number read from a file or a config is checked against it
#: before anything is sized by it.
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
        num_classes: labels must lie in ``[0, num_classes)`` (IDX labels are bytes: 256 at most).
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


#: The most distinct values a categorical column may hold (``max_levels`` may raise it).
MAX_LEVELS = 100_000
PACKAGE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class _TabularSource(StrictModel):
    """Fields shared by the tabular sources.

    Attributes:
        paths: the files, read in the order given.
        package: an installed package whose folder ``paths`` are relative to: data that ships
            inside a registry package (``statsmodels``: ``datasets/randhie/src/randhie.csv``).
        task: ``classification`` (integer class labels) or ``regression`` (a number; its mean
            and scale over the train split are stored with the dataset and the model, and
            undone at prediction; two rows are duplicates only when their targets are equal
            too).
        label_column: the target column (class labels, or the value a regression predicts).
        feature_columns: feature columns (default: every column but the label).
        categorical_columns: features kept as strings, neither normalized nor jittered; a
            model learns an embedding per level seen in the train split, and every other
            value (one never seen) falls into one shared bucket. Every other feature must be
            numeric.
        impute: what happens to a missing numeric value (empty, ``NA``, ``null``, ``NaN``):
            ``quarantine`` the row, or fill it with the train split's ``median`` or ``mode``
            (counted per column in the accounting). A missing category is a level of its own
            under ``quarantine``; ``median`` and ``mode`` fill it with the train split's most
            frequent level. Infinite and non-numeric values are always quarantined.
        max_levels: a categorical column with more distinct values than this fails the stage
            (an identifier is not a category: leave it out of the features).
        num_classes: labels must lie in ``[0, num_classes)``; default: non-negative labels,
            ``num_classes`` = largest label + 1 (at most ``MAX_CLASSES``).
    """

    paths: list[str] = Field(min_length=1)
    package: str | None = Field(None, pattern=PACKAGE_NAME)
    task: Literal["classification", "regression"] = "classification"
    label_column: str = "label"
    feature_columns: list[str] | None = None
    categorical_columns: list[str] = []
    impute: Literal["quarantine", "median", "mode"] = "quarantine"
    max_levels: int = Field(1000, ge=1, le=MAX_LEVELS)
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)

    @model_validator(mode="after")
    def _columns(self) -> _TabularSource:
        if self.task == "regression" and self.num_classes is not None:
            raise ValueError("num_classes is for classification; this source is a regression")
        if self.package is not None:
            for path in self.paths:
                if path.startswith("/") or ".." in Path(path).parts:
                    raise ValueError(
                        f"paths: {path!r} must be relative to the package's folder, inside it"
                    )
        named = [self.label_column, *(self.feature_columns or []), *self.categorical_columns]
        if any(not name for name in named):
            raise ValueError("column names must not be empty")
        if self.label_column in (self.feature_columns or []) + self.categorical_columns:
            raise ValueError(f"the label column {self.label_column!r} cannot also be a feature")
        return self

    def files(self) -> list[str]:
        """The files to read: ``paths``, or ``paths`` inside the installed ``package``'s folder
        (found without importing the package).

        Raises:
            ModuleNotFoundError: the package is not installed (the message says how to).
        """
        if self.package is None:
            return list(self.paths)
        import importlib.util

        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not folders:
            top = self.package.split(".")[0]
            raise ModuleNotFoundError(f"{self.package!r} is not installed (pip install {top})")
        return [str(Path(folders[0]) / p) for p in self.paths]


class CsvSource(_TabularSource):
    """CSV files with a header row. A file is read in pieces of ``chunk_rows`` rows, each by
    one task (a quoted field may span lines)."""

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


class SklearnDiabetesSource(StrictModel):
    """scikit-learn's bundled diabetes table: 442 patients, 10 numeric features (age, sex,
    bmi, bp, s1..s6, in their original units) and ``progression``, a disease-progression score
    one year later (regression)."""

    kind: Literal["sklearn_diabetes"]


Source = Annotated[
    SklearnDigitsSource
    | MnistIdxSource
    | Cifar10BinarySource
    | ImageFolderSource
    | CsvSource
    | ParquetSource
    | SklearnDiabetesSource,
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
