"""What ``tune.search`` and ``tune.evaluate`` need to know of each trainable component.

An adapter says which ``train_func`` a trial runs, how to build its loop config and datasets
from the data artifact, which metrics it reports every epoch, how to export the best trial as
the component's own artifact, and how to score an exported model on the test split. Adding a
trainable (``generative.vae``, ``rl.ddpg`` ...) means adding one adapter here.

This module stays light to import: torch and Ray are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.api import StageContext, StrictModel


@dataclass(frozen=True)
class TrialData:
    """What every trial of a search shares: datasets (materialized once), the loop config
    without the component's own settings, the dataset description and its size."""

    datasets: dict[str, Any]
    loop: dict[str, Any]
    info: Any
    data_dir: Path


@dataclass(frozen=True)
class Adapter:
    """How to search over and evaluate one trainable component.

    Attributes:
        component: the ``uses:`` name.
        train_func: import path (``module:function``) of the per-worker loop.
        epoch_metrics: metrics the loop reports every epoch (what a search may optimize).
        test_metrics: metrics :attr:`evaluate` returns (what a gate may compare).
        split: datasets sharded across the workers (the others reach each worker whole).
        prepare: builds the :class:`TrialData` from the stage context.
        export: writes the artifact of a finished trial's state; returns its test metrics.
        evaluate: scores an exported artifact on the test split of a data artifact.
    """

    component: str
    train_func: str
    epoch_metrics: tuple[str, ...]
    test_metrics: tuple[str, ...]
    split: tuple[str, ...]
    prepare: Callable[[StageContext], TrialData]
    export: Callable[[Path, dict[str, Any], TrialData, StrictModel], dict[str, Any]]
    evaluate: Callable[[Path, Path], dict[str, Any]]

    def load_train_func(self) -> Callable[[dict[str, Any]], None]:
        import importlib

        module, _, attr = self.train_func.partition(":")
        return getattr(importlib.import_module(module), attr)


# --- vision.train ---------------------------------------------------------------------------


def _vision_prepare(ctx: StageContext) -> TrialData:
    from components.data.dataset import load_dataset_info, read_split

    data = ctx.input("data.")
    info = load_dataset_info(data.path)
    if info.kind != "image":
        raise ValueError(
            f"vision.train needs an image dataset; stage {data.stage!r} produced {info.kind}"
        )
    # Read once into the object store: every trial shares the blocks, and no trial waits for
    # a free CPU to re-read shards while the others' workers hold every CPU.
    datasets = {s: read_split(data.path, s).materialize() for s in ("train", "val", "test")}
    loop = {
        "image_shape": list(info.image_shape),
        "num_classes": info.num_classes,
        "normalization": info.normalization,
    }
    return TrialData(datasets, loop, info, data.path)


def _vision_export(
    out_dir: Path, state: dict[str, Any], data: TrialData, config: StrictModel
) -> dict[str, Any]:
    from components.vision.model import Classifier
    from components.vision.train import export

    # A trial that ASHA stopped ends at an epoch checkpoint, without the final test pass:
    # rebuild the architecture from its config and keep its best epoch's weights.
    c, h, w = data.info.image_shape
    cfg = config.model_dump()
    arch = (cfg["width"], cfg["depth"], cfg["dropout"], cfg["batch_norm"])
    hparams = state.get("hparams") or Classifier(c, data.info.num_classes, (h, w), *arch).hparams
    model = Classifier.from_hparams(hparams)
    model.load_state_dict(state["best"]["model"])
    model.eval()
    info = data.info
    metrics = _vision_score(model, list(info.image_shape), info.num_classes, data.data_dir)
    export(out_dir, state["best"]["model"], hparams, data.info, config, metrics)
    return metrics


def _vision_evaluate(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    from components.vision.train import load_classifier

    model, bundle = load_classifier(model_dir)
    return _vision_score(model, bundle["image_shape"], len(bundle["class_names"]), data_dir)


def _vision_score(model, image_shape: list[int], num_classes: int, data_dir: Path) -> dict:
    """Test accuracy, macro-F1 and loss of a classifier (eval mode, CPU) on a data artifact."""
    import torch

    from components.data.dataset import load_numpy
    from components.vision.model import confusion_matrix, scores

    x, y = load_numpy(data_dir, "test")
    if list(x.shape[1:]) != list(image_shape):
        raise ValueError(
            f"the model takes images {list(image_shape)}, the test split of {data_dir} has "
            f"{list(x.shape[1:])}"
        )
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor(x[i : i + 512])) for i in range(0, len(x), 512)])
    target = torch.as_tensor(y)
    result = scores(confusion_matrix(logits.argmax(1), target, num_classes))
    return {
        "test/accuracy": result["accuracy"],
        "test/macro_f1": result["macro_f1"],
        "test/loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "test/rows": len(y),
    }


ADAPTERS: dict[str, Adapter] = {
    "vision.train": Adapter(
        component="vision.train",
        train_func="components.vision.train:train_func",
        epoch_metrics=("val/accuracy", "val/loss", "val/macro_f1", "train/loss"),
        test_metrics=("test/accuracy", "test/macro_f1", "test/loss"),
        split=("train",),
        prepare=_vision_prepare,
        export=_vision_export,
        evaluate=_vision_evaluate,
    ),
}


def get(component: str) -> Adapter:
    """The adapter of a trainable component.

    Raises:
        ValueError: the component has no adapter (the message lists those that do).
    """
    try:
        return ADAPTERS[component]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"{component!r} cannot be tuned or gated yet; known: {known}") from None
