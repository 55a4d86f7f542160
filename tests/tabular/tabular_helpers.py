"""Small real tables for the tabular tests, and a pipeline around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def regression_source(path: Path, label: str, categorical: list[str], **more) -> dict:
    """A data.prepare ``source`` of one table file (CSV or Parquet, by its suffix) whose
    ``label`` column is a regression target."""
    return {
        "kind": "parquet" if str(path).endswith(".parquet") else "csv",
        "paths": [str(path)],
        "task": "regression",
        "label_column": label,
        "categorical_columns": categorical,
        **more,
    }


def diabetes_frame() -> pd.DataFrame:
    """scikit-learn's diabetes table in its original units (what ``sklearn_diabetes`` reads)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    frame = pd.DataFrame(data.data, columns=[n for n in data.feature_names])
    frame["progression"] = data.target
    return frame


def shop_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A table whose target depends on a category, a numeric feature with missing values and
    a second category with missing values: ``y = effect[city] + 2 x + noise`` (x median 0)."""
    rng = np.random.default_rng(seed)
    effect = {"paris": -3.0, "lima": 0.0, "oslo": 2.0, "kyiv": 5.0}
    city = rng.choice(list(effect), n)
    x = rng.normal(size=n).round(4)
    y = np.array([effect[c] for c in city]) + 2 * x + rng.normal(scale=0.3, size=n)
    frame = pd.DataFrame(
        {
            "x": x.astype(object),
            "city": city,
            "channel": rng.choice(["web", "shop"], n).astype(object),
            "y": y.round(4),
        }
    )
    frame.loc[frame.index % 9 == 0, "x"] = ""  # missing: filled with the train median
    frame.loc[frame.index % 13 == 0, "channel"] = ""  # missing category: filled with the mode
    return frame


def pipeline(storage: Path, source: dict, model: dict, split: dict | None = None) -> Path:
    """A pipeline file: ``prepare`` (data.prepare of ``source``) and ``model`` (tabular.mlp)."""
    import yaml

    path = storage.parent / f"p-{abs(hash(repr((source, model, split))))}.yaml"
    stages = {
        "prepare": {
            "uses": "data.prepare",
            "with": {"source": source, "split": split or {"val": 0.15, "test": 0.2, "seed": 0}},
        },
        "model": {
            "uses": "tabular.mlp",
            "needs": ["prepare"],
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "with": model,
        },
    }
    path.write_text(
        yaml.safe_dump({"name": "tabular-test", "storage": str(storage), "stages": stages})
    )
    return path
