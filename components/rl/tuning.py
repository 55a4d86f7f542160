"""The RL family's hooks (``components/contract.py``) for ``rl.ddpg``: a Tune trial that trains
an RLlib algorithm and reports each evaluation with its exported policy, and the scoring of a
trained policy over deterministic episodes. Nothing in the family imports this module.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.api import StageContext
from components.bundle import BUNDLE_FILE, WEIGHTS_FILE
from components.contract import ScoreSettings, Smoke, Trainable, TrialData
from components.rl.settings import TEST_SEED, DDPGSettings


def prepare(_ctx: StageContext) -> TrialData:
    """Nothing to read: an agent makes its own data."""
    return TrialData(datasets={})


def env_runners(settings: DDPGSettings, resources: Any) -> int:
    """The env runners a trial of ``settings`` starts (unset: one per resources' worker)."""
    workers = resources["workers"] if isinstance(resources, dict) else resources.workers
    return workers if settings.env_runners is None else settings.env_runners


def trial(params: dict[str, Any], *, fixed: dict[str, Any], resources: dict, seed: int) -> None:
    """One ``rl.ddpg`` trial: trains in the trial's own process (env runners, if any, are
    actors of their own) and reports each evaluation to Tune, with the policy exported at that
    point as the checkpoint, so the search keeps the policy of the trial's best evaluation."""
    from ray import tune

    from components.rl.ddpg import (
        build_algorithm_config,
        export_actor,
        register_custom_env,
        train_iterations,
    )
    from components.training import torch_threads

    settings = DDPGSettings.model_validate({**fixed, **params})
    seed = seed if settings.seed is None else settings.seed
    register_custom_env(settings)
    algo = build_algorithm_config(settings, seed, env_runners(settings, resources)).build_algo()
    try:
        with torch_threads(settings.learner_cpus):
            for evaluations, metrics in enumerate(train_iterations(algo, settings.timesteps), 1):
                with tempfile.TemporaryDirectory(prefix="raypipe-policy-") as tmp:
                    export_actor(algo, Path(tmp), settings, seed)
                    checkpoint = tune.Checkpoint.from_directory(tmp)
                    done = metrics["train/env_steps"] >= settings.timesteps
                    report = {**metrics, "epochs_done": evaluations, "completed": done}
                    tune.report(report, checkpoint=checkpoint)
    finally:
        algo.stop()


def export(out_dir: Path, checkpoint: Path, _data: TrialData, config: DDPGSettings) -> dict:
    """The policy of the trial's best evaluation, scored on the test episodes."""
    from components.rl.policy import load_policy, score_policy

    for name in (BUNDLE_FILE, WEIGHTS_FILE):
        shutil.copy2(Path(checkpoint) / name, Path(out_dir) / name)
    return score_policy(load_policy(out_dir), config.eval_episodes, TEST_SEED)


def score(bundle, _ctx: StageContext, settings: ScoreSettings) -> dict[str, Any]:
    """Returns of the policy over ``settings.episodes`` deterministic episodes."""
    from components.rl.policy import score_policy

    seed = TEST_SEED if settings.seed is None else settings.seed
    return score_policy(bundle.load(), settings.episodes, seed)


TRAINABLE = Trainable(
    component="rl.ddpg",
    produces="model/ddpg",
    trial=trial,
    epoch_metrics={"eval/episode_return_mean": "max", "train/critic_loss": "min"},
    test_metrics={
        "test/episode_return_mean": "max",
        "test/episode_return_min": "max",
        "test/episode_return_std": "min",
    },
    prepare=prepare,
    export=export,
    score=score,
    budget_keys=("timesteps",),
    budget=lambda config: math.ceil(config.timesteps / config.eval_every),
    keeps_best=True,  # Tune keeps every evaluation's policy; the best one is exported
    trial_cpus=lambda resources, config: config.learner_cpus + env_runners(config, resources),
    smoke=Smoke(
        config={
            "timesteps": 400,
            "hiddens": [16, 16],
            "batch_size": 32,
            "learning_starts": 100,
            "eval_every": 200,
            "eval_episodes": 2,
            "env_runners": 0,
            "seed": 0,
        },
        space={"actor_lr": {"choice": [1.0e-3]}},
    ),
)
