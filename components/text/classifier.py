"""``text.classifier``: an embedding + (bi)LSTM + pooling text classifier on Ray Train.

Read top to bottom: the config, the per-worker loop (``train_func``: the same function serves
the stage, Tune and the tests), the stage that drives it, then the family's data, bundle and
scores (used by ``tuning.py`` too). The network is ``models.LSTMClassifier``; shared Train
mechanics (checkpoint, resume, report, precision) are in ``components/training.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext
from components.contract import TrialData
from components.text.common import OptimizerSettings

TASK = "classification"


class TextClassifierConfig(OptimizerSettings):
    """Settings of ``text.classifier`` (the optimizer's are in ``OptimizerSettings``, the Ray
    Train ones in ``TrainSettings``).

    Attributes:
        epochs: passes over the training split.
        batch_size: per-worker batch size (texts).
        lr: peak learning rate.
        embed: embedding width.
        hidden: LSTM units per direction.
        layers: stacked LSTM layers.
        bidirectional: read each text both ways.
        pooling: ``max`` or ``mean`` over the tokens' outputs, or the ``last`` states.
        dropout: on the embeddings and before the head.
    """

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    embed: int = Field(128, ge=1)
    hidden: int = Field(128, ge=1)
    layers: int = Field(1, ge=1)
    bidirectional: bool = True
    pooling: Literal["max", "mean", "last"] = "max"
    dropout: float = Field(0.3, ge=0, lt=1)


# --- the per-worker loop ------------------------------------------------------------------


def hparams_of(spec, cfg: TextClassifierConfig) -> dict[str, Any]:
    """The architecture a config describes, for the texts of ``spec`` (a ``TextSpec``): the
    arguments of ``models.LSTMClassifier``."""
    return {
        "vocab_size": spec.vocab_size,
        "num_classes": spec.num_classes,
        "embed": cfg.embed,
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "bidirectional": cfg.bidirectional,
        "pooling": cfg.pooling,
        "dropout": cfg.dropout,
    }


def train_func(config: dict[str, Any]) -> None:
    """Trains on this worker's shard of ``train`` and evaluates on all of ``val`` every epoch;
    the last checkpoint holds the best epoch's weights (by validation accuracy). ``config``
    holds the ``training.Loop``: this component's config and the data's ``TextSpec``."""
    import ray.train
    import torch

    from components import training
    from components.text import common
    from components.text.models import LSTMClassifier

    loop = training.loop_of(config)
    cfg = loop.settings(TextClassifierConfig)
    spec = loop.data
    dev = training.device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = training.start_from(LSTMClassifier(**hparams_of(spec, cfg)), loop).to(dev)
    train = common.shard_rows("train", ("ids", "label"))
    val = common.shard_rows("val", ("ids", "label"))
    rows = len(train["label"])
    batches = -(-rows // cfg.batch_size)
    optimizer = common.optimizer_for(model, cfg.lr, cfg)
    scheduler = common.warmup_cosine(optimizer, cfg.epochs * batches, cfg)

    # Resume: after a worker failure (or a rerun of the stage) continue from the last epoch.
    state = training.restore()
    start_epoch, history, resumed_from = 0, [], None
    best = {"value": None, "epoch": -1, "model": training.cpu_state_dict(model)}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        resumed_from = start_epoch
    model = ray.train.torch.prepare_model(model)  # DDP across workers (gloo or NCCL)

    def snapshot(epoch: int) -> dict[str, Any]:
        """What a restart needs to continue after ``epoch`` (tensors and plain data only)."""
        return {
            "epoch": epoch,
            "model": training.cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "best": best,
            "resumed_from": resumed_from,
            "config": loop.config,
        }

    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        model.train()
        loss_sum, seen = 0.0, 0
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(0, rows, cfg.batch_size):
            idx = order[i : i + cfg.batch_size].numpy()
            ids, lengths = common.padded(train["ids"], idx, dev)
            y = torch.as_tensor(train["label"][idx], device=dev)
            with training.autocast(dev, cfg.precision):
                loss = torch.nn.functional.cross_entropy(model(ids, lengths), y)
            common.step(model, optimizer, scheduler, loss, cfg.grad_clip)
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        loss_sum, seen = training.all_reduce_sum([loss_sum, seen], dev)
        scores = evaluate(training.unwrap(model), val, spec.num_classes, dev, cfg.precision)
        metrics = {
            "epoch": epoch,
            "train/loss": loss_sum / max(seen, 1),
            "train/samples_per_s": seen / max(time.time() - started, 1e-9),
            "val/loss": scores["loss"],
            "val/accuracy": scores["accuracy"],
            "val/macro_f1": scores["macro_f1"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        if best["value"] is None or metrics["val/accuracy"] > best["value"]:
            best = {"value": metrics["val/accuracy"], "epoch": epoch}
            best["model"] = training.cpu_state_dict(model)
        training.report(metrics, snapshot(epoch), loop.progress)

    final = training.final_state(snapshot(cfg.epochs - 1), model)
    # A last report with the run facts (every rank's digest): a restart after it has no epoch
    # left, and reports the same again.
    training.report({"epoch": cfg.epochs - 1, "completed": True}, final)


def evaluate(module, rows: dict, num_classes: int, dev, precision: str = "fp32") -> dict:
    """Loss, accuracy, macro-F1 and confusion matrix over all ``rows`` (a whole split), in
    their order: every rank (and the test scoring) gets the same exact numbers."""
    import numpy as np
    import torch

    from components import training
    from components.metrics import confusion_matrix, scores
    from components.text.common import padded

    module.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n = 0.0, len(rows["label"])
    with torch.no_grad():
        for lo in range(0, n, 256):
            idx = np.arange(lo, min(lo + 256, n))
            ids, lengths = padded(rows["ids"], idx, dev)
            y = torch.as_tensor(rows["label"][idx], device=dev)
            with training.autocast(dev, precision):
                logits = module(ids, lengths).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            confusion += confusion_matrix(logits.argmax(1), y, num_classes).cpu()
    return {
        "loss": loss_sum / max(n, 1),
        **scores(confusion),
        "confusion": confusion.tolist(),
        "rows": n,
    }


# --- the stage ----------------------------------------------------------------------------


class TextClassifier(Component):
    """Trains an LSTM text classifier on a prepared text dataset (Ray Train, DDP)."""

    version = "1"
    Config = TextClassifierConfig
    produces = "model/text-classifier"
    trainable = "components.text.tuning:CLASSIFIER"

    def run(self, ctx: StageContext, config: TextClassifierConfig) -> dict[str, Any]:
        from components import training
        from components.metrics import write_confusion

        data = prepare(ctx)
        result = training.fit(train_func, config, ctx, data)
        state = result.state
        weights, hparams = state["best"]["model"], hparams_of(data.spec, config)
        scores, confusion = test_scores(load(weights, hparams, data, config), data.data_dir)
        save(ctx.out_dir, weights, hparams, data, config, scores)
        write_confusion(ctx.out_dir, confusion, data.spec.class_names)
        return {
            **scores,
            "best_epoch": state["best"]["epoch"],
            "best/val_metric": state["best"]["value"],
            **result.summary(),
        }


# --- the family's data, bundle and scores (also used by tuning.py) --------------------------


def prepare(ctx: StageContext) -> TrialData:
    """The text dataset in ``needs:`` (prepared for classification): train and val, read lazily,
    and its ``TextSpec``."""
    from components.text.prepare import read_text_dataset

    return read_text_dataset(ctx, "text.classifier", TASK)


def describe(hparams: dict, data: TrialData, config: TextClassifierConfig, metrics: dict):
    """The bundle of a classifier of ``data``'s texts (no weights yet)."""
    from components.bundle import Bundle

    info = _dataset_json(data.data_dir)
    return Bundle(
        component="text.classifier",
        kind="model/text-classifier",
        loader="components.text.inference:load_classifier",
        input={**data.spec.input_spec(), "max_tokens": info["max_tokens"]},
        output={"type": "classes", "num_classes": data.spec.num_classes},
        labels=list(data.spec.class_names),
        hparams=hparams,
        config=config.model_dump(mode="json"),
        metrics=metrics,
        meta={"tokenizer": data.spec.tokenizer, "max_tokens": info["max_tokens"]},
    )


def load(weights, hparams: dict, data: TrialData, config):
    """The inference object of weights in memory (as ``bundle.load_model`` would build it)."""
    from components.text.common import loaded

    return loaded(describe(hparams, data, config, {}), weights)


def save(out_dir: Path, weights, hparams: dict, data: TrialData, config, metrics: dict) -> None:
    """Writes the model's bundle (``bundle.json``, ``weights.pt``) into ``out_dir``."""
    from components.bundle import save_bundle

    save_bundle(out_dir, describe(hparams, data, config, metrics), {"model": weights})


def test_scores(model, data_dir: Path) -> tuple[dict[str, Any], list[list[int]]]:
    """Test accuracy, macro-F1 and loss of a loaded classifier on the token ids of a text
    dataset's test split, and the confusion matrix (one thread: the same bits everywhere)."""
    from components.text.common import one_thread, table_rows
    from components.text.prepare import load_split

    rows = table_rows(load_split(data_dir, "test"), ("ids", "label"))
    with one_thread():
        result = evaluate(model.module, rows, model.bundle.output["num_classes"], "cpu")
    scores = {
        "test/accuracy": result["accuracy"],
        "test/macro_f1": result["macro_f1"],
        "test/loss": result["loss"],
        "test/rows": result["rows"],
        "test/majority_accuracy": _majority(rows["label"]),
    }
    return scores, result["confusion"]


def _majority(labels) -> float:
    """The accuracy of always answering the most common class (what learning must beat)."""
    import numpy as np

    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


def _dataset_json(data_dir: Path) -> dict:
    import json

    from components.text.prepare import DATASET_FILE

    return json.loads((Path(data_dir) / DATASET_FILE).read_text())
