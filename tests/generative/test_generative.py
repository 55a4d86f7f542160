"""generative.vae and generative.gan on real Ray Train: learning, classifier-feature Frechet
distance, conditional generation, multi-node DDP of both GAN networks, worker failure, GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import run_ok as run

from pipelines import spec

PREPARE = """\
  prepare:
    uses: data.prepare
    with:
      augment: {copies: 1, rotate: 8, shift: 0.08, seed: 0}
      split: {val: 0.1, test: 0.2, seed: 0}
  classifier:
    uses: vision.train
    needs: [prepare]
    resources: {workers: 1}
    with: {epochs: 6, batch_size: 64, lr: 3.0e-3, width: 16}
"""
# Small, fast settings that still learn on the digits (2 shared CPU cores).
VAE = "{epochs: 8, batch_size: 32, width: 16, latent_dim: 8, lr: 3.0e-3}"
GAN = "{epochs: 15, batch_size: 32, width: 16, latent_dim: 16, lr_g: 2.0e-3, lr_d: 2.0e-3}"
CVAE = VAE[:-1] + ", conditional: true, kl_warmup_epochs: 3}"
CGAN = GAN[:-1] + ", conditional: true}"


def generative_pipeline(storage: Path, stages: dict[str, tuple[str, str, str]]):
    """A pipeline of prepare + classifier + the given ``name: (component, with, resources)``."""
    text = f"name: generative-test\nstorage: {storage}\nstages:\n{PREPARE}"
    for name, (uses, with_, resources) in stages.items():
        text += (
            f"  {name}:\n    uses: {uses}\n    needs: [prepare, classifier]\n"
            f"    resources: {resources}\n    with: {with_}\n"
        )
    path = storage.parent / f"p-{abs(hash(text))}.yaml"
    path.write_text(text)
    return spec.load(path)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """One storage for the module: data and classifier are computed once and then cached."""
    return tmp_path_factory.mktemp("generative") / "store"


def history(record, stage: str) -> list[dict]:
    art = Path(record.stages[stage].artifact)
    return [json.loads(line) for line in (art / "history.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(ray_local, storage):
    """An unconditional and a conditional VAE and a conditional GAN, one worker each, trained
    in one run (once: later tests get the engine's cached artifacts). The GAN's learning is
    judged on the conditional one (its unconditional path is the contract test's,
    tests/test_components.py, and every shipped pipeline's)."""
    one = "{workers: 1}"
    stages = {
        "vae": ("generative.vae", VAE, one),
        "cvae": ("generative.vae", CVAE, one),
        "cgan": ("generative.gan", CGAN, one),
    }
    return run(generative_pipeline(storage, stages))


def test_vae_test_elbo_improves_and_terms_are_reported(trained):
    m = trained.stages["vae"].metrics
    # Test ELBO (nats per image) rises from the untrained model's by a wide margin.
    assert m["test/elbo"] > m["test/elbo_init"] + 5, m
    assert m["test/elbo"] == pytest.approx(-(m["test/recon"] + m["test/kl"]), rel=1e-6)
    assert m["test/kl"] > 0
    points = history(trained, "vae")
    assert [p["step"] for p in points] == list(range(8))
    assert {"train/elbo", "train/recon", "train/kl", "val/elbo"} <= set(points[0])
    assert points[-1]["val/elbo"] > points[0]["val/elbo"]
    # Samples are closer to real digits than the untrained decoder's and than noise.
    assert m["eval/fd_classifier"] < 0.5 * m["eval/fd_classifier_init"], m
    assert m["eval/fd_classifier"] < m["eval/fd_classifier_noise"], m


def test_gan_frechet_distance_falls_below_half_of_init_and_below_noise(trained):
    m = trained.stages["cgan"].metrics
    assert m["eval/fd_classifier"] < 0.5 * m["eval/fd_classifier_init"], m
    assert m["eval/fd_classifier"] < m["eval/fd_classifier_noise"], m
    # The floor (real train digits against real test digits) is below the model.
    assert m["eval/fd_classifier_real"] < m["eval/fd_classifier"], m
    points = history(trained, "cgan")
    assert {"train/d_loss", "train/g_loss"} <= set(points[0])
    assert all(np.isfinite(p["train/d_loss"]) and np.isfinite(p["train/g_loss"]) for p in points)


def test_artifacts_hold_grids_per_epoch_and_sample_grid_works(trained, tmp_path):
    from PIL import Image

    from components.bundle import load_model

    for stage, family, epochs in (("vae", "vae", 8), ("cgan", "gan", 15)):
        art = Path(trained.stages[stage].artifact)
        grids = sorted((art / "samples").glob("epoch_*.png"))
        assert len(grids) == epochs
        assert (art / "samples.png").read_bytes()[:4] == b"\x89PNG"
        model = load_model(art)
        bundle = model.bundle
        assert bundle.kind == f"model/{family}"
        assert bundle.meta["normalization"]["method"] == "standard"
        png = model.sample_grid(64, None, tmp_path / f"{stage}.png")
        assert Image.open(png).size == (4 * (8 * 9 + 1),) * 2
        if stage == "vae":
            with pytest.raises(ValueError, match="unconditional"):
                model.sample_grid(4, 3, tmp_path / "x.png")


def test_conditional_models_draw_the_requested_digit(trained, tmp_path):
    from components.bundle import load_model

    record = trained
    for stage in ("cvae", "cgan"):
        m = record.stages[stage].metrics
        # Chance is 0.1: the classifier must see the asked-for digit most of the time.
        assert m["eval/cond_accuracy"] > 0.5, (stage, m["eval/cond_accuracy_per_label"])
        assert len(m["eval/cond_accuracy_per_label"]) == 10
        art = Path(record.stages[stage].artifact)
        model = load_model(art)
        assert model.sample_grid(16, 3, tmp_path / f"{stage}-3.png").is_file()
        assert model.module.num_classes == 10


# Conditional, hinge loss and spectral norm: the projection embedding and spectral norm's
# power-iteration buffers must stay in step across ranks too.
MULTI_NODE_GAN = "{epochs: 3, width: 8, conditional: true, loss: hinge, spectral_norm: true}"


@pytest.mark.soak
@pytest.mark.slow
def test_gan_on_two_nodes_ends_with_identical_generator_and_discriminator(ray_cluster, storage):
    two = "{workers: 2, cpus_per_worker: 1}"
    record = run(generative_pipeline(storage, {"gan2": ("generative.gan", MULTI_NODE_GAN, two)}))
    m = record.stages["gan2"].metrics
    ranks = m["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["node"] for r in ranks}) == 2, "both workers ran on one node"
    # The digests cover every parameter and buffer of G and D (spectral norm's too).
    assert len({r["params_sha256"] for r in ranks}) == 1, "ranks disagree after training"
    assert m["workers"] == 2 and np.isfinite(m["eval/fd_classifier"])


@pytest.mark.soak
@pytest.mark.reliability
@pytest.mark.slow
@pytest.mark.parametrize(
    ("component", "settings", "metric"),
    [
        ("generative.gan", "width: 8, latent_dim: 8", "train/d_loss"),
        ("generative.vae", "width: 8, latent_dim: 4", "train/loss"),
    ],
)
def test_worker_killed_mid_training_resumes_from_checkpoint(
    ray_local, storage, kill_train_worker_mid_run, component, settings, metric
):
    epochs, stage = 12, component.split(".")[1] + "f"
    with_ = f"{{epochs: {epochs}, {settings}, max_failures: 2}}"
    pipeline = generative_pipeline(storage, {stage: (component, with_, "{workers: 1}")})
    record, _ = kill_train_worker_mid_run(lambda: run(pipeline), storage, stage, metric)
    m = record.stages[stage].metrics
    assert m["resumed_from_epoch"] is not None and m["resumed_from_epoch"] >= 1, m
    assert m["epochs_run"] == epochs  # each epoch once: the counter did not restart at zero
    steps = [p["step"] for p in history(record, stage)]
    assert steps == list(range(epochs))


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none here)"
)
def test_gpu_bf16_steps(ray_local, tmp_path):
    stages = {
        "vae": ("generative.vae", "{epochs: 1, precision: bf16}", "{workers: 1, gpu: true}"),
        "gan": ("generative.gan", "{epochs: 1, precision: bf16}", "{workers: 1, gpu: true}"),
    }
    record = run(generative_pipeline(tmp_path / "store", stages))
    for stage in stages:
        m = record.stages[stage].metrics
        assert m["use_gpu"] is True
        assert np.isfinite(m["eval/fd_classifier"])


def test_sample_command_writes_a_grid_and_rejects_bad_labels(trained, storage, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.cli import app

    runner = CliRunner()
    base = ["sample", trained.run_id, "cgan", "--storage", str(storage)]
    out = tmp_path / "threes.png"
    result = runner.invoke(app, [*base, "--n", "16", "--label", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > 0
    bad = runner.invoke(app, [*base, "--label", "42"])
    assert bad.exit_code == 2 and "label" in bad.output
    unconditional = runner.invoke(
        app, ["sample", trained.run_id, "vae", "--storage", str(storage), "--label", "1"]
    )
    assert unconditional.exit_code == 2 and "unconditional" in unconditional.output
