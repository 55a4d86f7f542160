"""The text family's hooks (``components/contract.py``) for ``text.classifier`` and ``text.lm``:
for ``tune.search``, ``tune.evaluate`` and every other consumer of a trained text model. They
read the data, save and score the model with the stages' own functions (``classifier.py``,
``lm.py``), so a model is scored one way wherever it was trained. Nothing in the family
imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.api import StageContext
from components.contract import Compression, ScoreSettings, Smoke, Trainable, TrialData
from components.text import classifier, lm


def _export(family):
    def export(out_dir: Path, checkpoint: Path, data: TrialData, config) -> dict[str, Any]:
        """A search trial's model: its best evaluation's weights (a trial ASHA stopped ends at
        an epoch checkpoint, which holds them too), scored on the test split."""
        from components import training

        weights = training.load_state(checkpoint)["best"]["model"]
        hparams = family.hparams_of(data.spec, config)
        metrics = _scores(family, family.load(weights, hparams, data, config), data.data_dir)
        family.save(out_dir, weights, hparams, data, config, metrics)
        return metrics

    return export


def _score(family):
    def score(bundle, ctx: StageContext, _settings: ScoreSettings) -> dict[str, Any]:
        """Test scores of a trained model on the text dataset in ``needs:``; its tokenizer
        must be the one the model was trained with."""
        data = family.prepare(ctx)
        if bundle.meta["tokenizer"] != data.spec.tokenizer:
            raise ValueError(
                f"the {bundle.component} model was trained on another tokenization than the "
                f"text dataset of stage {data.data_stage!r}"
            )
        return _scores(family, bundle.load(), data.data_dir)

    return score


def _scores(family, model, data_dir: Path) -> dict[str, Any]:
    scores = family.test_scores(model, data_dir)
    return scores[0] if isinstance(scores, tuple) else scores  # the classifier's: + confusion


def _classifier_inputs(_model, data_dir: Path, split: str, n: int) -> tuple:
    """``n`` texts of a split as padded ids and lengths (repeated if the split is short)."""
    import numpy as np

    from components.text.common import padded, table_rows
    from components.text.prepare import load_split

    rows = table_rows(load_split(data_dir, split), ("ids", "label"))
    return padded(rows["ids"], np.arange(n) % max(len(rows["label"]), 1), "cpu")


def _lm_inputs(model, data_dir: Path, split: str, n: int) -> tuple:
    """``n`` windows of the model's context from a split's tokens."""
    import numpy as np
    import torch

    from components.text.common import table_rows
    from components.text.prepare import load_split

    flat = table_rows(load_split(data_dir, split), ("ids",))["ids"][0]
    context = model.bundle.config["context"]
    return (torch.as_tensor(np.resize(flat, n * context).reshape(n, context)),)


CLASSIFIER = Trainable(
    component="text.classifier",
    produces="model/text-classifier",
    train_func=classifier.train_func,
    epoch_metrics={
        "val/accuracy": "max",
        "val/loss": "min",
        "val/macro_f1": "max",
        "train/loss": "min",
    },
    test_metrics={"test/accuracy": "max", "test/macro_f1": "max", "test/loss": "min"},
    prepare=classifier.prepare,
    export=_export(classifier),
    score=_score(classifier),
    keeps_best=True,  # the final checkpoint holds the best epoch's weights
    smoke=Smoke(
        config={
            "epochs": 2,
            "batch_size": 16,
            "embed": 16,
            "hidden": 16,
            "warmup_steps": 0,
            "lr": 1.0e-2,
        },
        space={"lr": {"choice": [1.0e-2]}},
        needs=("dataset/text/classification",),
    ),
    compression=Compression(
        quantize=("dynamic", "weight_only"), structured=False, inputs=_classifier_inputs
    ),
)

LM = Trainable(
    component="text.lm",
    produces="model/lm",
    train_func=lm.train_func,
    epoch_metrics={"val/loss": "min", "val/bpc": "min", "train/loss": "min"},
    test_metrics={"test/loss": "min", "test/bpc": "min", "test/perplexity": "min"},
    prepare=lm.prepare,
    export=_export(lm),
    score=_score(lm),
    keeps_best=True,  # the final checkpoint holds the best evaluation's weights
    smoke=Smoke(
        config={
            "epochs": 2,
            "steps_per_epoch": 5,
            "batch_size": 8,
            "context": 16,
            "gpt_layers": 1,
            "gpt_width": 32,
            "warmup_steps": 0,
            "sample_tokens": 20,
        },
        space={"lr": {"choice": [3.0e-3]}},
        needs=("dataset/text/language_model",),
    ),
    compression=Compression(
        quantize=("dynamic", "weight_only"), structured=False, inputs=_lm_inputs
    ),
)
