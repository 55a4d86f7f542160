"""The ``rl.ddpg`` stage: trains DDPG or TD3 (``algorithm.py``) on a gymnasium env.

    agent:
      uses: rl.ddpg
      with: {env: Pendulum-v1, timesteps: 20000, eval_every: 5000}

Every ``eval_every`` env steps the stage evaluates ``eval_episodes`` deterministic episodes,
reports the metrics, and writes an RLlib checkpoint both into the scratch directory (for resume:
a rerun after a failure restores the newest one, replay buffer included) and into the artifact
(``checkpoints/step_<N>``, plus ``checkpoints/final``). At the end it exports the actor as a
standalone policy (a model bundle, see ``policy.py``) that ``raypipe rollout`` runs, and scores
it over ``eval_episodes`` deterministic episodes on env seeds apart from training's
(``test/episode_return_mean``), as ``tune.evaluate`` would.

This module imports only pydantic at import time; Ray, RLlib and torch load inside ``run``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.api import Component, StageContext
from components.rl.settings import TEST_SEED, DDPGSettings


def build_algorithm_config(settings: DDPGSettings, seed: int, env_runners: int):
    """The RLlib ``DDPGConfig`` / ``TD3Config`` for the stage's settings."""
    from components.rl.algorithm import DDPGConfig, TD3Config

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
    """Numbered RLlib checkpoints under the stage's scratch location: a local path, or a storage
    URI (``s3://``, ``file://``: what a multi-node cluster shares, so a rerun on another node
    resumes). RLlib saves to and restores from local directories: on a URI each checkpoint is
    saved locally, then uploaded, and the newest is downloaded before a restore. A checkpoint
    counts once its ``COMPLETE`` marker exists, and the marker is written (uploaded) last.

    Args:
        root: the directory or URI holding the checkpoints.
        keep: how many complete checkpoints to keep.
    """

    def __init__(self, root: str, keep: int = 2):
        import pyarrow.fs as pafs

        self.keep = keep
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.local: Path = Path(tempfile.mkdtemp(prefix="raypipe-rllib-"))
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(root)
            self.local = Path(root)
        self.remote = "://" in root

    def _complete(self) -> list[str]:
        """Names of the complete checkpoints, oldest first."""
        import pyarrow.fs as pafs

        found = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        names = sorted(i.base_name for i in found if i.base_name.startswith("step_"))
        done = self.fs.get_file_info([f"{self.base}/{n}/COMPLETE" for n in names])
        return [n for n, info in zip(names, done, strict=True) if info.is_file]

    def newest(self) -> Path | None:
        """The newest complete checkpoint, as a local directory (downloaded from a URI)."""
        import pyarrow.fs as pafs

        done = self._complete()
        if not done:
            return None
        path = self.local / done[-1]
        if self.remote:
            shutil.rmtree(path, ignore_errors=True)
            pafs.copy_files(
                f"{self.base}/{done[-1]}",
                str(path),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        return path

    def save(self, algo, step: int) -> Path:
        """Saves a checkpoint (uploaded to a URI, marker last); drops the oldest beyond
        ``keep``. Returns the local directory of the new checkpoint."""
        import pyarrow.fs as pafs

        name = f"step_{step:010d}"
        path = self.local / name
        algo.save_to_path(path)
        if self.remote:
            pafs.copy_files(str(path), f"{self.base}/{name}", pafs.LocalFileSystem(), self.fs)
            with self.fs.open_output_stream(f"{self.base}/{name}/COMPLETE") as out:
                out.write(str(step).encode())
        (path / "COMPLETE").write_text(str(step))
        for old in self._complete()[: -self.keep]:
            self.fs.delete_dir(f"{self.base}/{old}")
            shutil.rmtree(self.local / old, ignore_errors=True)
        return path

    def close(self) -> None:
        """Removes the local copies kept for a URI (a local root is the checkpoints)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class DDPGStage(Component):
    """Trains a DDPG/TD3 agent with RLlib, evaluates it, checkpoints it, exports its policy."""

    version = "2"  # 2: the policy as a model bundle, scored on test episodes
    Config = DDPGSettings
    produces = "model/ddpg"
    trainable = "components.rl.tuning:TRAINABLE"
    #: The learner (and, with env_runners 0, the sampling) run in the stage's own task.
    task_cpus_setting = "learner_cpus"

    def run(self, ctx: StageContext, config: DDPGSettings) -> dict[str, Any]:
        import ray
        import torch

        from components.rl.policy import load_policy, score_policy
        from components.training import torch_threads

        if not ray.is_initialized():
            ray.init()
        seed = ctx.seed if config.seed is None else config.seed
        runners = ctx.resources.workers if config.env_runners is None else config.env_runners
        register_custom_env(config)
        algo = build_algorithm_config(config, seed, runners).build_algo()
        scratch = CheckpointDir(f"{str(ctx.scratch_dir).rstrip('/')}/rllib")
        resumed_from = scratch.newest()
        if resumed_from is not None:
            algo.restore_from_path(resumed_from)

        out = Path(ctx.out_dir)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        start_steps, start = _env_steps(algo), time.time()
        metrics: dict[str, Any] = {"train/env_steps": start_steps}
        try:
            with torch_threads(config.learner_cpus):
                threads = torch.get_num_threads()
                for metrics in train_iterations(algo, config.timesteps):
                    ctx.report(step=metrics["train/env_steps"], **metrics)
                    saved = scratch.save(algo, metrics["train/env_steps"])
                    shutil.copytree(saved, out / "checkpoints" / saved.name, dirs_exist_ok=True)
                algo.save_to_path(out / "checkpoints" / "final")
                export_actor(algo, out, config, seed)
        finally:
            algo.stop()
            scratch.close()
        (out / "settings.json").write_text(
            json.dumps({"settings": config.model_dump(), "seed": seed}, indent=2, sort_keys=True)
        )
        metrics["train/resumed_from_step"] = int(start_steps)
        # Sampling, updates and checkpoints; the evaluations every eval_every steps apart.
        metrics["train/time_s"] = time.time() - start - algo.evaluation_s
        metrics["eval/time_s"] = algo.evaluation_s
        metrics["train/torch_threads"] = threads
        # The exported policy on env seeds apart from training's, as a gate will score it.
        return {**metrics, **score_policy(load_policy(out), config.eval_episodes, TEST_SEED)}


def train_iterations(algo, timesteps: int) -> Iterator[dict[str, Any]]:
    """Trains ``algo`` until it has sampled ``timesteps`` env steps in all (counting the steps
    of a restored checkpoint); yields the metrics of each iteration, which ends with an
    evaluation (see ``build_algorithm_config``). Its env steps/s leave the evaluations out."""
    import numpy as np
    from ray.rllib.core import DEFAULT_MODULE_ID

    env_steps = _env_steps(algo)
    start_steps, start, evaluated = env_steps, time.time(), algo.evaluation_s
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
            "train/env_steps_per_s": (env_steps - start_steps)
            / max(time.time() - start - (algo.evaluation_s - evaluated), 1e-9),
            "train/critic_loss": float(learner.get("critic_loss", np.nan)),
            "train/actor_loss": float(learner.get("actor_loss", np.nan)),
        }


def export_actor(algo, out_dir: Path, config: DDPGSettings, seed: int) -> Path:
    """Exports the learner's actor as a standalone policy (a model bundle in ``out_dir``)."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from components.rl.algorithm import env_spaces
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
        config=config.model_dump(mode="json"),
        extra={"algorithm": config.algorithm, "seed": seed, "env_steps": _env_steps(algo)},
    )


def _env_steps(algo) -> int:
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    return int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))
