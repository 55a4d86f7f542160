"""Ray Train mechanics shared by every trainer (vision, VAE, GAN): written once, used by all.

Inside the workers (a ``train_func``):
    - :func:`device` and :func:`autocast`: where tensors live and bf16 on GPU.
    - :func:`restore`: the state saved by the last checkpoint, after a worker failure or a
      rerun of the stage (None on a fresh start).
    - :func:`report`: one call per epoch on every rank; rank 0 attaches the checkpoint.
    - :func:`all_reduce_sum`: sums metric counters over ranks.
In the stage (the driver of the training run):
    - :func:`fit`: builds the ``TorchTrainer`` from the stage's resources and settings, forwards
      rank 0's per-epoch metrics as live progress, and returns the final checkpoint's state.

A checkpoint is one ``state.pt`` holding only tensors and plain data, loaded with
``torch.load(weights_only=True)``: no pickled code ever runs on load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from components.api import StageContext, StrictModel

STATE_FILE = "state.pt"


class TrainSettings(StrictModel):
    """Settings every Ray Train component shares.

    Attributes:
        seed: seeds model initialization and data shuffling.
        max_failures: worker failures the run recovers from (from its last checkpoint).
        precision: ``auto`` is bf16 autocast on GPU and fp32 on CPU; ``bf16``/``fp32`` force.
        placement: ``pack`` workers onto few nodes, or ``spread`` them one per node.
        keep_checkpoints: how many epoch checkpoints Ray Train keeps.
        cache_data: read the datasets once into Ray's object store before training (``true``),
            stream them from the shards every epoch (``false``), or ``auto``: cache when they
            take under a quarter of the object store, or when the workers would hold every
            CPU (streaming reads need one).
    """

    seed: int = 0
    max_failures: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    placement: Literal["pack", "spread"] = "pack"
    keep_checkpoints: int = 2
    cache_data: Literal["auto", "true", "false"] = "auto"


# --- inside the workers -------------------------------------------------------------------


def device():
    """The torch device of this worker (its GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def autocast(dev, precision: str):
    """bf16 autocast where asked for (``auto``: on GPU only); otherwise a no-op context."""
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def restore() -> dict[str, Any] | None:
    """The state of the latest checkpoint of this run, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return load_state(Path(path))


def load_state(path: Path) -> dict[str, Any]:
    """Loads ``state.pt`` from a checkpoint directory, without executing any pickled code."""
    import torch

    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def report(metrics: dict[str, Any], state: dict[str, Any] | None, progress: Any = None) -> None:
    """Reports one epoch; rank 0 saves ``state`` as the checkpoint.

    Every rank must call this the same number of times (it is a barrier in Ray Train).

    Args:
        metrics: plain numbers, named ``split/name``.
        state: what a restart needs (tensors and plain data only), or None.
        progress: the queue made by :func:`fit` for live progress (rank 0 puts to it).
    """
    import ray.train
    import torch

    rank, _ = world()
    if rank != 0 or state is None:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="raypipe-ckpt-"))
    try:
        torch.save(state, tmp / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        with contextlib.suppress(Exception):  # progress is best-effort, never fails training
            progress.put_nowait(metrics)


def all_reduce_sum(values: list[float], dev) -> list[float]:
    """Sums a list of numbers over all ranks (identity with one worker)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=dev)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def sync_buffers(model) -> None:
    """Averages floating-point buffers (batch-norm running statistics) over ranks.

    DDP keeps parameters equal but lets each rank's last batches leave their own running
    statistics; averaging them after each epoch makes evaluation and the saved model the same
    on every rank (and uses every rank's data, as SyncBatchNorm would).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in unwrap(model).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def rank_fingerprints(*models) -> list[dict[str, Any]]:
    """Every rank's node, pid and a sha256 of its models' parameters, gathered to all ranks.

    After DDP training the digests must all be equal; the node ids show where ranks ran.
    """
    import hashlib

    import ray
    import torch.distributed as dist

    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(unwrap(model).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    rank, size = world()
    mine = {
        "rank": rank,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "params_sha256": digest.hexdigest(),
    }
    if size == 1 or not dist.is_initialized():
        return [mine]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, mine)
    return gathered


def unwrap(model):
    """The plain module inside a DDP wrapper."""
    return getattr(model, "module", model)


def cpu_state_dict(model) -> dict[str, Any]:
    """A detached CPU copy of a model's parameters and buffers."""
    return {k: v.detach().to("cpu").clone() for k, v in unwrap(model).state_dict().items()}


# --- in the stage -------------------------------------------------------------------------


def fit(
    train_func: Any,
    loop_config: dict[str, Any],
    ctx: StageContext,
    settings: TrainSettings,
    datasets: dict[str, Any],
    split: tuple[str, ...] = ("train",),
    data_bytes: int | None = None,
) -> dict[str, Any]:
    """Runs a training function on Ray Train as the stage's resources say.

    Datasets named in ``split`` are sharded across the workers (equal shards); the others
    (validation, test) reach every worker whole, so evaluation sees every row.

    Checkpoints go under the stage's scratch directory with a fixed run name, so a rerun of the
    same stage (after the driver died) resumes from the last checkpoint, as does a worker
    restart within the run (``settings.max_failures``).

    Returns:
        The state saved with the last checkpoint.

    Raises:
        RuntimeError: the training run failed (the message carries the workers' error).
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    resources = ctx.resources
    use_gpu = resources.use_gpu(ray.cluster_resources().get("GPU", 0))
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    progress = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    stop = threading.Event()
    forwarder = threading.Thread(target=_forward, args=(progress, ctx, stop), daemon=True)
    forwarder.start()
    datasets = _maybe_cache(datasets, ctx, settings.cache_data, data_bytes)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={**loop_config, "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            placement_strategy="SPREAD" if settings.placement == "spread" else "PACK",
        ),
        run_config=RunConfig(
            name="train",
            storage_path=ctx.scratch_dir,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            # Per-report INFO lines from every worker drown the stage's own progress line.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(split)),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise RuntimeError(f"training failed: {root_message(e)}") from e
    finally:
        stop.set()
        forwarder.join(timeout=5)
        with contextlib.suppress(Exception):
            progress.shutdown()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as path:
        state = load_state(Path(path))
    state["use_gpu"] = use_gpu
    return state


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """The run facts every trainer reports from its final state: epochs, resume, workers."""
    return {
        "epochs_run": len(state["history"]),
        "resumed_from_epoch": state["resumed_from"],
        "workers": state["world_size"],
        "ranks": state["ranks"],
        "use_gpu": state["use_gpu"],
        "train/samples_per_s": state["history"][-1]["train/samples_per_s"],
    }


def save_model(path: Path, weights, hparams, info, config, metrics, **extra: Any) -> None:
    """Writes a trained model bundle: weights, architecture, the data's shape, classes and
    normalization, the resolved config and the numeric metrics (tensors and plain data
    only, so it loads with ``torch.load(weights_only=True)``)."""
    import torch

    torch.save(
        {
            **extra,
            "model": weights,
            "hparams": hparams,
            "image_shape": list(info.image_shape),
            "class_names": list(info.class_names),
            "normalization": info.normalization,
            "config": config.model_dump(mode="json"),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        },
        path,
    )


def _maybe_cache(
    datasets: dict[str, Any], ctx: StageContext, cache: str, data_bytes: int | None
) -> dict[str, Any]:
    """Materializes the datasets into the object store when ``cache`` says so (see
    ``TrainSettings.cache_data``). Streaming re-reads every shard each epoch, which costs
    more than the training itself on small data; and Ray Data's file listing asks for a whole
    CPU, so streaming would wait forever if the workers held every CPU. Spare CPUs are
    counted from what is free now, not the cluster's total: other stages may be training
    beside this one."""
    import ray

    cpus = ray.available_resources().get("CPU", 0)
    spare = cpus - ctx.resources.workers * ctx.resources.cpus_per_worker
    store = ray.cluster_resources().get("object_store_memory", 0)
    small = data_bytes is not None and data_bytes < store / 4
    if cache == "false" and spare < 1:
        raise RuntimeError(
            f"cache_data is false but the {ctx.resources.workers} workers would hold all "
            f"{cpus:g} free CPUs: streaming reads would never run (lower cpus_per_worker or "
            "cache the data)"
        )
    if cache == "true" or (cache == "auto" and (small or spare < 1)):
        why = "small enough to cache" if small else f"{spare:g} CPU spare beside the trainers"
        ctx.progress(note=f"reading the datasets into the object store first ({why})")
        return {name: ds.materialize() for name, ds in datasets.items()}
    return datasets


def _forward(queue: Any, ctx: StageContext, stop: threading.Event) -> None:
    from ray.util.queue import Empty

    while not stop.is_set():
        try:
            metrics = queue.get(timeout=0.5)
        except Empty:
            continue
        except Exception:  # noqa: BLE001 - the queue actor went away: stop forwarding
            return
        ctx.progress(**metrics)


def root_message(error: BaseException) -> str:
    """The innermost error message of a (nested) training failure."""
    seen = error
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"
