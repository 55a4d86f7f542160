"""The vision family's hooks (``components/contract.py``), for ``tune.search``,
``tune.evaluate`` and every other consumer of a trained classifier. They read the data, save
and score the model with the stage's own functions (``train.py``), so a classifier is read,
saved and scored one way wherever it was trained. Nothing in the family imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.api import StageContext
from components.contract import Compression, ScoreSettings, Smoke, Trainable, TrialData
from components.vision.train import (
    build_classifier,
    describe,
    prepare,
    save,
    test_scores,
    train_func,
)


def export(out_dir: Path, checkpoint: Path, data: TrialData, config) -> dict[str, Any]:
    """Exports a search trial's classifier: its best epoch's weights (a trial ASHA stopped
    ends at an epoch checkpoint, without the final test pass), scored on the test split."""
    from dataclasses import replace

    from components import training

    state = training.load_state(checkpoint)
    weights = state["best"]["model"]
    hparams = state.get("hparams") or build_classifier(data.spec, config).hparams
    bundle = describe(hparams, data.spec, config, {})
    metrics = test_scores(replace(bundle, tensors={"model": weights}).load(), data.data_dir)
    save(out_dir, weights, hparams, data, config, metrics)
    return metrics


def score(bundle, ctx: StageContext, _settings: ScoreSettings) -> dict[str, Any]:
    """Test accuracy, macro-F1 and loss of a classifier on the image dataset in ``needs:``."""
    from components.data.dataset import read_image_dataset

    data = ctx.input("dataset")
    read_image_dataset(data, bundle.component)
    return test_scores(bundle.load(), data.path)


def compression_inputs(_model, data_dir: Path, split: str, n: int) -> tuple:
    """``n`` normalized images of a split (its rows repeated if it has fewer)."""
    import numpy as np
    import torch

    from components.data.dataset import load_numpy

    x, _ = load_numpy(data_dir, split)
    return (torch.as_tensor(np.resize(x, (n, *x.shape[1:]))),)


TRAINABLE = Trainable(
    component="vision.train",
    produces="model/classifier",
    train_func=train_func,
    epoch_metrics={
        "val/accuracy": "max",
        "val/loss": "min",
        "val/macro_f1": "max",
        "train/loss": "min",
    },
    test_metrics={"test/accuracy": "max", "test/macro_f1": "max", "test/loss": "min"},
    prepare=prepare,
    export=export,
    score=score,
    keeps_best=True,  # the final checkpoint holds the best epoch's weights
    smoke=Smoke(
        config={"epochs": 2, "batch_size": 64, "width": 8, "depth": 1},
        space={"lr": {"choice": [3.0e-3]}},
        needs=("dataset/image",),
    ),
    compression=Compression(
        quantize=("dynamic", "static", "weight_only"), structured=True, inputs=compression_inputs
    ),
)
