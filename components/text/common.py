"""What the text classifier and the language models share inside their workers and scoring:
reading a dataset shard into memory, the optimizer (AdamW, decay on matrices only) and its
schedule (linear warm-up, cosine decay to a floor), and scoring with a fixed thread count.

Ray Train mechanics (device, precision, checkpoint, resume, report) are in
``components/training.py``; the networks are in ``models.py``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from components.training import TrainSettings, torch_threads


class OptimizerSettings(TrainSettings):
    """Optimizer settings both text families share (Ray Train ones are in ``TrainSettings``).

    Attributes:
        weight_decay: AdamW's decoupled decay, on weight matrices and embeddings only (never
            on biases or norms).
        warmup_steps: optimizer steps of linear learning-rate warm-up from zero.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio`` on the last step.
        grad_clip: the largest global gradient norm (0: no clipping).
    """

    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)


def optimizer_for(model, lr: float, cfg: OptimizerSettings):
    """AdamW over ``model``'s parameters, decaying only those with two or more dimensions."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(optimizer, total_steps: int, cfg: OptimizerSettings):
    """Per-step schedule: linear warm-up over ``warmup_steps``, then cosine to the floor."""
    import torch

    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step(model, optimizer, scheduler, loss, grad_clip: float) -> None:
    """One optimizer step on ``loss``: backward, global-norm clipping, step, schedule."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def padded(ids: tuple, idx, dev):
    """The texts ``idx`` of flat ids + offsets as a zero-padded (N, T) batch and lengths."""
    import numpy as np
    import torch

    flat, offsets = ids
    lengths = offsets[idx + 1] - offsets[idx]
    out = np.zeros((len(idx), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    for row, i in enumerate(idx):
        out[row, : lengths[row]] = flat[offsets[i] : offsets[i + 1]]
    return torch.as_tensor(out, device=dev), torch.as_tensor(lengths, device=dev)


def shard_rows(split: str, columns: tuple[str, ...]) -> dict[str, Any]:
    """This worker's Ray Train shard of ``split``, in memory: ``ids`` as (flat int64 array,
    row offsets), every other column as an array. Text shards are small (token ids); holding
    them keeps Ray Data's per-epoch start-up out of each epoch."""
    import pyarrow as pa
    import ray.train

    tables = list(ray.train.get_dataset_shard(split).iter_batches(batch_format="pyarrow"))
    table = pa.concat_tables(tables) if tables else None
    return table_rows(table, columns)


def table_rows(table, columns: tuple[str, ...]) -> dict[str, Any]:
    """A shard table's columns as arrays (see :func:`shard_rows`)."""
    import numpy as np
    import pyarrow as pa

    if table is None or table.num_rows == 0:
        rows: dict[str, Any] = {c: np.zeros(0, np.int64) for c in columns if c != "ids"}
        rows["ids"] = (np.zeros(0, np.int64), np.zeros(1, np.int64))
        return rows
    rows = {}
    for column in columns:
        data = table.column(column).combine_chunks()
        if column == "ids":
            if isinstance(data, pa.ExtensionArray):
                data = data.storage
            offsets = data.offsets.to_numpy().astype(np.int64)
            flat = data.values.to_numpy(zero_copy_only=False).astype(np.int64)
            rows["ids"] = (flat[offsets[0] : offsets[-1]], offsets - offsets[0])
        else:
            rows[column] = data.to_numpy(zero_copy_only=False)
    return rows


def loaded(bundle, weights):
    """The inference object of ``bundle`` (no weights yet) with the network's ``weights`` in
    memory: what ``bundle.load_model`` builds from the saved files."""
    from dataclasses import replace

    return replace(bundle, tensors={"model": weights}).load()


def one_thread():
    """Runs the block with one torch thread: a score computed this way has the same bits in
    the stage, a search's export and a gate (reductions split over threads may not)."""
    return torch_threads(1)
