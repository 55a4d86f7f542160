"""The ``rl.ddpg`` stage: trains DDPG or TD3 (``components/rl/ddpg.py``) on a gymnasium env.

    agent:
      uses: rl.ddpg
      with: {env: Pendulum-v1, timesteps: 20000, eval_every: 5000}

Every ``eval_every`` env steps the stage evaluates ``eval_episodes`` deterministic episodes,
reports the metrics, and writes an RLlib checkpoint both into the scratch directory (for resume:
a rerun after a failure restores the newest one, replay buffer included) and into the artifact
(``checkpoints/step_<N>``, plus ``checkpoints/final``). At the end it exports the actor as a
standalone policy (``policy/``, see ``policy.py``) that ``raypipe rollout`` runs.

This module imports only pydantic at import time; Ray, RLlib and torch load inside ``run``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from components.api import Component, StageContext, StrictModel


class DDPGSettings(StrictModel):
    """Settings of the ``rl.ddpg`` stage (the ``with:`` block). Defaults: rl-baselines3-zoo's.

    Attributes:
        env: a gymnasium env id (``Pendulum-v1``), or the name a custom env is registered under.
        env_entry_point: ``package.module:callable`` building the custom env from ``env_config``;
            the stage registers it with Ray Tune as ``env``. Empty for gymnasium ids.
        env_config: keyword arguments of the env (``gym.make(env, **env_config)``).
        algorithm: ``ddpg``, or ``td3`` (twin critics, policy delay 2, target smoothing 0.2/0.5,
            unless the options below say otherwise).
        timesteps: env steps to train for.
        env_runners: remote RLlib env runners sampling in parallel; 0 samples in the stage's own
            process (fastest on a small machine); unset: ``resources.workers``.
        restart_env_runners: restart a failed env runner and go on training.
        gamma: discount factor.
        tau: Polyak factor of the target networks.
        actor_lr: Adam learning rate of the actor.
        critic_lr: Adam learning rate of the critic(s).
        hiddens: hidden layer sizes of the actor and of each critic.
        batch_size: transitions per gradient step.
        buffer_size: replay capacity in transitions.
        learning_starts: env steps sampled before the first gradient step.
        random_steps: env steps of uniform-random actions at the start (unset: learning_starts).
        updates_per_step: gradient steps per env step.
        rollout_fragment_length: env steps each env runner samples between learning phases.
        n_step: steps of the n-step return.
        grad_clip: clip each optimizer's gradient norm to this (unset: no clipping).
        prioritized_replay: proportional prioritized replay instead of uniform.
        exploration_noise: ``gaussian`` or ``ou`` (Ornstein-Uhlenbeck, per episode) or ``none``.
        noise_sigma: scale of the exploration noise, in normalized action units ([-1, 1]).
        twin_q: two critics and the min of their targets (TD3); unset: the algorithm's preset.
        policy_delay: critic updates per actor update (TD3: 2); unset: the preset.
        target_noise: std of the target smoothing noise (TD3: 0.2); unset: the preset.
        target_noise_clip: clip of the target smoothing noise (TD3: 0.5); unset: the preset.
        eval_every: env steps between evaluations (and checkpoints).
        eval_episodes: deterministic episodes per evaluation.
        seed: seed of networks, envs and noise (unset: the stage seed the engine derives).
    """

    env: str = "Pendulum-v1"
    env_entry_point: str | None = None
    env_config: dict[str, Any] = Field(default_factory=dict)
    algorithm: Literal["ddpg", "td3"] = "ddpg"
    timesteps: int = Field(20_000, gt=0)
    env_runners: int | None = Field(None, ge=0)
    restart_env_runners: bool = True
    gamma: float = Field(0.98, gt=0, le=1)
    tau: float = Field(0.005, gt=0, le=1)
    actor_lr: float = Field(1e-3, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    hiddens: list[int] = Field(default_factory=lambda: [400, 300])
    batch_size: int = Field(256, gt=0)
    buffer_size: int = Field(200_000, gt=0)
    learning_starts: int = Field(10_000, ge=0)
    random_steps: int | None = Field(None, ge=0)
    updates_per_step: float = Field(1.0, gt=0)
    rollout_fragment_length: int = Field(8, gt=0)
    n_step: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    prioritized_replay: bool = False
    exploration_noise: Literal["gaussian", "ou", "none"] = "gaussian"
    noise_sigma: float = Field(0.1, ge=0)
    twin_q: bool | None = None
    policy_delay: int | None = Field(None, ge=1)
    target_noise: float | None = Field(None, ge=0)
    target_noise_clip: float | None = Field(None, ge=0)
    eval_every: int = Field(5_000, gt=0)
    eval_episodes: int = Field(10, gt=0)
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> DDPGSettings:
        if self.n_step > self.rollout_fragment_length:
            raise ValueError("n_step must not exceed rollout_fragment_length")
        if self.env_entry_point is not None and ":" not in self.env_entry_point:
            raise ValueError("env_entry_point must look like 'package.module:callable'")
        return self


def build_algorithm_config(settings: DDPGSettings, seed: int, env_runners: int):
    """The RLlib ``DDPGConfig`` / ``TD3Config`` for the stage's settings."""
    from components.rl.ddpg import DDPGConfig, TD3Config

    config = TD3Config() if settings.algorithm == "td3" else DDPGConfig()
    td3 = {
        k: getattr(settings, k)
        for k in ("twin_q", "policy_delay", "target_noise", "target_noise_clip")
        if getattr(settings, k) is not None
    }
    replay = {"type": "EpisodeReplayBuffer", "capacity": settings.buffer_size}
    if settings.prioritized_replay:
        replay = {
            "type": "PrioritizedEpisodeReplayBuffer",
            "capacity": settings.buffer_size,
            "alpha": 0.6,
            "beta": 0.4,
        }
    return (
        config.environment(settings.env, env_config=dict(settings.env_config))
        .env_runners(
            num_env_runners=env_runners,
            rollout_fragment_length=settings.rollout_fragment_length,
        )
        .training(
            gamma=settings.gamma,
            tau=settings.tau,
            actor_lr=settings.actor_lr,
            critic_lr=settings.critic_lr,
            actor_hiddens=list(settings.hiddens),
            critic_hiddens=list(settings.hiddens),
            train_batch_size_per_learner=settings.batch_size,
            replay_buffer_config=replay,
            num_steps_sampled_before_learning_starts=settings.learning_starts,
            random_steps=settings.random_steps,
            updates_per_env_step=settings.updates_per_step,
            n_step=settings.n_step,
            grad_clip=settings.grad_clip,
            exploration_noise=settings.exploration_noise,
            noise_sigma=settings.noise_sigma,
            store_buffer_in_checkpoints=True,
            **td3,
        )
        .reporting(min_sample_timesteps_per_iteration=settings.eval_every)
        .evaluation(evaluation_interval=1, evaluation_duration=settings.eval_episodes)
        .fault_tolerance(
            restart_failed_env_runners=settings.restart_env_runners,
            max_num_env_runner_restarts=1000,
            delay_between_env_runner_restarts_s=2.0,
        )
        .debugging(seed=seed)
    )


def register_custom_env(settings: DDPGSettings) -> None:
    """Registers ``env_entry_point`` with Tune under ``env`` (env runners look it up there)."""
    if not settings.env_entry_point:
        return
    from ray.tune.registry import register_env

    from components.rl.policy import load_callable

    entry = settings.env_entry_point
    register_env(settings.env, lambda cfg: load_callable(entry)(dict(cfg)))


class CheckpointDir:
    """Numbered RLlib checkpoints in a local directory; a checkpoint counts once it is complete."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(str(root).removeprefix("file://"))
        self.keep = keep

    def newest(self) -> Path | None:
        done = sorted(p.parent for p in self.root.glob("step_*/COMPLETE"))
        return done[-1] if done else None

    def save(self, algo, step: int) -> Path:
        path = self.root / f"step_{step:010d}"
        algo.save_to_path(path)
        (path / "COMPLETE").write_text(str(step))
        for old in sorted(p.parent for p in self.root.glob("step_*/COMPLETE"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path


class DDPGStage(Component):
    """Trains a DDPG/TD3 agent with RLlib, evaluates it, checkpoints it, exports its policy."""

    name = "rl.ddpg"
    version = "1"
    Config = DDPGSettings
    #: The learner (and, with env_runners 0, the sampling) run in the stage's own task.
    task_cpus = 1.0

    def run(self, ctx: StageContext, config: DDPGSettings) -> dict[str, Any]:
        import ray

        if not ray.is_initialized():
            ray.init()
        seed = ctx.seed if config.seed is None else config.seed
        runners = ctx.resources.workers if config.env_runners is None else config.env_runners
        register_custom_env(config)
        algo = build_algorithm_config(config, seed, runners).build_algo()
        scratch = CheckpointDir(Path(ctx.scratch_dir) / "rllib")
        resumed_from = scratch.newest()
        if resumed_from is not None:
            algo.restore_from_path(resumed_from)

        out = Path(ctx.out_dir)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        start_steps, start = _env_steps(algo), time.time()
        metrics: dict[str, Any] = {"train/env_steps": start_steps}
        try:
            for metrics in train_iterations(algo, config.timesteps):
                ctx.report(step=metrics["train/env_steps"], **metrics)
                saved = scratch.save(algo, metrics["train/env_steps"])
                shutil.copytree(saved, out / "checkpoints" / saved.name, dirs_exist_ok=True)
            algo.save_to_path(out / "checkpoints" / "final")
            export_actor(algo, out, config, seed)
        finally:
            algo.stop()
        (out / "settings.json").write_text(
            json.dumps({"settings": config.model_dump(), "seed": seed}, indent=2, sort_keys=True)
        )
        metrics["train/resumed_from_step"] = int(start_steps)
        metrics["train/time_s"] = time.time() - start
        return metrics


def train_iterations(algo, timesteps: int) -> Iterator[dict[str, Any]]:
    """Trains ``algo`` until it has sampled ``timesteps`` env steps in all (counting the steps
    of a restored checkpoint); yields the metrics of each iteration, which ends with an
    evaluation (see ``build_algorithm_config``)."""
    import numpy as np
    from ray.rllib.core import DEFAULT_MODULE_ID

    env_steps = _env_steps(algo)
    start_steps, start = env_steps, time.time()
    while env_steps < timesteps:
        result = algo.train()
        env_steps = _env_steps(algo)
        ev = result["evaluation"]["env_runners"]
        learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
        yield {
            "eval/episode_return_mean": float(ev["episode_return_mean"]),
            "eval/episode_return_std": float(ev["episode_return_std"]),
            "eval/episode_return_min": float(ev["episode_return_min"]),
            "eval/episode_return_max": float(ev["episode_return_max"]),
            "train/env_steps": int(env_steps),
            "train/env_steps_per_s": (env_steps - start_steps) / max(time.time() - start, 1e-9),
            "train/critic_loss": float(learner.get("critic_loss", np.nan)),
            "train/actor_loss": float(learner.get("actor_loss", np.nan)),
        }


def export_actor(algo, out_dir: Path, config: DDPGSettings, seed: int) -> Path:
    """Exports the learner's actor as a standalone policy (``out_dir/policy``)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from components.rl.ddpg import env_spaces
    from components.rl.policy import export_policy

    obs_space, act_space = env_spaces(algo.config)
    results = algo.learner_group.foreach_learner(
        lambda learner: {
            k: v.cpu() for k, v in learner.module[DEFAULT_MODULE_ID].actor.state_dict().items()
        }
    )
    return export_policy(
        out_dir,
        next(iter(results)).get(),
        obs_dim=int(obs_space.shape[0]),
        act_low=act_space.low,
        act_high=act_space.high,
        hiddens=list(config.hiddens),
        env=config.env,
        env_config=dict(config.env_config),
        env_entry_point=config.env_entry_point,
        extra={"algorithm": config.algorithm, "seed": seed, "env_steps": _env_steps(algo)},
    )


def _env_steps(algo) -> int:
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    return int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))
