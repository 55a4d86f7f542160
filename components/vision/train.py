"""``vision.train``: trains the CNN classifier on an image dataset with Ray Train.

Read top to bottom: the config, the per-worker loop (``train_func``: the same function serves
the stage, Tune and the tests), and the stage that drives it. Reading the data, exporting,
loading and scoring the model are the family's hooks in ``tuning.py``; the network is in
``model.py``; shared Train mechanics (checkpoint, resume, report, precision) live in
``components/training.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext, StrictModel
from components.contract import TrialData
from components.training import TrainSettings


class EarlyStopping(StrictModel):
    """Stops when ``metric`` has not improved for ``patience`` epochs."""

    metric: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(5, ge=1)


class VisionTrainConfig(TrainSettings):
    """Settings of ``vision.train`` (the shared ones are in ``TrainSettings``).

    Attributes:
        epochs: passes over the training split.
        batch_size: per-worker batch size.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, Nesterov).
        schedule: ``cosine`` (to zero over ``epochs``), ``step`` or ``none``.
        step_size: epochs between decays (``step``).
        gamma: decay factor (``step``).
        label_smoothing: cross-entropy label smoothing.
        width: channels of the first convolution block.
        depth: convolution blocks.
        dropout: dropout before the classifier head.
        batch_norm: batch norm after each convolution.
        early_stopping: stop when a validation metric stalls (off when null).
        train_data: ``memory``: each worker reads its share of the train split (and the val
            and test splits) once into tensors and shuffles it whole every epoch; ``stream``:
            reads them from the shards every epoch (data larger than memory); ``auto``:
            memory when that takes under 1 GiB per worker.
        shuffle_buffer: rows in the local shuffle buffer of each worker (``stream`` only).
    """

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = Field(5, ge=1)
    gamma: float = Field(0.5, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    width: int = Field(32, ge=1)
    depth: int = Field(2, ge=1, le=6)
    dropout: float = Field(0.2, ge=0, lt=1)
    batch_norm: bool = True
    early_stopping: EarlyStopping | None = None
    train_data: Literal["auto", "memory", "stream"] = "auto"
    shuffle_buffer: int = Field(2048, ge=0)


# --- the per-worker loop ------------------------------------------------------------------


def build_classifier(spec, cfg: VisionTrainConfig):
    """The classifier a config describes, for images of ``spec`` (an ``ImageSpec``)."""
    from components.vision.model import Classifier

    c, h, w = spec.image_shape
    return Classifier(
        c,
        spec.num_classes,
        (h, w),
        width=cfg.width,
        depth=cfg.depth,
        dropout=cfg.dropout,
        batch_norm=cfg.batch_norm,
    )


def train_func(config: dict[str, Any]) -> None:
    """Trains on this worker's shard of ``train``; evaluates on ``val`` every epoch and on
    ``test`` at the end with the best model. ``config`` holds the ``training.Loop``: this
    component's config and the data's ``ImageSpec``."""
    import ray.train
    import torch
    from torch import nn

    from components import training

    loop = training.loop_of(config)
    cfg = loop.settings(VisionTrainConfig)
    spec = loop.data
    dev = training.device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    num_classes = spec.num_classes
    model = training.start_from(build_classifier(spec, cfg), loop)  # fine-tuning: given weights
    model.to(dev)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # Resume: after a worker failure (or a rerun of the stage) continue from the last epoch.
    state = training.restore()
    start_epoch, history, resumed_from, stopped = 0, [], None, False
    best = {"value": None, "epoch": -1, "model": training.cpu_state_dict(model), "stale": 0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        resumed_from, stopped = start_epoch, state["stopped"]
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
            "stopped": stopped,
            "resumed_from": resumed_from,
            "config": loop.config,
        }

    held = keeps_in_memory(spec, cfg, training.world()[1])
    train_split, val_split = (Split(name, dev, held, cfg) for name in ("train", "val"))
    stop = cfg.early_stopping
    watched = stop.metric if stop else "val/accuracy"
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        started = time.time()
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in train_split.batches(cfg.batch_size, shuffle_seed=cfg.seed + epoch):
            with training.autocast(dev, cfg.precision):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        scheduler.step()
        training.sync_buffers(model)
        loss_sum, seen = training.all_reduce_sum([loss_sum, seen], dev)
        val = evaluate(model, val_split, criterion, num_classes, dev, cfg)
        metrics = {
            "epoch": epoch,
            "train/loss": loss_sum / max(seen, 1),
            "train/samples_per_s": seen / max(time.time() - started, 1e-9),
            "val/loss": val["loss"],
            "val/accuracy": val["accuracy"],
            "val/macro_f1": val["macro_f1"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        value = metrics[watched]
        maximize = stop is None or stop.mode == "max"
        if best["value"] is None or (value > best["value"] if maximize else value < best["value"]):
            best = {"value": value, "epoch": epoch, "model": training.cpu_state_dict(model)}
        best["stale"] = epoch - best["epoch"]
        stopped = stop is not None and best["stale"] >= stop.patience
        training.report(metrics, snapshot(epoch), loop.progress)
        if stopped:
            break

    # Every rank's digest of the trained weights, before the best epoch's are loaded back.
    final = training.final_state(snapshot(max(epoch, start_epoch - 1)), model)
    # The final test evaluation uses the best model, as the artifact will.
    training.unwrap(model).load_state_dict(best["model"])
    test = evaluate(model, Split("test", dev, held, cfg), criterion, num_classes, dev, cfg)
    # stopped: a restart after this point only repeats the test evaluation.
    final.update(stopped=True, test=test, hparams=training.unwrap(model).hparams)
    training.report({"epoch": epoch, "test/accuracy": test["accuracy"]}, final)


def keeps_in_memory(spec, cfg: VisionTrainConfig, workers: int) -> bool:
    """Whether each worker holds its data in memory (``train_data``): its share of the train
    split and the whole val and test splits (every rank evaluates every row)."""
    from components import training

    if cfg.train_data != "auto":
        return cfg.train_data == "memory"
    rows = spec.rows.get("train", 0) / max(workers, 1) + spec.rows.get("val", 0)
    rows = max(rows, spec.rows.get("test", 0))  # test is read after val is let go
    return rows * spec.bytes_per_row() < training.MEMORY_LIMIT_BYTES


class Split:
    """One split as a worker reads it, in (images, labels) batches on ``dev``: held in memory
    (read once, shuffled whole by a seed each epoch) or streamed from its Ray Train shard every
    pass (shuffled in a local buffer of ``shuffle_buffer`` rows)."""

    def __init__(self, name: str, dev, held: bool, cfg: VisionTrainConfig):
        import ray.train

        self.dev, self.buffer = dev, cfg.shuffle_buffer
        self.shard = ray.train.get_dataset_shard(name)
        self.tensors = self._read() if held else None

    def _read(self):
        import torch

        from components import training

        rows = training.read_shard_of(self.shard)
        if "image" not in rows:  # an empty shard: no batches
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        images = torch.as_tensor(rows["image"], dtype=torch.float32, device=self.dev)
        return images, torch.as_tensor(rows["label"], dtype=torch.long, device=self.dev)

    def batches(self, batch_size: int, shuffle_seed: int | None = None):
        """Batches in a seeded shuffle (``shuffle_seed``) or in row order (None)."""
        from components import training

        if self.tensors is not None:
            yield from training.batches(self.tensors, batch_size, shuffle_seed)
            return
        shuffled = shuffle_seed is not None and self.buffer > 0
        for batch in self.shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=self.buffer if shuffled else None,
            local_shuffle_seed=shuffle_seed if shuffled else None,
            device=self.dev,
        ):
            yield batch["image"], batch["label"]


def evaluate(model, split: Split, criterion, num_classes: int, dev, cfg: VisionTrainConfig) -> dict:
    """Loss, accuracy, macro-F1 and confusion matrix over a whole (unsplit) split.

    Every rank evaluates all rows with the plain module (no DDP collectives), so each gets the
    same exact numbers.
    """
    import torch

    from components import training
    from components.metrics import confusion_matrix, scores

    model = training.unwrap(model)
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=dev)
    loss_sum, seen = 0.0, 0
    with torch.no_grad():
        for x, y in split.batches(max(cfg.batch_size, 256)):
            with training.autocast(dev, cfg.precision):
                logits = model(x)
            loss_sum += float(criterion(logits.float(), y)) * len(y)
            seen += len(y)
            confusion += confusion_matrix(logits.argmax(1), y, num_classes)
    confusion = confusion.cpu()
    return {
        "loss": loss_sum / max(seen, 1),
        **scores(confusion),
        "confusion": confusion.tolist(),
        "rows": seen,
    }


def _optimizer(model, cfg: VisionTrainConfig):
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(optimizer, cfg: VisionTrainConfig):
    import torch

    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


# --- the stage ----------------------------------------------------------------------------


class VisionTrain(Component):
    """Trains the CNN classifier on a prepared image dataset (Ray Train, DDP)."""

    version = "3"  # 2: the model bundle (bundle.json + weights.pt); 3: data held in memory
    Config = VisionTrainConfig
    produces = "model/classifier"
    trainable = "components.vision.tuning:TRAINABLE"

    def run(self, ctx: StageContext, config: VisionTrainConfig) -> dict[str, Any]:
        from components import training
        from components.metrics import write_confusion

        data = prepare(ctx)
        result = training.fit(train_func, config, ctx, data)
        state, test = result.state, result.state["test"]
        scores = {"test/accuracy": test["accuracy"], "test/macro_f1": test["macro_f1"]}
        save(ctx.out_dir, state["best"]["model"], state["hparams"], data, config, scores)
        write_confusion(ctx.out_dir, test["confusion"], data.spec.class_names)
        return {
            **scores,
            "test/loss": test["loss"],
            "test/rows": test["rows"],
            "best_epoch": state["best"]["epoch"],
            "best/val_metric": state["best"]["value"],
            **result.summary(),
        }


# --- the family's data and model bundle (also used by tuning.py) ---------------------------

SPLITS = ("train", "val", "test")


def check_dataset(info, stage: str) -> None:
    """Refuses data a classifier cannot learn from: fewer than two classes (a one-class
    softmax reaches loss 0 and accuracy 1.0 and learns nothing).

    Raises:
        ValueError: naming the data stage and what it produced.
    """
    if info.num_classes < 2:
        raise ValueError(
            f"vision.train needs at least 2 classes; stage {stage!r} produced "
            f"{info.num_classes} ({', '.join(map(str, info.class_names))})"
        )


def prepare(ctx: StageContext) -> TrialData:
    """The image dataset in ``needs:``: its splits (read lazily) and its ``ImageSpec``."""
    from components.data.dataset import ImageSpec, read_image_dataset, read_split

    data = ctx.input("dataset")
    info = read_image_dataset(data, "vision.train")
    check_dataset(info, data.stage)
    return TrialData(
        datasets={split: read_split(data.path, split) for split in SPLITS},
        spec=ImageSpec.of(info),
        data_dir=data.path,
        data_stage=data.stage,
        data_bytes=sum(shard["bytes"] for shard in info.shards),
    )


def describe(hparams: dict, spec, config: VisionTrainConfig, metrics: dict):
    """The bundle of a classifier of ``spec``'s images (no weights yet)."""
    from components.bundle import Bundle

    return Bundle(
        component="vision.train",
        kind="model/classifier",
        loader="components.vision.model:load",
        input=spec.input_spec(),
        output={"type": "classes", "num_classes": spec.num_classes},
        labels=list(spec.class_names),
        hparams=hparams,
        config=config.model_dump(mode="json"),
        metrics=metrics,
        meta={"normalization": spec.normalization},
    )


def save(out_dir: Path, weights, hparams: dict, data: TrialData, config, metrics: dict) -> None:
    """Writes the classifier's bundle (``bundle.json``, ``weights.pt``) into ``out_dir``."""
    from components.bundle import save_bundle

    save_bundle(out_dir, describe(hparams, data.spec, config, metrics), {"model": weights})


def test_scores(model, data_dir: Path) -> dict[str, Any]:
    """Test accuracy, macro-F1 and loss of a loaded classifier on a data artifact."""
    import torch

    from components.data.dataset import load_numpy
    from components.metrics import confusion_matrix, scores

    x, y = load_numpy(data_dir, "test")
    shape = model.bundle.input["shape"]
    if list(x.shape[1:]) != list(shape):
        raise ValueError(
            f"the model takes images {list(shape)}, the test split of {data_dir} has "
            f"{list(x.shape[1:])}"
        )
    logits = model.logits(x)
    target = torch.as_tensor(y)
    num_classes = model.bundle.output["num_classes"]
    result = scores(confusion_matrix(logits.argmax(1), target, num_classes))
    return {
        "test/accuracy": result["accuracy"],
        "test/macro_f1": result["macro_f1"],
        "test/loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "test/rows": len(y),
    }
