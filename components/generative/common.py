"""What ``generative.vae`` and ``generative.gan`` share: their common settings, the data every
worker gets, the worker-side data (a shard held in memory as pixels), per-epoch sample grids,
and the stage driver (fit on Ray Train, write grids, score samples with the classifier, export).

Ray Train mechanics (device, precision, checkpoint, resume, report) are in
``components/training.py``; the networks are in ``models.py``; reading inputs, exporting and
scoring a model are the family's hooks in ``tuning.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from components.api import StageContext
from components.contract import TrialData
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


@dataclass(frozen=True)
class GenerativeSpec:
    """What every worker of a generative model gets (``training.Loop.data``).

    Attributes:
        image: the images' ``ImageSpec`` (shape, classes, normalization).
        classifier: the bundle (in memory) of the ``model/classifier`` whose features score
            samples, or None (a VAE search without one).
    """

    image: Any
    classifier: Any = None


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
    def from_shards(cls, spec, dev, splits: tuple[str, ...] = ("train",)) -> WorkerData:
        """Reads this worker's Ray Train dataset shards (``spec``: the data's ``ImageSpec``)."""
        import ray.train
        import torch

        norm = spec.normalization
        shift, divisor = _normalization(norm["shift"], norm["divisor"], dev)
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


def build_sampler(network, cfg: GenerativeSettings, spec):
    """The network that draws samples (``VAE`` or ``Generator``) as a config describes it, for
    images of ``spec``; conditional on its labels if ``cfg.conditional``."""
    c, h, w = spec.image_shape
    classes = spec.num_classes if cfg.conditional else 0
    return network(c, (h, w), cfg.latent_dim, cfg.width, cfg.depth, classes)


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


# --- the family: data, bundle, scores (the stage's, and tuning.py's) ----------------------


@dataclass(frozen=True)
class Family:
    """What tells the VAE and the GAN apart, for the functions both share (each of ``vae.py``
    and ``gan.py`` defines its own ``FAMILY``).

    Attributes:
        component: the ``uses:`` name.
        kind: the artifact kind of its model (``model/vae``).
        loader: the bundle's loader (``module:function``).
        Config: the component's config model.
        train_func: its Ray Train per-worker loop.
        network: returns the sampling network's class (imported when called: torch).
        splits: the splits the workers read (``train`` is sharded, the others whole).
        needs_classifier: whether a search or gate needs a ``model/classifier`` (a GAN is
            ranked and gated by the Frechet distance of its samples in its features).
        elbo: the test-split ELBO evaluation of a likelihood model (the VAE), or None.
    """

    component: str
    kind: str
    loader: str
    Config: type
    train_func: Callable[[dict[str, Any]], None]
    network: Callable[[], type]
    splits: tuple[str, ...]
    needs_classifier: bool
    elbo: Callable[..., dict[str, float]] | None = None


def prepare(ctx: StageContext, family: Family, classifier_required: bool) -> TrialData:
    """The image dataset in ``needs:`` (the family's splits, read lazily) and the classifier
    that scores samples, if one is in ``needs:`` (in memory, for workers anywhere).

    Raises:
        ValueError: not an image dataset; a classifier required but absent, more than one, or
            one that takes other images (each names the stage).
    """
    from components.bundle import read_bundle
    from components.data.dataset import ImageSpec, read_image_dataset, read_split

    data = ctx.input("dataset")
    info = read_image_dataset(data, family.component)
    spec = ImageSpec.of(info)
    found = ctx.inputs_of("model/classifier")
    if len(found) > 1:
        raise ValueError(f"stage {ctx.stage!r} needs at most one classifier in `needs:`")
    if not found and classifier_required:
        raise ValueError(
            f"{family.component} is scored by the Frechet distance of its samples in a "
            f"classifier's features: stage {ctx.stage!r} needs a vision.train stage in `needs:`"
        )
    classifier = None
    if found:
        classifier = read_bundle(found[0].path)
        if list(classifier.input["shape"]) != list(spec.image_shape):
            raise ValueError(
                f"classifier of stage {found[0].stage!r} takes images "
                f"{classifier.input['shape']}, the data of stage {data.stage!r} has "
                f"{list(spec.image_shape)}"
            )
        classifier = classifier.in_memory()
    return TrialData(
        # Materialized up front (``cache_data`` aside): the workers hold their data in memory
        # anyway, and a stream would need a free CPU while they train, which a sibling
        # training stage (the VAE beside the GAN) may hold on a small cluster: both would wait.
        datasets={split: read_split(data.path, split).materialize() for split in family.splits},
        spec=GenerativeSpec(spec, classifier),
        data_dir=data.path,
        data_stage=data.stage,
        extra={"classifier_stage": found[0].stage if found else None},
    )


def describe(family: Family, hparams: dict, spec, config, metrics: dict):
    """The bundle of a family's sampling network for images of ``spec`` (no weights yet)."""
    from components.bundle import Bundle

    classes = spec.num_classes if hparams.get("num_classes") else 0
    return Bundle(
        component=family.component,
        kind=family.kind,
        loader=family.loader,
        input={"type": "latent", "latent_dim": config.latent_dim, "num_classes": classes},
        output={"type": "image", "shape": list(spec.image_shape), "range": [0, 1]},
        labels=list(spec.class_names) if classes else None,
        hparams=hparams,
        config=config.model_dump(mode="json"),
        metrics=metrics,
        meta={"normalization": spec.normalization},
    )


def save(out_dir, family: Family, weights, hparams: dict, spec, config, metrics: dict) -> None:
    """Writes the model bundle (``bundle.json``, ``weights.pt``) into ``out_dir``."""
    from components.bundle import save_bundle

    save_bundle(out_dir, describe(family, hparams, spec, config, metrics), {"model": weights})


def test_scores(family: Family, model, config, spec, data_dir, classifier=None) -> dict:
    """Scores of a loaded VAE or generator (``sampling.Sampler``) on the test split of a data
    artifact: what the stage reports, a search exports and a gate decides on.

    Args:
        family: the model's family.
        model: the loaded model.
        config: its config (``VAEConfig``/``GANConfig``).
        spec: the ``ImageSpec`` of the data artifact at ``data_dir``.
        data_dir: the data artifact.
        classifier: the bundle of a ``model/classifier``, or None.

    Returns:
        ``test/elbo``, ``test/recon``, ``test/kl`` (a VAE: per image, beta = 1);
        ``test/fd_classifier`` (with a classifier: as many samples as test images) and
        ``test/cond_accuracy`` (conditional models, with a classifier).
    """
    import numpy as np
    import torch

    from components.data.dataset import load_numpy
    from components.generative.metrics import SampleDistance, conditional_accuracy

    dev = torch.device("cpu")
    data = WorkerData.from_arrays({"test": load_numpy(data_dir, "test")}, spec, dev)
    network = model.module
    metrics: dict[str, float] = {}
    if family.elbo is not None:
        elbo = family.elbo(network, data, "test", config, dev)
        metrics.update({f"test/{k}": v for k, v in elbo.items()})
    if classifier is None:
        return metrics
    real = data.splits["test"][0]
    probe = SampleDistance(classifier, real, data.shift, data.divisor, seed=config.seed + 5)
    metrics["test/fd_classifier"] = probe(network)
    if network.num_classes:

        def draw(labels):
            with torch.no_grad():
                return network.sample(len(labels), labels).numpy()

        per_class = conditional_accuracy(probe.classifier, spec, draw, config.eval_per_label)
        metrics["test/cond_accuracy"] = float(np.mean(per_class))
    return metrics


# --- the stage ----------------------------------------------------------------------------


def run_stage(ctx: StageContext, config: GenerativeSettings, family: Family) -> dict[str, Any]:
    """Trains a generative model on Ray Train, then scores and exports it.

    The stage needs an image dataset and a classifier (a ``vision.train`` stage, whose
    features the Frechet distance uses), named in ``needs``. The final checkpoint of the
    family's ``train_func`` holds ``model`` and ``initial`` (the sampler's weights after and
    before training), ``hparams``, ``history``, ``grids`` and ``final`` metrics.

    Returns:
        The stage's metrics: the training run's, the samples' ``eval/*`` scores against the
        test images (and the untrained network's, noise's and real images' for scale), and the
        ``test/*`` scores a gate would give the exported model.
    """
    from dataclasses import replace

    import numpy as np
    import torch

    from components import training
    from components.data.dataset import load_numpy
    from components.generative import sampling
    from components.generative.metrics import score_samples
    from components.generative.models import check_image_size

    data = prepare(ctx, family, classifier_required=True)
    spec, classifier_bundle = data.spec.image, data.spec.classifier
    check_image_size(spec.image_shape[1:], config.depth)
    result = training.fit(family.train_func, config, ctx, data)
    state = result.state
    for epoch, pixels in state["grids"]:
        sampling.save_grid(
            pixels.float().numpy() / 255, ctx.out_dir / f"samples/epoch_{epoch:03d}.png"
        )

    bundle = describe(family, state["hparams"], spec, config, {})
    trained = replace(bundle, tensors={"model": state["model"]}).load()
    initial = replace(bundle, tensors={"model": state["initial"]}).load()
    classifier = classifier_bundle.load()
    torch.manual_seed(config.seed)
    real_test, _ = load_numpy(data.data_dir, "test")
    reference = _train_originals(data.data_dir)
    reference = reference[np.random.default_rng(config.seed).permutation(len(reference))]

    def sampler(model) -> Callable[[int], Any]:
        def draw(n: int):
            return model.sample(n, None, seed=config.seed + 1)

        return draw

    def conditional(labels):
        with torch.no_grad():
            return trained.module.sample(len(labels), labels).numpy()

    scores = score_samples(
        classifier,
        spec,
        real_test,
        reference,
        {"": sampler(trained), "init": sampler(initial)},
        conditional if config.conditional else None,
        per_label=config.eval_per_label,
        seed=config.seed,
    )
    trained.sample_grid(config.grid_samples, None, ctx.out_dir / "samples.png", seed=config.seed)
    metrics = {
        **state["final"],
        **scores,
        **test_scores(family, trained, config, spec, data.data_dir, classifier_bundle),
        **result.summary(),
        "classifier_stage": data.extra["classifier_stage"],
    }
    save(ctx.out_dir, family, state["model"], state["hparams"], spec, config, metrics)
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
