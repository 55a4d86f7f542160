"""How raw table values become a model's inputs: one implementation for the data stage (which
writes the shards) and for every model that takes raw rows (a loaded tabular model's
``predict``), so that both give the same bits.

- numeric: parse (numbers, or text as a CSV holds it) -> fill a missing value (the train
  split's median or mode, where the source imputes) -> normalize: ``(x - shift) / divisor``,
  float32 (``normalization.apply``).
- categorical: text (None when missing) -> fill a missing value (the train split's most
  frequent level, where the source imputes) -> a code: 1 + the level's index among the train
  split's levels, or 0 (:data:`UNSEEN`) for a value the train split never held.
- a regression target is trained on ``(y - mean) / scale`` of the train split; predictions
  are mapped back with ``y = z * scale + mean`` (:meth:`TableSpec.target_units`).

Nothing here imports Ray or torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Text that means a missing value in a numeric column (compared lower-case, stripped).
MISSING_STRINGS = ("", "na", "n/a", "null", "none")
#: The code of a category the train split never held (and of a missing one it never held).
UNSEEN = 0
#: Reasons :func:`parse_numeric` gives that mean "no value" (filled where the source imputes).
MISSING_REASONS = ("missing_value", "nan")


def parse_numeric(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Parses a column into float64; returns (values, reason per row or '' when fine).

    ``values`` is a pyarrow array (numbers or text), a pandas Series or a sequence (numbers,
    text or None). Reasons: ``missing_value`` (null, or text in :data:`MISSING_STRINGS`),
    ``nan``, ``inf``, ``non_numeric``; a row with a reason holds 0.0.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if isinstance(values, pa.ChunkedArray) and (
        pa.types.is_integer(values.type)
        or pa.types.is_floating(values.type)
        or pa.types.is_boolean(values.type)
        or pa.types.is_decimal(values.type)
        or pa.types.is_null(values.type)
    ):
        missing = pc.is_null(values).to_numpy(zero_copy_only=False)
        out = pc.cast(values, pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        return _numeric_reasons(out, missing)
    if isinstance(values, pa.ChunkedArray):
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = pc.cast(values, pa.string())
        text = pd.Series(values.to_pylist(), dtype=object)
    else:
        text = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
        if pd.api.types.is_numeric_dtype(text.dtype) or pd.api.types.is_bool_dtype(text.dtype):
            out = text.to_numpy(dtype=np.float64, na_value=np.nan)
            return _numeric_reasons(out, np.zeros(len(out), dtype=bool), nan_is_missing=True)
        if text.dtype == object and text.map(_is_number).all():
            # row dicts of Python numbers (None and NaN are missing)
            out = text.to_numpy(dtype=np.float64, na_value=np.nan)
            return _numeric_reasons(out, np.zeros(len(out), dtype=bool), nan_is_missing=True)
        text = text.astype(object)
    missing_null = text.isna().to_numpy()
    text = text.where(~text.isna(), "").astype(str).str.strip()
    lower = text.str.lower()
    out = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    reason = np.full(len(out), "", dtype=object)
    reason[np.isnan(out) & lower.isin(["nan", "+nan", "-nan"]).to_numpy()] = "nan"
    reason[np.isnan(out) & (reason == "")] = "non_numeric"
    reason[np.isinf(out)] = "inf"
    reason[lower.isin(MISSING_STRINGS).to_numpy() | missing_null] = "missing_value"
    return np.where(reason == "", out, 0.0), reason


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _numeric_reasons(
    out: np.ndarray, missing: np.ndarray, nan_is_missing: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    reason = np.full(len(out), "", dtype=object)
    reason[np.isnan(out)] = "missing_value" if nan_is_missing else "nan"
    reason[np.isinf(out)] = "inf"
    reason[missing] = "missing_value"
    return np.where(reason == "", out, 0.0), reason


def category_text(values: Any) -> list[str | None]:
    """A categorical column as text: None where missing (null, NaN or blank text)."""
    import pyarrow as pa

    if isinstance(values, pa.Array | pa.ChunkedArray):
        values = values.to_pylist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):
            out.append(None)
            continue
        text = v if isinstance(v, str) else str(v)
        out.append(text if text.strip() else None)
    return out


def fill_numeric(x: np.ndarray, fill: list[float | None]) -> np.ndarray:
    """``x`` (N, F) float64 with NaN where a value is missing, each column's NaN replaced by its
    fill value (columns without one keep NaN)."""
    x = np.array(x, dtype=np.float64)
    for j, value in enumerate(fill):
        if value is not None:
            col = x[:, j]
            col[np.isnan(col)] = value
    return x


def numeric_inputs(x: np.ndarray, fill: list[float | None], stats: dict[str, Any]) -> np.ndarray:
    """Raw numeric features (N, F) float64 (NaN: missing) -> the model's float32 inputs: filled,
    then normalized as the shards are."""
    from components.data import normalization

    x = fill_numeric(x, fill)
    if x.shape[1] == 0:
        return x.astype(np.float32)
    return normalization.apply(x, stats)


def category_codes(values: Any, levels: list[str | None]) -> np.ndarray:
    """Codes of a categorical column's values (text, None when missing): 1 + the index of the
    level, or :data:`UNSEEN` (0) for a value not among ``levels``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(values, pa.Array | pa.ChunkedArray):
        values = pa.array(values, pa.string())
    elif not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    index = pc.index_in(values, value_set=pa.array(levels, pa.string()), skip_nulls=False)
    return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1


@dataclass(frozen=True)
class TableSpec:
    """What a model of a table needs to know of its data, in every worker and in the model's
    bundle (picklable, JSON-friendly through :meth:`to_dict`).

    Attributes:
        task: ``classification`` or ``regression``.
        target: the target column's name in the source (and in rows given to a model).
        label_column: the target's column in the shards (``label``: int64 class ids;
            ``target``: float64, in the target's own units).
        numeric: numeric feature columns, float32 and normalized in the shards.
        categorical: categorical feature columns, text in the shards.
        normalization: the numeric features' ``shift`` and ``divisor`` (and statistics).
        impute: the source's ``impute`` setting (``quarantine``, ``median``, ``mode``).
        fill: per column, the value a missing one is filled with (None: none, the row is
            quarantined (numeric) or the missing category is a level of its own).
        levels: per categorical column, the train split's levels (code = index + 1).
        target_normalization: ``mean`` and ``scale`` of a regression target over the train
            split (None for classification).
        num_classes: classes (classification).
        class_names: a name per class (classification).
        rows: rows per split.
    """

    task: str
    target: str
    label_column: str
    numeric: list[str]
    categorical: list[str]
    normalization: dict[str, Any]
    impute: str = "quarantine"
    fill: dict[str, Any] = field(default_factory=dict)
    levels: dict[str, list[str | None]] = field(default_factory=dict)
    target_normalization: dict[str, float] | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, info: Any) -> TableSpec:
        """The spec of a prepared table (a ``DatasetInfo`` of kind ``tabular``)."""
        raw = info.raw
        return cls(
            task=raw.get("task", "classification"),
            target=raw.get("target") or raw["config"]["source"].get("label_column", "label"),
            label_column=raw.get("label_column", "label"),
            numeric=list(info.feature_columns),
            categorical=list(info.categorical_columns),
            normalization=info.normalization,
            impute=raw.get("impute", "quarantine"),
            fill=dict(raw.get("fill") or {}),
            levels={c: list(v) for c, v in (raw.get("levels") or {}).items()},
            target_normalization=raw.get("target_normalization"),
            num_classes=info.num_classes,
            class_names=list(info.class_names) if info.class_names else None,
            rows={split: s["rows"] for split, s in info.splits.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableSpec:
        return cls(**data)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    def cardinalities(self) -> list[int]:
        """Codes per categorical column: its train levels and the unseen bucket."""
        return [len(self.levels.get(c, [])) + 1 for c in self.categorical]

    def input_spec(self) -> dict[str, Any]:
        """The bundle input spec of a model taking rows of this table (``bundle.py``)."""
        return {
            "type": "table",
            "columns": list(self.numeric),
            "categorical": list(self.categorical),
            "target": self.target,
        }

    def numeric_fill(self) -> list[float | None]:
        return [self.fill.get(c) for c in self.numeric]

    def target_units(self, z: np.ndarray) -> np.ndarray:
        """Standardized regression outputs back in the target's own units (float64)."""
        t = self.target_normalization or {"mean": 0.0, "scale": 1.0}
        return np.asarray(z, dtype=np.float64) * t["scale"] + t["mean"]

    def standardize_target(self, y: np.ndarray) -> np.ndarray:
        """A regression target in its own units -> what the model is trained on (float32)."""
        t = self.target_normalization or {"mean": 0.0, "scale": 1.0}
        return ((np.asarray(y, dtype=np.float64) - t["mean"]) / t["scale"]).astype(np.float32)

    # -- model inputs -----------------------------------------------------------------------

    def encode_shard(self, table: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs of a shard batch (a ``pyarrow.Table``): the numeric features as stored
        (already filled and normalized) and the categories' codes."""
        x_num = (
            np.stack([_float32(table.column(c)) for c in self.numeric], axis=1)
            if self.numeric
            else np.zeros((table.num_rows, 0), np.float32)
        )
        x_cat = self._codes({c: table.column(c) for c in self.categorical}, table.num_rows)
        return x_num, x_cat

    def encode_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs of raw rows (row dicts or a pandas DataFrame in the source's units),
        filled, normalized and encoded exactly as the data stage did.

        Raises:
            ValueError: a column is absent, or a numeric value is not a finite number (or is
                missing where the source quarantined missing values); names row and column.
        """
        import pandas as pd

        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        absent = [c for c in [*self.numeric, *self.categorical] if c not in frame.columns]
        if absent:
            raise ValueError(
                f"the rows lack column(s) {absent}; the model takes {self.numeric}"
                f" and categorical {self.categorical}"
            )
        raw = np.zeros((len(frame), len(self.numeric)), dtype=np.float64)
        for j, col in enumerate(self.numeric):
            values, reason = parse_numeric(frame[col].reset_index(drop=True))
            fillable = np.isin(reason, MISSING_REASONS) & (self.fill.get(col) is not None)
            bad = (reason != "") & ~fillable
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                why = reason[i]
                if why in MISSING_REASONS:
                    why += " (the data stage quarantined such rows: impute: median fills them)"
                raise ValueError(f"row {i}, column {col!r}: {quote(frame[col].iloc[i])} is {why}")
            raw[:, j] = np.where(fillable, np.nan, values)
        x_num = numeric_inputs(raw, self.numeric_fill(), self.normalization)
        cats = {c: category_text(frame[c]) for c in self.categorical}
        return x_num, self._codes(cats, len(frame), fill=True)

    def _codes(self, columns: dict[str, Any], n: int, fill: bool = False) -> np.ndarray:
        if not self.categorical:
            return np.zeros((n, 0), np.int64)
        codes = []
        for c in self.categorical:
            values = columns[c]
            if fill and self.fill.get(c) is not None:
                values = [self.fill[c] if v is None else v for v in values]
            codes.append(category_codes(values, self.levels.get(c, [])))
        return np.stack(codes, axis=1)


def _float32(column: Any) -> np.ndarray:
    return column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def quote(value: Any, limit: int = 200) -> str:
    """A value for a message or the quarantine, cut to ``limit`` characters (a cell may be
    megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
