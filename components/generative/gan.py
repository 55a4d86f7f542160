"""``generative.gan``: a DCGAN-style GAN trained on a ``data.prepare`` artifact with Ray Train.

Read top to bottom: the config, the per-worker loop (``train_func``), the stage.

Two DDP networks with alternating updates. Each step:
1. ``fake = G(z)``: one forward of G's DDP module, with grad.
2. D step: one forward of D's DDP module on ``cat(real, fake.detach())`` (detached: D's loss
   must not reach G), backward, step. D's gradients are all-reduced by D's DDP.
3. G step: D's parameters are frozen (``requires_grad=False``) and D runs inside
   ``D.no_sync()``: this second forward of D's DDP module in the step then registers nothing
   with D's gradient reducer (which would otherwise wait for gradients that never come), and
   the backward of G's loss gives gradients to G only, all-reduced by G's DDP (whose single
   forward was step 1). Then D is unfrozen.
So each DDP module does exactly one reduced backward per step and the parameters of G and D
stay identical on every rank (``tests/generative`` checks their digests across two nodes).
G's batch-norm statistics are averaged over ranks after each epoch (``training.sync_buffers``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext
from components.generative.common import Family, GenerativeSettings

SPLITS = ("train", "val")  # val: the per-epoch sample distance (rank 0, with a classifier)


class GANConfig(GenerativeSettings):
    """Settings of ``generative.gan`` (shared ones in ``GenerativeSettings``/``TrainSettings``).

    Attributes:
        lr_g: generator Adam learning rate.
        lr_d: discriminator Adam learning rate.
        betas: Adam betas (DCGAN's 0.5, 0.999).
        loss: ``nonsaturating`` (G minimizes -log D(G(z))) or ``hinge``.
        spectral_norm: spectral normalization on every layer of D.
        d_width: channels of D's first convolution (default: ``width``).
    """

    latent_dim: int = Field(32, ge=1)
    lr_g: float = Field(2e-4, gt=0)
    lr_d: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    loss: Literal["nonsaturating", "hinge"] = "nonsaturating"
    spectral_norm: bool = False
    d_width: int | None = Field(None, ge=1)


# --- the per-worker loop ------------------------------------------------------------------


def network():
    """The generator class (imported on call: torch)."""
    from components.generative.models import Generator

    return Generator


def train_func(config: dict[str, Any]) -> None:
    """Trains G and D on this worker's shard of ``train`` (see the module docstring for the
    step). ``config`` holds the ``training.Loop``: this component's config and the data's
    ``GenerativeSpec``; with a classifier there, rank 0 also reports ``val/fd_classifier``
    every epoch: the Frechet distance of samples to the validation images (what a search over
    GANs ranks by)."""
    import ray.train
    import torch

    from components import training
    from components.generative.common import WorkerData, build_sampler, grid_inputs
    from components.generative.metrics import SampleDistance
    from components.generative.models import Discriminator
    from components.generative.sampling import to_uint8

    loop = training.loop_of(config)
    cfg = loop.settings(GANConfig)
    spec = loop.data.image
    dev = training.device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    c, h, w = spec.image_shape
    classes = spec.num_classes if cfg.conditional else 0
    G = build_sampler(network(), cfg, spec).to(dev)
    D = Discriminator(
        c, (h, w), cfg.d_width or cfg.width, cfg.depth, classes, cfg.spectral_norm
    ).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr_d, betas=cfg.betas)
    probe = loop.data.classifier is not None and training.world()[0] == 0
    data = WorkerData.from_shards(spec, dev, SPLITS if probe else ("train",))
    val_fd = None
    if probe:
        val_fd = SampleDistance(
            loop.data.classifier, data.splits["val"][0], data.shift, data.divisor, cfg.seed + 3
        )
    grid_z, grid_labels = grid_inputs(cfg, spec.num_classes, dev)

    state = training.restore()
    if state is None:
        start_epoch, history, grids, resumed_from = 0, [], [], None
        initial = training.cpu_state_dict(G)
    else:
        G.load_state_dict(state["model"])
        D.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["optimizer_g"])
        opt_d.load_state_dict(state["optimizer_d"])
        start_epoch, history, grids = state["epoch"] + 1, state["history"], state["grids"]
        initial, resumed_from = state["initial"], start_epoch
    # Each rank draws its own noise (its own share of the global batch), reproducibly.
    torch.manual_seed(cfg.seed + 1000 * (training.world()[0] + 1) + start_epoch)
    G = ray.train.torch.prepare_model(G)
    D = ray.train.torch.prepare_model(D)

    def snapshot(epoch: int) -> dict[str, Any]:
        """What a restart needs to continue after ``epoch`` (tensors and plain data only)."""
        return {
            "epoch": epoch,
            "model": training.cpu_state_dict(G),
            "discriminator": training.cpu_state_dict(D),
            "optimizer_g": opt_g.state_dict(),
            "optimizer_d": opt_d.state_dict(),
            "history": history,
            "grids": grids,
            "initial": initial,
            "resumed_from": resumed_from,
        }

    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        G.train()
        D.train()
        sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # d_loss, g_loss, D(real), D(fake), images (x batch)
        for real, y in data.batches("train", cfg.batch_size, seed=cfg.seed + epoch):
            d_loss, g_loss, real_score, fake_score = train_step(
                G, D, opt_g, opt_d, real, y if classes else None, cfg, dev
            )
            n = len(real)
            sums[0] += d_loss * n
            sums[1] += g_loss * n
            sums[2] += real_score * n
            sums[3] += fake_score * n
            sums[4] += n
        training.sync_buffers(G)
        d_sum, g_sum, real_sum, fake_sum, seen = training.all_reduce_sum(sums, dev)
        generator = training.unwrap(G)
        generator.eval()
        with torch.no_grad():
            grids.append((epoch, to_uint8((generator(grid_z, grid_labels) + 1) / 2)))
        seen = max(seen, 1)
        metrics = {
            "epoch": epoch,
            "train/d_loss": d_sum / seen,
            "train/g_loss": g_sum / seen,
            "train/d_real_score": real_sum / seen,
            "train/d_fake_score": fake_sum / seen,
            "train/samples_per_s": seen / max(time.time() - started, 1e-9),
        }
        if val_fd is not None:
            metrics["val/fd_classifier"] = val_fd(generator)
        history.append(metrics)
        training.report(metrics, snapshot(epoch), loop.progress)

    final = training.final_state(
        snapshot(max(epoch, start_epoch - 1)),
        G,
        D,
        hparams=training.unwrap(G).hparams,
        final={"train/d_loss": history[-1]["train/d_loss"] if history else None},
    )
    training.report({"epoch": epoch}, final)


def train_step(G, D, opt_g, opt_d, real, labels, cfg: GANConfig, dev) -> tuple[float, ...]:
    """One alternating update of D then G (see the module docstring for why it is DDP-safe).

    Args:
        G, D: the networks, DDP-wrapped or plain.
        real: real pixels in [0, 1].
        labels: their labels (conditional models), or None.

    Returns:
        (D's loss, G's loss, D's mean score on real, D's mean score on fake) as floats.
    """
    import torch

    from components import training
    from components.generative.common import set_requires_grad
    from components.generative.models import discriminator_loss, generator_loss

    real, n = real * 2 - 1, len(real)  # [-1, 1], like G's tanh
    z = torch.randn(n, cfg.latent_dim, device=dev)
    with training.autocast(dev, cfg.precision):
        fake = G(z, labels)  # G's one forward of the step
        both = None if labels is None else torch.cat([labels, labels])
        scores = D(torch.cat([real, fake.detach()]), both)  # D's one reduced forward
    d_loss = discriminator_loss(scores[:n], scores[n:], cfg.loss)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    set_requires_grad(D, False)
    # One worker: no DDP wrapper, nothing to keep out of sync.
    no_sync = getattr(D, "no_sync", contextlib.nullcontext)
    with no_sync(), training.autocast(dev, cfg.precision):
        fake_scores = D(fake, labels)
    g_loss = generator_loss(fake_scores, cfg.loss)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    set_requires_grad(D, True)
    return (
        float(d_loss.detach()),
        float(g_loss.detach()),
        float(scores[:n].detach().float().mean()),
        float(scores[n:].detach().float().mean()),
    )


# --- the stage ----------------------------------------------------------------------------


class GANStage(Component):
    """Trains a DCGAN-style GAN on a prepared image dataset (Ray Train, DDP on both networks)
    and scores its samples with the classifier of a ``vision.train`` stage."""

    version = "2"  # 2: the model bundle (bundle.json + weights.pt)
    Config = GANConfig
    produces = "model/gan"
    trainable = "components.generative.tuning:GAN"

    def run(self, ctx: StageContext, config: GANConfig) -> dict[str, Any]:
        from components.generative.common import run_stage

        return run_stage(ctx, config, FAMILY)


FAMILY = Family(
    component="generative.gan",
    kind=GANStage.produces,
    loader="components.generative.sampling:load_gan",
    Config=GANConfig,
    train_func=train_func,
    network=network,
    splits=SPLITS,
    needs_classifier=True,  # no likelihood: ranked and gated by its samples' distance
)
