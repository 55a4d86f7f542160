"""``generative.vae``: a convolutional VAE trained on a ``data.prepare`` artifact with Ray Train.

Read top to bottom: the config, the per-worker loop (``train_func``), the stage. The loss is
the negative ELBO per image, in nats: ``recon + beta_t * KL``, where ``recon = -log p(x|z)``
(Bernoulli or Gaussian, one z per image by reparameterization) and ``KL`` is the closed-form
KL(q(z|x) || N(0, I)); ``beta_t`` ramps up to ``beta`` over ``kl_warmup_epochs``. Reported
ELBOs always use beta = 1 (the true bound), whatever the training weight.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from components.api import Component, StageContext
from components.generative.common import Family, GenerativeSettings

SPLITS = ("train", "val", "test")


class VAEConfig(GenerativeSettings):
    """Settings of ``generative.vae`` (shared ones in ``GenerativeSettings``/``TrainSettings``).

    Attributes:
        lr: Adam learning rate.
        likelihood: ``bernoulli`` (binary cross-entropy on [0, 1] pixels) or ``gaussian``
            (fixed standard deviation ``sigma``).
        sigma: pixel standard deviation of the Gaussian likelihood.
        beta: weight of the KL term in the training loss (1: the ELBO; >1: a beta-VAE).
        kl_warmup_epochs: the KL weight grows linearly from ``beta / (kl_warmup_epochs + 1)``
            to ``beta`` over this many epochs (0: ``beta`` from the start).
    """

    lr: float = Field(2e-3, gt=0)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    sigma: float = Field(0.1, gt=0)
    beta: float = Field(1.0, gt=0)
    kl_warmup_epochs: int = Field(0, ge=0)


def kl_weight(cfg: VAEConfig, epoch: int) -> float:
    """The KL weight of an epoch under warm-up."""
    if cfg.kl_warmup_epochs == 0:
        return cfg.beta
    return cfg.beta * min(1.0, (epoch + 1) / (cfg.kl_warmup_epochs + 1))


# --- the per-worker loop ------------------------------------------------------------------


def network():
    """The VAE class (imported on call: torch)."""
    from components.generative.models import VAE

    return VAE


def train_func(config: dict[str, Any]) -> None:
    """Trains on this worker's shard of ``train``; ELBO on ``val`` every epoch and on ``test``
    before and after training. ``config`` holds the ``training.Loop``: this component's config
    and the data's ``GenerativeSpec``."""
    import ray.train
    import torch

    from components import training
    from components.generative.common import WorkerData, build_sampler, grid_inputs
    from components.generative.sampling import to_uint8

    loop = training.loop_of(config)
    cfg = loop.settings(VAEConfig)
    spec = loop.data.image
    dev = training.device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    classes = spec.num_classes if cfg.conditional else 0
    model = build_sampler(network(), cfg, spec).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), cfg.lr)
    data = WorkerData.from_shards(spec, dev, SPLITS)
    grid_z, grid_labels = grid_inputs(cfg, spec.num_classes, dev)

    state = training.restore()
    if state is None:
        start_epoch, history, grids, resumed_from = 0, [], [], None
        initial = training.cpu_state_dict(model)
        test_init = evaluate(model, data, "test", cfg, dev)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, grids = state["epoch"] + 1, state["history"], state["grids"]
        initial, test_init, resumed_from = state["initial"], state["test_init"], start_epoch
    torch.manual_seed(cfg.seed + 1000 * (training.world()[0] + 1) + start_epoch)  # own eps
    model = ray.train.torch.prepare_model(model)  # DDP across workers (gloo or NCCL)

    def snapshot(epoch: int) -> dict[str, Any]:
        """What a restart needs to continue after ``epoch`` (tensors and plain data only)."""
        return {
            "epoch": epoch,
            "model": training.cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "grids": grids,
            "initial": initial,
            "test_init": test_init,
            "resumed_from": resumed_from,
        }

    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        beta = kl_weight(cfg, epoch)
        model.train()
        sums = [0.0, 0.0, 0.0]  # reconstruction NLL, KL, images
        for x, y in data.batches("train", cfg.batch_size, seed=cfg.seed + epoch):
            with training.autocast(dev, cfg.precision):
                logits, mu, logvar = model(x, y if classes else None)
            recon, kl = _terms(logits, mu, logvar, x, cfg)
            loss = (recon + beta * kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums = [sums[0] + float(recon.sum()), sums[1] + float(kl.sum()), sums[2] + len(x)]
        recon_sum, kl_sum, seen = training.all_reduce_sum(sums, dev)
        val = evaluate(model, data, "val", cfg, dev)
        unwrapped = training.unwrap(model)
        unwrapped.eval()
        with torch.no_grad():
            grids.append((epoch, to_uint8(torch.sigmoid(unwrapped.decode(grid_z, grid_labels)))))
        metrics = {
            "epoch": epoch,
            "train/loss": (recon_sum + beta * kl_sum) / max(seen, 1),
            "train/elbo": -(recon_sum + kl_sum) / max(seen, 1),
            "train/recon": recon_sum / max(seen, 1),
            "train/kl": kl_sum / max(seen, 1),
            "train/samples_per_s": seen / max(time.time() - started, 1e-9),
            "val/elbo": val["elbo"],
            "val/recon": val["recon"],
            "val/kl": val["kl"],
            "beta": beta,
        }
        history.append(metrics)
        training.report(metrics, snapshot(epoch), loop.progress)

    test = evaluate(model, data, "test", cfg, dev)
    final = training.final_state(
        snapshot(max(epoch, start_epoch - 1)),
        model,
        hparams=training.unwrap(model).hparams,
        final={
            "test/elbo": test["elbo"],
            "test/recon": test["recon"],
            "test/kl": test["kl"],
            "test/elbo_init": test_init["elbo"],
        },
    )
    training.report({"epoch": epoch, "test/elbo": test["elbo"]}, final)


def _terms(logits, mu, logvar, x, cfg: VAEConfig):
    """Per-image reconstruction NLL and analytic KL (float32 even under bf16 autocast)."""
    from components.generative.models import gaussian_kl, reconstruction_nll

    recon = reconstruction_nll(logits, x, cfg.likelihood, cfg.sigma)
    return recon, gaussian_kl(mu.float(), logvar.float())


def evaluate(model, data, split: str, cfg: VAEConfig, dev) -> dict[str, float]:
    """ELBO (beta = 1), reconstruction NLL and KL per image over a whole split.

    Every rank evaluates every row with the plain module and the same seeded noise, so all
    ranks get the same numbers without a collective.
    """
    import torch

    from components import training

    model = training.unwrap(model)
    model.eval()
    recon_sum, kl_sum, seen = 0.0, 0.0, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 12345)
        for x, y in data.batches(split, max(cfg.batch_size, 512)):
            with training.autocast(dev, cfg.precision):
                logits, mu, logvar = model(x, y if model.num_classes else None)
            recon, kl = _terms(logits, mu, logvar, x, cfg)
            recon_sum, kl_sum, seen = (
                recon_sum + float(recon.sum()),
                kl_sum + float(kl.sum()),
                seen + len(x),
            )
    n = max(seen, 1)
    return {"elbo": -(recon_sum + kl_sum) / n, "recon": recon_sum / n, "kl": kl_sum / n}


# --- the stage ----------------------------------------------------------------------------


class VAEStage(Component):
    """Trains a convolutional VAE on a prepared image dataset (Ray Train, DDP) and scores its
    samples with the classifier of a ``vision.train`` stage."""

    version = "2"  # 2: the model bundle (bundle.json + weights.pt)
    Config = VAEConfig
    produces = "model/vae"
    trainable = "components.generative.tuning:VAE"

    def run(self, ctx: StageContext, config: VAEConfig) -> dict[str, Any]:
        from components.generative.common import run_stage

        return run_stage(ctx, config, FAMILY)


FAMILY = Family(
    component="generative.vae",
    kind=VAEStage.produces,
    loader="components.generative.sampling:load_vae",
    Config=VAEConfig,
    train_func=train_func,
    network=network,
    splits=SPLITS,
    needs_classifier=False,  # ranked and gated on its ELBO; sample scores when one is given
    elbo=evaluate,
)
