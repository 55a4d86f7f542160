"""tune.search and tune.evaluate over generative.vae, generative.gan and rl.ddpg (real Ray Tune,
Train and RLlib): each trainable's ranking metric, its exported best trial, and its gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import run_ok

from pipelines import engine, spec

GENERATIVE = """\
name: tune-generative
storage: {storage}
stages:
  prepare:
    uses: data.prepare
    with: {{split: {{val: 0.1, test: 0.2, seed: 0}}}}
  classifier:
    uses: vision.train
    needs: [prepare]
    with: {{epochs: 3, batch_size: 64, lr: 3.0e-3, width: 8}}
  vae_search:
    uses: tune.search
    needs: [prepare]
    with:
      trainable: generative.vae
      train: {{epochs: 2, batch_size: 32, width: 8, latent_dim: 4, grid_samples: 16}}
      search: grid
      scheduler: fifo
      max_concurrent_trials: 1
      space: {{lr: {{grid: [3.0e-3, 1.0e-6]}}}}
  vae_gate:
    uses: tune.evaluate
    needs: [prepare, classifier, vae_search]
    with: {{register_as: digits-vae}}
"""


def run(path: Path, text: str, **fields: str):
    path.write_text(text.format(**fields))
    return run_ok(spec.load(path))


def results(record, stage: str) -> tuple[Path, pd.DataFrame, dict]:
    state = record.stages[stage]
    art = Path(state.artifact)
    return art, pd.read_parquet(art / "results.parquet"), state.metrics


def test_a_generative_search_ranks_by_its_own_metric_and_gates_on_test_scores(ray_local, tmp_path):
    from components.bundle import read_bundle

    record = run(tmp_path / "g.yaml", GENERATIVE, storage=str(tmp_path / "store"))

    # The VAE search ranks by the validation ELBO (higher is better); a learning rate of 1e-6
    # leaves the model where it started, far below.
    art, rows, metrics = results(record, "vae_search")
    assert len(rows) == 2 and (rows["status"] == "completed").all(), rows
    assert (rows["epochs_run"] == 2).all()
    best = rows.loc[rows["best/val/elbo"].idxmax()]
    assert best["config/lr"] == 3.0e-3 and metrics["best/trial"] == best["trial"]
    assert best["best/val/elbo"] > rows["best/val/elbo"].min() + 5  # nats per image
    bundle = read_bundle(art)
    assert bundle.kind == "model/vae" and bundle.config["lr"] == 3.0e-3
    assert json.loads((art / "best_config.json").read_text())["mode"] == "max"

    # Its gate scores the exported VAE on the test split again: the same numbers.
    gate = record.stages["vae_gate"].metrics
    assert gate["promoted"] and "no champion yet" in gate["reason"]
    assert gate["test/elbo"] == pytest.approx(metrics["test/elbo"], rel=1e-5)
    decision = Path(record.stages["vae_gate"].artifact) / "decision.json"
    assert json.loads(decision.read_text())["metric"] == "test/elbo"
    # The gate's classifier also gives the VAE a sample distance; the search had none.
    assert "test/fd_classifier" not in metrics and gate["test/fd_classifier"] > 0


def test_a_gan_cannot_be_tuned_without_a_classifier(ray_local, tmp_path):
    text = GENERATIVE.split("  classifier:")[0] + (
        "  gan_search:\n    uses: tune.search\n    needs: [prepare]\n"
        "    with: {{trainable: generative.gan, train: {{epochs: 1}}, "
        "space: {{lr_g: {{choice: [1.0e-3]}}}}}}\n"
    )
    path = tmp_path / "g.yaml"
    path.write_text(text.format(storage=str(tmp_path / "store")))
    record = engine.run_pipeline(spec.load(path), printer=lambda _line: None)
    error = record.stages["gan_search"].error
    assert "needs a vision.train stage" in error, error


RL = """\
name: tune-rl
storage: {storage}
stages:
  search:
    uses: tune.search
    resources: {{workers: 1, cpus_per_worker: 1}}
    with:
      trainable: rl.ddpg
      train:
        env: Pendulum-v1
        timesteps: 600
        eval_every: 200
        eval_episodes: 2
        learning_starts: 100
        hiddens: [16]
        batch_size: 32
        env_runners: 0
        learner_cpus: 2
      search: grid
      scheduler: fifo
      space: {{actor_lr: {{grid: [1.0e-3, 1.0e-4]}}}}
  gate:
    uses: tune.evaluate
    needs: [search]
    with: {{register_as: pendulum-ddpg, episodes: 3, min: {{test/episode_return_mean: -2000}}}}
"""


def test_an_rl_search_exports_each_trials_best_evaluation_and_gates_over_episodes(
    ray_local, tmp_path
):
    from components.rl.policy import load_policy, rollout

    record = run(tmp_path / "rl.yaml", RL, storage=str(tmp_path / "store"))
    art, rows, metrics = results(record, "search")
    assert len(rows) == 2 and (rows["status"] == "completed").all(), rows
    assert (rows["epochs_run"] == 3).all()  # 600 steps, an evaluation every 200
    # Each trial holds its learner_cpus (no env runners): one at a time on the 2-CPU Ray.
    assert metrics["max_concurrent_trials"] == 1

    # A trial ranks by its best evaluation, and the search exports that evaluation's policy.
    best = rows.loc[rows["best/eval/episode_return_mean"].idxmax()]
    assert best["trial"] == metrics["best/trial"]
    policy = load_policy(art)
    assert policy.spec["env"] == "Pendulum-v1"
    assert policy.spec["env_steps"] == 200 * best["best/epoch"]

    # The gate runs the policy over 3 episodes from env seed 10000: the same as a rollout.
    gate = record.stages["gate"].metrics
    returns = rollout(art, episodes=3, seed=10_000)
    assert gate["test/episodes"] == 3
    assert gate["test/episode_returns"] == pytest.approx(returns)
    assert gate["test/episode_return_mean"] == pytest.approx(np.mean(returns))
    assert gate["promoted"] and "test/episode_return_mean" in gate["reason"]
