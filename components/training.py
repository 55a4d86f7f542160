"""Ray Train mechanics shared by every trainer: written once, used by all.

Inside the workers (a ``train_func(config)``):
    - :func:`loop_of`: the typed :class:`Loop` the stage (or a Tune trial) handed the workers.
    - :func:`device` and :func:`autocast`: where tensors live and bf16 on GPU.
    - :func:`restore`: the state saved by the last checkpoint, after a worker failure or a
      rerun of the stage (None on a fresh start).
    - :func:`report`: one call per epoch on every rank; rank 0 attaches the checkpoint.
    - :func:`all_reduce_sum`: sums metric counters over ranks.
    - :func:`final_state`: the last checkpoint's state, with the run facts every trainer reports.
In the stage (the driver of the training run):
    - :func:`fit`: builds the ``TorchTrainer`` from the stage's resources and settings, forwards
      rank 0's per-epoch metrics as live progress, and returns a :class:`TrainResult`.

A checkpoint is one ``state.pt`` holding only tensors and plain data, loaded with
``torch.load(weights_only=True)``: no pickled code ever runs on load.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from components.api import StageContext, StrictModel
from components.contract import TrialData
from pipelines.guards import quote

STATE_FILE = "state.pt"
Settings = TypeVar("Settings", bound=StrictModel)
#: How long a training run waits for its workers' resources before Ray Train gives up
#: (Train's own default is 60 s, after which it fails the attempt). On a busy cluster a stage
#: waits for CPUs held by other stages or trials as long as they need them; set
#: RAYPIPE_RESOURCE_WAIT_S to bound the wait (read when a run starts: resource_wait_s).
RESOURCE_WAIT_S = 7 * 24 * 3600.0


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


@dataclass
class Loop:
    """What every worker's ``train_func`` gets, in the stage and in a Tune trial alike.

    Ray Train hands a ``train_func`` a dict: it holds this object under ``"loop"``
    (:func:`loop_of` takes it out).

    Attributes:
        config: the component's config as JSON (each worker validates it again).
        data: the family's description of its data (``TrialData.spec``).
        progress: a queue for live progress (rank 0 puts each epoch's metrics), or None.
        trial: inside a Tune search, (trial id, the queue that takes the trial's placement
            group); None in a stage.
        start: the weights to start from instead of a fresh initialization (fine-tuning a
            pruned model, see :func:`start_from`); None: a fresh start.
    """

    config: dict[str, Any]
    data: Any = None
    progress: Any = None
    trial: tuple[str, Any] | None = None
    start: dict[str, Any] | None = None

    def settings(self, model: type[Settings]) -> Settings:
        """The config, validated as the component's ``Config``."""
        return model.model_validate(self.config)

    def as_train_config(self) -> dict[str, Any]:
        """The ``train_loop_config`` of a ``TorchTrainer`` running a ``train_func``."""
        return {"loop": self}


def loop_of(train_loop_config: dict[str, Any]) -> Loop:
    """The :class:`Loop` inside a ``train_func``'s argument."""
    return train_loop_config["loop"]


@dataclass
class TrainResult:
    """The outcome of :func:`fit`: the final checkpoint's state and the run facts in it.

    Attributes:
        state: the final state the loop saved (the family's own keys: weights, test scores...).
        history: the per-epoch metrics, in order.
        resumed_from: the epoch a restart resumed at (None: never restarted).
        world_size: the Train workers.
        ranks: each rank's node, pid and parameter digest (see :func:`rank_fingerprints`).
        use_gpu: whether the workers trained on GPUs.
    """

    state: dict[str, Any]
    history: list[dict[str, Any]]
    resumed_from: int | None
    world_size: int
    ranks: list[dict[str, Any]]
    use_gpu: bool

    def summary(self) -> dict[str, Any]:
        """The run facts every trainer reports: epochs, resume, workers, throughput."""
        return {
            "epochs_run": len(self.history),
            "resumed_from_epoch": self.resumed_from,
            "workers": self.world_size,
            "ranks": self.ranks,
            "use_gpu": self.use_gpu,
            "train/samples_per_s": self.history[-1]["train/samples_per_s"]
            if self.history
            else None,
        }


# --- inside the workers -------------------------------------------------------------------


def start_from(model, loop: Loop):
    """The freshly built ``model``, or, when the loop starts from given weights
    (``Loop.start``: ``weights``, with the ``shapes`` structured pruning left and the pruning
    ``masks`` that keep zeros at zero while training), that model resized and loaded."""
    if loop.start is None:
        return model
    from components.compression import apply_masks, resize

    resize(model, loop.start.get("shapes") or {})
    model.load_state_dict(loop.start["weights"])
    return apply_masks(model, loop.start.get("masks") or {})


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` torch threads, then restores the count: a Ray worker process
    outlives its task, and Ray started it with as many threads as its first task's CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


#: Bytes a worker may hold of its data in memory before ``train_data: auto`` streams instead.
MEMORY_LIMIT_BYTES = 1 << 30


def read_shard_of(shard) -> dict[str, Any]:
    """A worker's Ray Train shard (a ``DataIterator``), read once into numpy arrays by column, in
    row order (``row_id``, then ``copy``, where the shards have them): Ray Data hands blocks
    over as they are ready, and the order makes every run's seeded shuffles the same. Holding
    a shard keeps Ray Data's start-up (seconds per pass on a small machine) out of each epoch.
    """
    import numpy as np

    parts: dict[str, list] = {}
    for batch in shard.iter_batches(batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    keys = [columns[k] for k in ("copy", "row_id") if k in columns]  # lexsort: last key first
    if keys and len(keys[0]):
        order = np.lexsort(keys)
        columns = {name: values[order] for name, values in columns.items()}
    return columns


def batches(tensors: tuple, batch_size: int, seed: int | None = None):
    """Batches of held ``tensors`` (equal first dimensions): in a permutation seeded by
    ``seed`` (a full shuffle), or in order when ``seed`` is None."""
    import torch

    n = len(tensors[0])
    if seed is None:
        order = None
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        order = order.to(tensors[0].device)
    for start in range(0, n, batch_size):
        if order is None:
            yield tuple(t[start : start + batch_size] for t in tensors)
        else:
            index = order[start : start + batch_size]
            yield tuple(t[index] for t in tensors)


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


def final_state(snapshot: dict[str, Any], *models, **extra: Any) -> dict[str, Any]:
    """The state of a run's last checkpoint: the loop's last ``snapshot`` (which holds
    ``history`` and ``resumed_from``), the run facts :class:`TrainResult` reads (world size,
    every rank's parameter digest of ``models``) and the family's ``extra`` (test scores...).

    Every rank must call it (the digests are gathered from all ranks).
    """
    for key in ("history", "resumed_from"):
        if key not in snapshot:
            raise KeyError(f"a loop's snapshot must hold {key!r}")
    return {
        **snapshot,
        **extra,
        "world_size": world()[1],
        "ranks": rank_fingerprints(*models),
    }


# --- in the stage -------------------------------------------------------------------------


def resource_wait_s() -> float:
    """Seconds a training run waits for its workers' resources: ``RAYPIPE_RESOURCE_WAIT_S``
    if set, else :data:`RESOURCE_WAIT_S`.

    Raises:
        ValueError: the variable is not a finite number of seconds above 0 (naming it).
    """
    raw = os.environ.get("RAYPIPE_RESOURCE_WAIT_S")
    if raw is None:
        return RESOURCE_WAIT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"RAYPIPE_RESOURCE_WAIT_S={quote(raw)}: a number of seconds above 0")
    return seconds


#: Seconds between a Train controller's polls of its workers, unless the environment sets
#: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: Train's 2 s default makes every run wait up to 2 s
#: after its workers finish before it returns.
POLL_INTERVAL_S = 0.25


def wait_for_resources() -> None:
    """Makes the Ray Train runs this process starts wait :func:`resource_wait_s` for their
    workers' resources instead of failing after Train's 60 s, and poll their workers every
    :data:`POLL_INTERVAL_S`. Train propagates these variables from the process that calls
    ``fit()`` to its controller."""
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(resource_wait_s())
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_INTERVAL_S))


def fit(
    train_func: Any,
    settings: TrainSettings,
    ctx: StageContext,
    data: TrialData,
    split: tuple[str, ...] = ("train",),
    start: dict[str, Any] | None = None,
) -> TrainResult:
    """Runs a training function on Ray Train as the stage's resources say.

    Datasets named in ``split`` are sharded across the workers (equal shards); the others
    (validation, test) reach every worker whole, so evaluation sees every row.

    Checkpoints go under the stage's scratch directory with a fixed run name, so a rerun of the
    same stage (after the driver died) resumes from the last checkpoint, as does a worker
    restart within the run (``settings.max_failures``).

    Args:
        train_func: the family's per-worker loop (``train_func(config)``, see :class:`Loop`).
        settings: the component's config (``TrainSettings`` and the family's own).
        ctx: the stage context (resources, scratch directory, progress).
        data: what the family's ``prepare`` read: datasets and the data's description.
        split: datasets sharded across the workers.
        start: weights the workers start from (see :func:`start_from`); None: fresh.

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
    datasets = _maybe_cache(data.datasets, ctx, settings.cache_data, data.data_bytes)
    wait_for_resources()
    needed = resources.workers * resources.cpus_per_worker
    free = ray.available_resources().get("CPU", 0)
    if free < needed:
        ctx.progress(note=f"waiting for {needed:g} CPUs for the workers ({free:g} free now)")
    loop = Loop(
        config=settings.model_dump(mode="json"), data=data.spec, progress=progress, start=start
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop.as_train_config(),
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
    for point in state["history"]:
        ctx.report(step=point["epoch"], **{k: v for k, v in point.items() if k != "epoch"})
    return TrainResult(
        state=state,
        history=state["history"],
        resumed_from=state["resumed_from"],
        world_size=state["world_size"],
        ranks=state["ranks"],
        use_gpu=use_gpu,
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
