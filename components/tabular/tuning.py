"""The tabular family's hooks (``components/contract.py``), for ``tune.search``,
``tune.evaluate`` and every other consumer of a trained table model. They read the data, save
and score the model with the stage's own functions (``mlp.py``), so a model is read, saved and
scored one way wherever it was trained. Nothing in the family imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.api import StageContext
from components.contract import Compression, Mode, ScoreSettings, Smoke, Trainable, TrialData
from components.tabular.mlp import build_model, prepare, save_scored, test_scores, train_func

REGRESSION: dict[str, Mode] = {
    "test/rmse": "min",
    "test/mae": "min",
    "test/r2": "max",
    "test/loss": "min",
}
CLASSIFICATION: dict[str, Mode] = {
    "test/accuracy": "max",
    "test/macro_f1": "max",
    "test/loss": "min",
}


def export(out_dir: Path, checkpoint: Path, data: TrialData, config) -> dict[str, Any]:
    """Exports a search trial's model: its best epoch's weights (a trial ASHA stopped ends at
    an epoch checkpoint, without the final report), scored on the test split."""
    from components import training

    state = training.load_state(checkpoint)
    hparams = state.get("hparams") or build_model(data.spec, config).hparams
    return save_scored(out_dir, state["best"]["model"], hparams, data, config)


def score(bundle, ctx: StageContext, _settings: ScoreSettings) -> dict[str, Any]:
    """Test scores of a table model on the tabular dataset in ``needs:``."""
    from components.data.dataset import read_table_dataset

    data = ctx.input("dataset/tabular")
    read_table_dataset(data, bundle.component)
    return test_scores(bundle.load(), data.path)


def scored_on(bundle) -> dict[str, Mode]:
    """A regressor is gated on RMSE (lower is better), a classifier on accuracy."""
    return REGRESSION if bundle.output["type"] == "value" else CLASSIFICATION


def compression_inputs(model, data_dir: Path, split: str, n: int) -> tuple:
    """``n`` encoded rows of a split (numeric inputs, category codes; repeated if short)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from components.data.dataset import load_dataset_info

    tables, rows = [], 0
    for path in load_dataset_info(data_dir).shard_paths(split):
        tables.append(pq.read_table(path))
        rows += tables[-1].num_rows
        if rows >= n:
            break
    x_num, x_cat = model.spec.encode_shard(pa.concat_tables(tables))
    return tuple(torch.as_tensor(np.resize(x, (n, *x.shape[1:]))) for x in (x_num, x_cat))


TRAINABLE = Trainable(
    component="tabular.mlp",
    produces="model/mlp",
    train_func=train_func,
    # val/loss first: the default ranking of a search, for either task (see EarlyStopping)
    epoch_metrics={
        "val/loss": "min",
        "val/rmse": "min",
        "val/mae": "min",
        "val/r2": "max",
        "val/accuracy": "max",
        "val/macro_f1": "max",
        "train/loss": "min",
    },
    test_metrics={**REGRESSION, **CLASSIFICATION},
    scored_on=scored_on,
    prepare=prepare,
    export=export,
    score=score,
    keeps_best=True,  # the final checkpoint holds the best epoch's weights
    smoke=Smoke(
        config={"epochs": 3, "batch_size": 64, "widths": [16]},
        space={"lr": {"choice": [3.0e-3]}},
        needs=("dataset/tabular",),
    ),
    compression=Compression(
        quantize=("dynamic", "weight_only"), structured=True, inputs=compression_inputs
    ),
)
