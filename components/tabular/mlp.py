"""``tabular.mlp``: an MLP on a prepared table (regression or classification) with Ray Train.

Read top to bottom: the config, the per-worker loop (``train_func``: the same function serves
the stage, Tune and the tests), and the stage that drives it, then the family's data, scores
and bundle (also used by ``tuning.py``). The network is in ``model.py``; how raw values become
model inputs (fill, normalize, encode categories) is ``components/data/table.py``, shared with
the data stage; shared Train mechanics (checkpoint, resume, report, precision) are in
``components/training.py``.

The worker's share of the train split is read once and kept in memory when it is small (the
usual case for a table: epochs then run at the speed of plain PyTorch), or streamed from the
shards every epoch (``train_data: stream``, for tables larger than memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext, StrictModel
from components.contract import TrialData
from components.training import MEMORY_LIMIT_BYTES, TrainSettings


class EarlyStopping(StrictModel):
    """Stops when ``metric`` has not improved for ``patience`` epochs.

    ``val/loss`` is the mean squared error of the standardized target (regression: it ranks
    epochs exactly as ``val/rmse`` does) or the cross-entropy (classification).
    """

    metric: str = "val/loss"
    mode: Literal["max", "min"] = "min"
    patience: int = Field(10, ge=1)


class NumericEmbedding(StrictModel):
    """Periodic embeddings of the numeric features (``model.PeriodicEmbeddings``: PLR,
    Gorishniy et al. 2022), instead of the standardized values as they are.

    Attributes:
        kind: ``periodic``.
        frequencies: learned frequencies per feature.
        sigma: the spread of their initial values (the features are standardized).
        dim: each feature's embedding width.
    """

    kind: Literal["periodic"] = "periodic"
    frequencies: int = Field(16, ge=1, le=256)
    sigma: float = Field(1.0, gt=0, allow_inf_nan=False)
    dim: int = Field(16, ge=1, le=256)


class MLPConfig(TrainSettings):
    """Settings of ``tabular.mlp`` (the shared ones are in ``TrainSettings``).

    Attributes:
        epochs: passes over the training split.
        batch_size: per-worker batch size.
        lr: peak learning rate (AdamW).
        weight_decay: decoupled weight decay (AdamW).
        schedule: ``cosine`` (to zero over ``epochs``) or ``none``.
        widths: hidden layer widths, one block (Linear, norm, ReLU, dropout) each.
        dropout: dropout after each block.
        norm: ``batch`` or ``layer`` normalization in each block, or ``none``.
        max_embedding_dim: the widest embedding of a categorical column (narrower for columns
            of few levels, see ``model.embedding_dim``).
        loss: ``mse`` or ``huber`` (on the standardized target; regression only).
        numeric_embedding: periodic embeddings of the numeric features; null: their
            standardized values enter the first layer as they are.
        early_stopping: stop when a validation metric stalls (off when null); the same metric
            picks the epoch whose weights are kept.
        train_data: ``memory``: read the worker's share of the train split once and keep it;
            ``stream``: read it from the shards every epoch (tables larger than memory);
            ``auto``: memory when that share is under 1 GiB.
        fetch_rows: rows read from the shards at a time when streaming (shuffled together).
    """

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "none"] = "cosine"
    widths: list[int] = Field(default_factory=lambda: [256, 128], max_length=16)
    dropout: float = Field(0.1, ge=0, lt=1)
    norm: Literal["batch", "layer", "none"] = "batch"
    max_embedding_dim: int = Field(16, ge=1, le=1024)
    loss: Literal["mse", "huber"] = "mse"
    numeric_embedding: NumericEmbedding | None = None
    early_stopping: EarlyStopping | None = EarlyStopping()
    train_data: Literal["auto", "memory", "stream"] = "auto"
    fetch_rows: int = Field(65536, ge=1)


# --- the per-worker loop ------------------------------------------------------------------


def build_model(spec, cfg: MLPConfig):
    """The MLP a config describes, for a table of ``spec`` (a ``TableSpec``)."""
    from components.tabular.model import MLP, embedding_dim

    cards, emb = spec.cardinalities(), cfg.numeric_embedding
    return MLP(
        numeric=len(spec.numeric),
        cardinalities=cards,
        embedding_dims=[embedding_dim(n, cfg.max_embedding_dim) for n in cards],
        widths=cfg.widths,
        outputs=1 if spec.regression else spec.num_classes,
        dropout=cfg.dropout,
        norm=cfg.norm,
        numeric_embedding=None if emb is None else emb.model_dump(),
    )


def train_func(config: dict[str, Any]) -> None:
    """Trains on this worker's share of ``train``; evaluates on the whole ``val`` split every
    epoch. ``config`` holds the ``training.Loop``: this component's config and the data's
    ``TableSpec``. The test split is scored afterwards, from the saved model (``test_scores``),
    exactly as a gate scores it."""
    import ray.train
    import torch

    from components import training

    loop = training.loop_of(config)
    cfg = loop.settings(MLPConfig)
    spec = loop.data
    dev = training.device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = training.start_from(build_model(spec, cfg), loop)  # fine-tuning: given weights
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    loss_of = _loss(spec, cfg)

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

    in_memory = keeps_in_memory(spec, cfg, training.world()[1])
    train = Rows(ray.train.get_dataset_shard("train"), spec, dev, in_memory, cfg.fetch_rows)
    val = Rows(ray.train.get_dataset_shard("val"), spec, dev, in_memory, cfg.fetch_rows)
    stop = cfg.early_stopping
    watched = stop.metric if stop else "val/loss"
    maximize = stop is not None and stop.mode == "max"
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        started = time.time()
        model.train()
        loss_sum, seen = 0.0, 0
        for x_num, x_cat, y in train.batches(cfg.batch_size, seed=cfg.seed + epoch):
            with training.autocast(dev, cfg.precision):
                out = model(x_num, x_cat)
            loss = loss_of(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        seconds = time.time() - started
        scheduler.step()
        training.sync_buffers(model)
        loss_sum, seen = training.all_reduce_sum([loss_sum, seen], dev)
        metrics = {
            "epoch": epoch,
            "train/loss": loss_sum / max(seen, 1),
            "train/samples_per_s": seen / max(seconds, 1e-9),
            **evaluate(model, val, spec, dev, cfg.precision, "val/"),
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        value = metrics[watched]
        if best["value"] is None or (value > best["value"] if maximize else value < best["value"]):
            best = {"value": value, "epoch": epoch, "model": training.cpu_state_dict(model)}
        best["stale"] = epoch - best["epoch"]
        stopped = stop is not None and best["stale"] >= stop.patience
        training.report(metrics, snapshot(epoch), loop.progress)
        if stopped:
            break

    final = training.final_state(snapshot(max(epoch, start_epoch - 1)), model)
    # stopped: a restart after this point only repeats this report.
    final.update(stopped=True, hparams=training.unwrap(model).hparams)
    training.report({"epoch": epoch, "completed": True}, final)


def keeps_in_memory(spec, cfg: MLPConfig, workers: int) -> bool:
    """Whether a worker keeps its share of the train split in memory (``train_data``)."""
    if cfg.train_data != "auto":
        return cfg.train_data == "memory"
    row_bytes = 4 * len(spec.numeric) + 8 * len(spec.categorical) + 8
    return spec.rows.get("train", 0) / max(workers, 1) * row_bytes < MEMORY_LIMIT_BYTES


class Rows:
    """One split as a worker reads it: model inputs in batches, from memory (read once, in row
    order, so that the seeded shuffles make runs repeat exactly) or streamed from the shards
    (``fetch_rows`` at a time, shuffled within each fetch).

    Args:
        shard: the worker's ``DataIterator`` of the split.
        spec: the table's ``TableSpec``.
        dev: the torch device.
        in_memory: read once and keep, or stream every pass.
        fetch_rows: rows per read from the shards.
    """

    def __init__(self, shard, spec, dev, in_memory: bool, fetch_rows: int):
        self.shard, self.spec, self.dev, self.fetch_rows = shard, spec, dev, fetch_rows
        self.memory = self._encode(self._read_all()) if in_memory else None

    def _read_all(self):
        import pyarrow as pa

        tables = list(self.shard.iter_batches(batch_size=self.fetch_rows, batch_format="pyarrow"))
        table = pa.concat_tables(tables)
        # Ray Data hands blocks over as they are ready; row order makes every run the same.
        return table.sort_by([("row_id", "ascending"), ("copy", "ascending")])

    def _encode(self, table) -> tuple[Any, Any, Any, Any]:
        """(numeric inputs, category codes, training target, target in its own units)."""
        import torch

        x_num, x_cat = self.spec.encode_shard(table)
        y = table.column(self.spec.label_column).to_numpy()
        target = self.spec.standardize_target(y) if self.spec.regression else y
        return (
            torch.as_tensor(x_num, device=self.dev),
            torch.as_tensor(x_cat, device=self.dev),
            torch.as_tensor(target, device=self.dev),
            y,
        )

    def _fetched(self):
        if self.memory is not None:
            yield self.memory
            return
        for table in self.shard.iter_batches(batch_size=self.fetch_rows, batch_format="pyarrow"):
            yield self._encode(table)

    def batches(self, batch_size: int, seed: int | None = None):
        """(numeric, codes, target) batches; shuffled by ``seed`` (None: in order). A last
        batch of one row is left out while training (batch norm needs two)."""
        import torch

        generator = None if seed is None else torch.Generator().manual_seed(seed)
        for x_num, x_cat, y, _ in self._fetched():
            n = len(y)
            order = torch.randperm(n, generator=generator) if generator is not None else None
            if order is not None and self.dev.type != "cpu":
                order = order.to(self.dev)
            for lo in range(0, n, batch_size):
                if order is not None and n - lo < 2:
                    break
                idx = slice(lo, lo + batch_size) if order is None else order[lo : lo + batch_size]
                yield x_num[idx], x_cat[idx], y[idx]

    def outputs(self, model, precision: str) -> tuple[Any, Any]:
        """The model's outputs (float64) over the whole split, and its targets in their own
        units, in the split's order."""
        import numpy as np
        import torch

        from components import training

        outs, ys = [], []
        with torch.no_grad():
            for x_num, x_cat, _, y in self._fetched():
                for lo in range(0, len(y), 4096):
                    with training.autocast(self.dev, precision):
                        out = model(x_num[lo : lo + 4096], x_cat[lo : lo + 4096])
                    outs.append(out.double().cpu().numpy())
                ys.append(y)
        out = np.concatenate(outs)
        return (out[:, 0] if self.spec.regression else out), np.concatenate(ys)


def evaluate(model, rows: Rows, spec, dev, precision: str, prefix: str) -> dict[str, float]:
    """Scores over a whole (unsplit) split. Every rank evaluates all rows with the plain module
    (no DDP collectives), so each gets the same numbers."""
    from components import training

    model = training.unwrap(model)
    model.eval()
    outputs, y = rows.outputs(model, precision)
    return {f"{prefix}{k}": v for k, v in scores(spec, outputs, y).items() if k != "rows"}


def _loss(spec, cfg: MLPConfig):
    import torch.nn.functional as F

    if not spec.regression:
        return F.cross_entropy
    if cfg.loss == "huber":
        return lambda out, y: F.huber_loss(out[:, 0], y)
    return lambda out, y: F.mse_loss(out[:, 0], y)


# --- the stage ----------------------------------------------------------------------------


class MLPStage(Component):
    """Trains the tabular MLP on a prepared table (Ray Train, DDP)."""

    version = "2"
    Config = MLPConfig
    produces = "model/mlp"
    trainable = "components.tabular.tuning:TRAINABLE"

    def run(self, ctx: StageContext, config: MLPConfig) -> dict[str, Any]:
        from components import training

        data = prepare(ctx)
        result = training.fit(train_func, config, ctx, data)
        state = result.state
        test = save_scored(ctx.out_dir, state["best"]["model"], state["hparams"], data, config)
        return {
            **test,
            "best_epoch": state["best"]["epoch"],
            "best/val_metric": state["best"]["value"],
            **result.summary(),
        }


# --- the family's data, scores and model bundle (also used by tuning.py) -------------------

SPLITS = ("train", "val", "test")


def check_dataset(info, stage: str) -> None:
    """Refuses a table a model cannot learn from: a classification of fewer than two classes.

    Raises:
        ValueError: naming the data stage and what it produced.
    """
    if info.task != "regression" and (info.num_classes or 0) < 2:
        raise ValueError(
            f"tabular.mlp needs at least 2 classes; stage {stage!r} produced "
            f"{info.num_classes} ({', '.join(map(str, info.class_names or []))})"
        )


def prepare(ctx: StageContext) -> TrialData:
    """The table in ``needs:``: its splits (read lazily) and its ``TableSpec``."""
    from components.data.dataset import read_split, read_table_dataset
    from components.data.table import TableSpec

    data = ctx.input("dataset/tabular")
    info = read_table_dataset(data, "tabular.mlp")
    check_dataset(info, data.stage)
    return TrialData(
        datasets={split: read_split(data.path, split) for split in SPLITS},
        spec=TableSpec.of(info),
        data_dir=data.path,
        data_stage=data.stage,
        data_bytes=sum(shard["bytes"] for shard in info.shards),
    )


def scores(spec, outputs, y) -> dict[str, float]:
    """Scores of a model's outputs (float64) against the targets: RMSE, MAE and R^2 in the
    target's own units and the standardized MSE (``loss``) for a regression; accuracy,
    macro-F1 and cross-entropy for a classification; and the ``rows`` scored."""
    import numpy as np
    import torch

    if spec.regression:
        y = np.asarray(y, dtype=np.float64)
        err = spec.target_units(outputs) - y
        total = float(np.sum((y - y.mean()) ** 2)) if len(y) else 0.0
        return {
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "r2": 1.0 - float(np.sum(err**2)) / total if total > 0 else 0.0,
            "loss": float(np.mean((outputs - spec.standardize_target(y).astype(np.float64)) ** 2)),
            "rows": len(y),
        }
    from components.metrics import confusion_matrix
    from components.metrics import scores as class_scores

    logits, target = torch.as_tensor(outputs), torch.as_tensor(np.asarray(y, dtype=np.int64))
    result = class_scores(confusion_matrix(logits.argmax(1), target, spec.num_classes))
    return {
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "loss": float(torch.nn.functional.cross_entropy(logits, target)),
        "rows": len(y),
    }


def test_predictions(model, data_dir: Path, split: str = "test") -> tuple[Any, Any]:
    """A loaded model's outputs (float64) on a data artifact's split, shard by shard in the
    listed order, and the split's targets (in their own units)."""
    import numpy as np
    import pyarrow.parquet as pq

    from components.data.dataset import load_dataset_info

    info = load_dataset_info(data_dir)
    spec = model.spec
    if info.feature_columns != spec.numeric or info.categorical_columns != spec.categorical:
        raise ValueError(
            f"the model takes {spec.numeric} and categorical {spec.categorical}; {data_dir} "
            f"has {info.feature_columns} and {info.categorical_columns}"
        )
    outs, ys = [], []
    for path in info.shard_paths(split):
        table = pq.read_table(path)
        outs.append(model.outputs(*spec.encode_shard(table)))
        ys.append(table.column(spec.label_column).to_numpy())
    if not outs:
        raise ValueError(f"split {split!r} of {data_dir} has no rows to score")
    return np.concatenate(outs), np.concatenate(ys)


def test_scores(model, data_dir: Path) -> dict[str, Any]:
    """Test scores (``test/...``) of a loaded model on a data artifact's test split."""
    outputs, y = test_predictions(model, data_dir)
    return {f"test/{k}": v for k, v in scores(model.spec, outputs, y).items()}


def describe(hparams: dict, spec, config: MLPConfig, metrics: dict):
    """The bundle of an MLP of ``spec``'s table (no weights yet)."""
    from components.bundle import Bundle

    if spec.regression:
        output = {"type": "value", "target": spec.target, **spec.target_normalization}
    else:
        output = {"type": "classes", "num_classes": spec.num_classes}
    return Bundle(
        component="tabular.mlp",
        kind="model/mlp",
        loader="components.tabular.model:load",
        input=spec.input_spec(),
        output=output,
        labels=None if spec.regression else list(spec.class_names),
        hparams=hparams,
        config=config.model_dump(mode="json"),
        metrics=metrics,
        meta={"table": spec.to_dict()},
    )


def save_scored(out_dir: Path, weights, hparams: dict, data: TrialData, config) -> dict:
    """Scores the model on the test split of ``data`` exactly as a gate will (from the bundle,
    through :func:`test_scores`), then writes its bundle with those scores, and a regression's
    residual and predicted-vs-true plots. Returns the test scores."""
    from dataclasses import replace

    from components.bundle import save_bundle

    bundle = describe(hparams, data.spec, config, {})
    model = replace(bundle, tensors={"model": weights}).load()
    outputs, y = test_predictions(model, data.data_dir)
    metrics = {f"test/{k}": v for k, v in scores(data.spec, outputs, y).items()}
    save_bundle(out_dir, replace(bundle, metrics=metrics), {"model": weights})
    if data.spec.regression:
        write_plots(out_dir, data.spec.target_units(outputs), y, data.spec.target)
    return metrics


def write_plots(out_dir: Path, predicted, true, target: str) -> None:
    """Saves ``predicted_vs_true.png`` and ``residuals.png`` of the test split (the report
    shows a stage's PNGs), and the points as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    predicted, true = np.asarray(predicted), np.asarray(true)
    (out_dir / "test_predictions.json").write_text(
        json.dumps({"target": target, "true": true.tolist(), "predicted": predicted.tolist()})
    )
    alpha = 0.6 if len(true) < 2000 else 0.15
    low, high = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(true, predicted, s=6, alpha=alpha)
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title("test split: predicted vs true")
    fig.tight_layout()
    fig.savefig(out_dir / "predicted_vs_true.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.scatter(predicted, true - predicted, s=6, alpha=alpha)
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xlabel(f"predicted {target}")
    ax.set_ylabel("residual (true - predicted)")
    ax.set_title("test split: residuals")
    fig.tight_layout()
    fig.savefig(out_dir / "residuals.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
