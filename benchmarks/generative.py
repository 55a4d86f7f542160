"""Generative figures on the digits; prints JSON (and writes it with --out).

    python benchmarks/generative.py --out generative.json            # the demo budget
    python benchmarks/generative.py --set vae.epochs=3 gan.epochs=3  # a smoke run

One run of ``pipelines/generative.yaml`` (prepare, classifier, conditional VAE and GAN), then:
- Frechet distance in the classifier's feature space (``eval/fd_classifier``) of VAE and GAN
  samples against the real test digits, between the floor (real train digits against the same
  test digits) and the ceiling (Gaussian noise images), all from the same run and sample count;
  and the classifier's accuracy on samples of each requested digit, beside its accuracy on the
  real test digits (the floor to reach) and chance (0.1).
- Throughput of the GAN loop: the Ray Train stage (one worker, its per-epoch images/s, the first
  epoch dropped) against a plain PyTorch loop in this process running the same ``train_step``
  on the same data, networks and batch size: ``ratio`` = Ray / plain, min, median and max over
  ``--rounds`` interleaved rounds. Each round reruns the pipeline with another GAN seed, so the
  GAN trains alone (the first run trains the VAE beside it), then runs the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from benchmarks.figures import spread  # noqa: E402

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "generative.yaml"


def plain_gan_throughput(data_dir: Path, gan_config: dict, epochs: int, threads: int) -> float:
    """Images/s of the GAN's ``train_step`` in a plain PyTorch loop (no Ray), epochs after
    the first, on the same train split held in memory, with as many torch threads as the Ray
    Train worker has CPUs (Ray sets its ``OMP_NUM_THREADS`` to them)."""
    import numpy as np
    import torch

    from components.data.dataset import denormalize, load_dataset_info, load_numpy
    from components.generative.gan import GANConfig, train_step
    from components.generative.models import Discriminator, Generator

    cfg = GANConfig.model_validate(gan_config)
    torch.set_num_threads(threads)
    info = load_dataset_info(data_dir)
    x, y = load_numpy(data_dir, "train")
    x = torch.as_tensor(np.clip(denormalize(x, info), 0, 1))
    y = torch.as_tensor(y)
    torch.manual_seed(cfg.seed)
    c, h, w = info.image_shape
    classes = info.num_classes if cfg.conditional else 0
    G = Generator(c, (h, w), cfg.latent_dim, cfg.width, cfg.depth, classes)
    D = Discriminator(c, (h, w), cfg.d_width or cfg.width, cfg.depth, classes, cfg.spectral_norm)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr_d, betas=cfg.betas)
    dev = torch.device("cpu")
    rates = []
    for epoch in range(epochs):
        started = time.time()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            train_step(G, D, opt_g, opt_d, x[idx], y[idx] if classes else None, cfg, dev)
        rates.append(len(x) / (time.time() - started))
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=[], help="overrides, e.g. gan.epochs=5")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--plain-epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--storage", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--out")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from pipelines import engine, spec

    storage = args.storage or tempfile.mkdtemp(prefix="raypipe-bench-gen-")
    pipeline = spec.load(PIPELINE, [f"storage={storage}", *args.set])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    started = time.time()
    record = engine.run_pipeline(pipeline, printer=lambda line: print(line, file=sys.stderr))
    wall = time.time() - started
    if not record.ok:
        raise SystemExit(f"pipeline failed: {record.error}")
    stages = record.stages
    classifier = stages["classifier"].metrics
    report: dict = {
        "benchmark": "generative (digits, pipelines/generative.yaml)",
        "machine": {
            "cpus": os.cpu_count(),
            "ray_cpus": args.cpus,
            "python": platform.python_version(),
        },
        "overrides": args.set,
        "pipeline_wall_s": round(wall, 1),
        "reference": {
            "fd_classifier_real_floor": stages["gan"].metrics["eval/fd_classifier_real"],
            "fd_classifier_noise_ceiling": stages["gan"].metrics["eval/fd_classifier_noise"],
            "classifier_test_accuracy_on_real": classifier["test/accuracy"],
            "chance_accuracy": 0.1,
            "fd_samples": stages["gan"].metrics["eval/fd_samples"],
        },
    }
    for name in ("vae", "gan"):
        m = stages[name].metrics
        report[name] = {
            "fd_classifier": m["eval/fd_classifier"],
            "fd_classifier_at_init": m["eval/fd_classifier_init"],
            "fd_classifier_real_same_run": m["eval/fd_classifier_real"],
            "fd_classifier_noise_same_run": m["eval/fd_classifier_noise"],
            "cond_accuracy": m.get("eval/cond_accuracy"),
            "cond_accuracy_per_label": m.get("eval/cond_accuracy_per_label"),
            "epochs": m["epochs_run"],
            **(
                {"test_elbo": m["test/elbo"], "test_elbo_init": m["test/elbo_init"]}
                if name == "vae"
                else {}
            ),
        }

    # Throughput: the Ray Train GAN loop's per-epoch rate (first epoch dropped) against the
    # same train_step in a plain loop here. The run above trains the VAE beside the GAN, so
    # each round reruns the pipeline with another GAN seed (every other stage cached: the GAN
    # trains alone) and then runs the plain loop; rounds alternate the two sides.
    from components.bundle import read_bundle

    threads = max(1, int(pipeline.stages["gan"].spec.resources.cpus_per_worker))
    rounds = []
    for r in range(args.rounds):
        again = spec.load(PIPELINE, [f"storage={storage}", *args.set, f"gan.seed={1000 + r}"])
        rerun = engine.run_pipeline(again, printer=lambda line: print(line, file=sys.stderr))
        if not rerun.ok:
            raise SystemExit(f"pipeline failed: {rerun.error}")
        gan_art = Path(rerun.stages["gan"].artifact)
        history = [json.loads(x) for x in (gan_art / "history.jsonl").read_text().splitlines()]
        ray_rate = statistics.median(p["train/samples_per_s"] for p in history[1:] or history)
        plain = plain_gan_throughput(
            Path(stages["prepare"].artifact),
            read_bundle(gan_art).config,
            args.plain_epochs,
            threads,
        )
        rounds.append({"ray_train_images_per_s": ray_rate, "plain_pytorch_images_per_s": plain})
        print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr, flush=True)
    ratios = [x["ray_train_images_per_s"] / x["plain_pytorch_images_per_s"] for x in rounds]
    report["gan_throughput"] = {
        "rounds": rounds,
        "ratio_ray_over_plain": spread(ratios),
        "plain_torch_threads": threads,
        "note": "one Ray Train worker (CPU), the GAN stage alone on the machine, vs the same "
        "train_step in-process; per-epoch rates, median, first epoch dropped",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
