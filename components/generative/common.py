"""What ``generative.vae`` and ``generative.gan`` share: their common settings, the worker-side
data (a shard held in memory as pixels), per-epoch sample grids, and the stage driver (fit on
Ray Train, write grids, score samples with the classifier, export).

Ray Train mechanics (device, precision, checkpoint, resume, report) are in
``components/training.py``; the networks are in ``models.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import Field

from components.api import StageContext
from components.training import TrainSettings


class GenerativeSettings(TrainSettings):
    """Settings both generative models share (the Ray Train ones are in ``TrainSettings``).

    Attributes:
        epochs: passes over the training split.
        batch_size: per-worker batch size.
        latent_dim: size of the latent code z.
        width: channels of the first convolution (doubling at each resolution halving).
        depth: resolution halvings; both image sides must be divisible by ``2**depth``.
        conditional: condition on the label (samples of a chosen class).
        grid_samples: samples in each per-epoch grid (``samples/epoch_NNN.png``).
        eval_per_label: samples per label for the conditional accuracy.
    """

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    latent_dim: int = Field(16, ge=1)
    width: int = Field(32, ge=1)
    depth: int = Field(2, ge=1, le=5)
    conditional: bool = False
    grid_samples: int = Field(64, ge=1)
    eval_per_label: int = Field(100, ge=1)


# --- inside the workers -------------------------------------------------------------------


class WorkerData:
    """This worker's shard of ``train`` and the whole ``val``/``test`` splits, in memory as
    pixels in [0, 1] on the worker's device.

    Generative models on small images take many cheap epochs: reading the shard once and
    shuffling tensors each epoch keeps Ray Data's per-epoch start-up out of every epoch. Ray
    Train splits ``train`` into equal shards, so every rank takes the same number of steps
    (each step is a DDP all-reduce).
    """

    def __init__(self, splits: dict[str, tuple[Any, Any]], shift, divisor, dev):
        self.splits, self.shift, self.divisor, self.dev = splits, shift, divisor, dev

    @classmethod
    def from_shards(
        cls, loop: dict[str, Any], dev, splits: tuple[str, ...] = ("train",)
    ) -> WorkerData:
        """Reads this worker's Ray Train dataset shards (``loop`` holds the normalization)."""
        import ray.train
        import torch

        shift, divisor = _normalization(loop["shift"], loop["divisor"], dev)
        held: dict[str, tuple[Any, Any]] = {}
        for split in splits:
            xs, ys = [], []
            shard = ray.train.get_dataset_shard(split)
            for batch in shard.iter_torch_batches(batch_size=4096, device=dev):
                xs.append(batch["image"].float() * divisor + shift)
                ys.append(batch["label"].long())
            held[split] = (torch.cat(xs).clamp(0, 1), torch.cat(ys))
        return cls(held, shift, divisor, dev)

    @classmethod
    def from_arrays(cls, arrays: dict[str, tuple[Any, Any]], info, dev) -> WorkerData:
        """Holds normalized numpy splits (``load_numpy``) outside Ray Train, for scoring."""
        import torch

        norm = info.normalization
        shift, divisor = _normalization(norm["shift"], norm["divisor"], dev)
        held = {
            split: (
                (torch.tensor(x, device=dev).float() * divisor + shift).clamp(0, 1),
                torch.tensor(y, device=dev).long(),
            )
            for split, (x, y) in arrays.items()
        }
        return cls(held, shift, divisor, dev)

    def batches(self, split: str, batch_size: int, seed: int | None = None) -> Iterator[tuple]:
        """(pixels, labels) batches of a split; shuffled by ``seed`` when given."""
        import torch

        x, y = self.splits[split]
        order = torch.arange(len(x))
        if seed is not None:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        order = order.to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


def build_sampler(kind: str, cfg: GenerativeSettings, image_shape, num_classes: int):
    """The network that draws samples, as a config describes it: the VAE (``vae``) or the
    generator (``gan``), conditional on ``num_classes`` labels if ``cfg.conditional``."""
    from components.generative.models import VAE, Generator

    c, h, w = image_shape
    cls = VAE if kind == "vae" else Generator
    classes = num_classes if cfg.conditional else 0
    return cls(c, (h, w), cfg.latent_dim, cfg.width, cfg.depth, classes)


def _normalization(shift: list[float], divisor: list[float], dev):
    """Per-channel normalization constants as (1, C, 1, 1) tensors on ``dev``."""
    import torch

    shape = (1, -1, 1, 1)
    return (
        torch.tensor(shift, dtype=torch.float32, device=dev).view(shape),
        torch.tensor(divisor, dtype=torch.float32, device=dev).view(shape),
    )


def grid_inputs(cfg: GenerativeSettings, num_classes: int, dev):
    """The fixed noise (and labels 0, 1, 2, ... in turn) of the per-epoch grids, so that the
    grids of successive epochs show the same latent points."""
    import torch

    z = torch.randn(
        cfg.grid_samples, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 7)
    ).to(dev)
    labels = (torch.arange(cfg.grid_samples) % num_classes).to(dev) if cfg.conditional else None
    return z, labels


# --- the stage ----------------------------------------------------------------------------


def run_stage(
    ctx: StageContext,
    config: GenerativeSettings,
    kind: str,
    train_func: Callable[[dict[str, Any]], None],
    splits: tuple[str, ...],
) -> dict[str, Any]:
    """Trains a generative model on Ray Train, then scores and exports it.

    The stage needs a ``data.*`` stage (an image dataset) and a ``vision.*`` stage (the
    classifier whose features the Frechet distance uses), named in ``needs``.

    Args:
        ctx: the stage context.
        config: the stage's config.
        kind: ``vae`` or ``gan`` (what ``model.pt`` holds).
        train_func: the per-worker loop; its final checkpoint state holds ``model`` and
            ``initial`` (the sampler's weights after and before training), ``hparams``,
            ``history``, ``grids``, ``final`` metrics, ``ranks``, ``world_size``,
            ``resumed_from``. Its loop config carries the classifier (``hparams``, ``model``)
            for per-epoch sample scores.
        splits: the splits the workers read (``train`` is sharded, the others whole).

    Returns:
        The stage's metrics.
    """
    import numpy as np
    import torch

    from components import training
    from components.data.dataset import load_dataset_info, load_numpy, read_split
    from components.generative import sampling
    from components.generative.metrics import score_samples
    from components.generative.models import VAE, Generator, check_image_size
    from components.vision.train import load_classifier

    data, vision = ctx.input("data."), ctx.input("vision.")
    info = load_dataset_info(data.path)
    if info.kind != "image":
        raise ValueError(
            f"generative.{kind} needs an image dataset; stage {data.stage!r} produced {info.kind}"
        )
    check_image_size(info.image_shape[1:], config.depth)
    classifier, bundle = load_classifier(vision.path)
    if list(bundle["image_shape"]) != list(info.image_shape):
        raise ValueError(
            f"classifier of stage {vision.stage!r} takes images {bundle['image_shape']}, "
            f"the data of stage {data.stage!r} has {list(info.image_shape)}"
        )

    state = training.fit(
        train_func,
        {
            "config": config.model_dump(mode="json"),
            "image_shape": list(info.image_shape),
            "num_classes": info.num_classes,
            "shift": list(info.normalization["shift"]),
            "divisor": list(info.normalization["divisor"]),
            "classifier": {"hparams": bundle["hparams"], "model": bundle["model"]},
        },
        ctx,
        config,
        # Materialized up front: the workers hold their data in memory anyway, and a stream
        # would need a free CPU while they train, which a sibling training stage (the VAE
        # beside the GAN) may hold on a small cluster: both would wait forever.
        {split: read_split(data.path, split).materialize() for split in splits},
    )
    for point in state["history"]:
        ctx.report(step=point["epoch"], **{k: v for k, v in point.items() if k != "epoch"})
    for epoch, pixels in state["grids"]:
        sampling.save_grid(
            pixels.float().numpy() / 255, ctx.out_dir / f"samples/epoch_{epoch:03d}.png"
        )

    cls = VAE if kind == "vae" else Generator
    trained, initial = cls.from_hparams(state["hparams"]), cls.from_hparams(state["hparams"])
    trained.load_state_dict(state["model"])
    initial.load_state_dict(state["initial"])
    trained.eval()
    initial.eval()
    torch.manual_seed(config.seed)
    real_test, _ = load_numpy(data.path, "test")
    reference = _train_originals(data.path)
    reference = reference[np.random.default_rng(config.seed).permutation(len(reference))]

    def sampler(model) -> Callable[[int], Any]:
        def draw(n: int):
            return sampling.generate(model, n, None, seed=config.seed + 1)

        return draw

    def conditional(labels):
        with torch.no_grad():
            return trained.sample(len(labels), labels).numpy()

    scores = score_samples(
        classifier,
        info,
        real_test,
        reference,
        {"": sampler(trained), "init": sampler(initial)},
        conditional if config.conditional else None,
        per_label=config.eval_per_label,
        seed=config.seed,
    )
    sampling.save_grid(
        sampling.generate(trained, config.grid_samples, None, seed=config.seed),
        ctx.out_dir / "samples.png",
    )
    metrics = {
        **state["final"],
        **scores,
        **training.summary(state),
        "classifier_stage": vision.stage,
    }
    sampling.export(ctx.out_dir, kind, state["model"], state["hparams"], info, config, metrics)
    plain = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | list)}
    (ctx.out_dir / "metrics.json").write_text(
        json.dumps({k: v for k, v in plain.items() if k != "ranks"}, indent=1, sort_keys=True)
    )
    return metrics


def _train_originals(data_dir):
    """The real train images without their augmented copies (normalized, (N, C, H, W)): the
    floor of the Frechet distance, real digits against the real test digits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.data.dataset import load_dataset_info, load_numpy

    x, _ = load_numpy(data_dir, "train")
    paths = load_dataset_info(data_dir).shard_paths("train")
    copies = pa.concat_tables([pq.read_table(p, columns=["copy"]) for p in paths])
    return x[copies.column("copy").to_numpy() == 0]


def set_requires_grad(model, flag: bool) -> None:
    """Freezes (False) or unfreezes a network's parameters."""
    for p in model.parameters():
        p.requires_grad_(flag)
