"""DDPG/TD3 as RLlib algorithms: built from Python, registered with Tune, both replay paths,
prioritized replay, checkpoint + restore in a fresh process, and an env runner killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

from components.rl.algorithm import DDPG, TD3, DDPGConfig, TD3Config

REPO = Path(__file__).resolve().parents[2]


def tiny(config: DDPGConfig, steps_per_iter: int = 200, runners: int = 0) -> DDPGConfig:
    return (
        config.environment("Pendulum-v1")
        .env_runners(num_env_runners=runners, rollout_fragment_length=8)
        .training(
            actor_hiddens=[32, 32],
            critic_hiddens=[32, 32],
            num_steps_sampled_before_learning_starts=100,
            train_batch_size_per_learner=64,
        )
        .reporting(min_sample_timesteps_per_iteration=steps_per_iter)
        .debugging(seed=0)
    )


def env_steps(algo) -> int:
    return int(algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)))


def test_registered_with_tune_by_name():
    from ray.tune.registry import get_trainable_cls

    from components.rl.algorithm import register_with_tune

    # Registered at import; Tune's registry belongs to the cluster in use, and other tests may
    # have started a new one since (see register_with_tune).
    register_with_tune()

    assert get_trainable_cls("DDPG") is DDPG
    assert get_trainable_cls("TD3") is TD3
    td3 = TD3Config()
    assert (td3.twin_q, td3.policy_delay, td3.target_noise, td3.target_noise_clip) == (
        True,
        2,
        0.2,
        0.5,
    )
    ddpg = DDPGConfig()
    assert (ddpg.twin_q, ddpg.policy_delay, ddpg.target_noise) == (False, 1, 0.0)
    assert ddpg.evaluation_config["explore"] is False


def test_td3_trains_and_env_runners_hold_only_the_actor(ray_local):
    algo = tiny(TD3Config()).build_algo()
    try:
        result = algo.train()
        assert env_steps(algo) >= 200
        learner = result["learners"]["default_policy"]
        assert np.isfinite(learner["critic_loss"]) and np.isfinite(learner["actor_loss"])
        runner_module = algo.env_runner.module
        assert runner_module.inference_only
        assert not hasattr(runner_module, "critics")
        learner_module = algo.learner_group._learner.module["default_policy"]
        assert len(learner_module.critics) == 2
        # The env runner's actor is the learner's (synced after each update).
        for a, b in zip(
            runner_module.actor.parameters(), learner_module.actor.parameters(), strict=True
        ):
            torch.testing.assert_close(a, b)
    finally:
        algo.stop()


def test_rllib_episode_replay_path_still_works(ray_local):
    # fast_replay=False: RLlib's own DQN/SAC training step, episode replay and learner connector.
    algo = tiny(DDPGConfig()).training(fast_replay=False, n_step=2).build_algo()
    try:
        result = algo.train()
        assert type(algo.local_replay_buffer).__name__ == "EpisodeReplayBuffer"
        assert np.isfinite(result["learners"]["default_policy"]["critic_loss"])
    finally:
        algo.stop()


def test_prioritized_replay_updates_priorities(ray_local):
    config = tiny(DDPGConfig()).training(
        replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 10_000}
    )
    algo = config.build_algo()
    try:
        algo.train()
        buffer = algo.local_replay_buffer
        assert buffer.prioritized
        prios = buffer.priorities[: len(buffer)]
        assert len(np.unique(prios)) > 10  # TD errors came back and replaced the initial ones
    finally:
        algo.stop()


def test_checkpoint_restores_in_a_fresh_process_with_the_same_actions(ray_local, tmp_path):
    algo = tiny(DDPGConfig()).build_algo()
    try:
        algo.train()
        obs = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
        module = algo.get_module()
        with torch.no_grad():
            actions = module.forward_inference({Columns.OBS: torch.as_tensor(obs)})
        algo.save_to_path(tmp_path / "ckpt")
    finally:
        algo.stop()
    np.save(tmp_path / "obs.npy", obs)
    script = textwrap.dedent(
        f"""
        import numpy as np, ray, torch
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
        from ray.rllib.algorithms.algorithm import Algorithm
        algo = Algorithm.from_checkpoint({str(tmp_path / "ckpt")!r})
        obs = torch.as_tensor(np.load({str(tmp_path / "obs.npy")!r}))
        with torch.no_grad():
            out = algo.get_module().forward_inference({{"obs": obs}})["actions"]
        np.save({str(tmp_path / "restored.npy")!r}, out.numpy())
        print(type(algo).__name__)
        algo.stop()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDPG" in proc.stdout
    restored = np.load(tmp_path / "restored.npy")
    np.testing.assert_array_equal(restored, actions[Columns.ACTIONS].numpy())


@pytest.mark.reliability
def test_training_goes_on_after_an_env_runner_is_killed(ray_local):
    config = tiny(DDPGConfig(), runners=1).fault_tolerance(
        restart_failed_env_runners=True,
        max_num_env_runner_restarts=5,
        delay_between_env_runner_restarts_s=1.0,
    )
    algo = config.build_algo()
    try:
        algo.train()
        before = env_steps(algo)
        (pid,) = algo.env_runner_group.foreach_env_runner(
            lambda runner: os.getpid(), local_env_runner=False
        )
        os.kill(pid, signal.SIGKILL)
        for _ in range(30):  # the restart takes an iteration or two
            algo.train()
            if env_steps(algo) >= before + 400:
                break
        assert env_steps(algo) >= before + 400
        assert algo.env_runner_group.num_remote_worker_restarts() >= 1
        assert algo.env_runner_group.num_healthy_remote_workers() == 1
        (new_pid,) = algo.env_runner_group.foreach_env_runner(
            lambda runner: os.getpid(), local_env_runner=False
        )
        assert new_pid != pid
    finally:
        algo.stop()
