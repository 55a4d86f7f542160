"""Acting: normalized actions in the replay, env bounds, warm-up, Gaussian and OU noise, eval."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from rl_helpers import BoundsEnv, DiscreteEnv

from components.rl.algorithm import DDPGConfig, check_spaces
from components.rl.replay import FlatReplayBuffer


def make_runner(max_steps: int = 50, **training):
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    config = (
        DDPGConfig()
        .environment(BoundsEnv, env_config={"max_steps": max_steps})
        .env_runners(num_env_runners=0)
        .training(actor_hiddens=[16], critic_hiddens=[16], **training)
        .debugging(seed=0)
    )
    return SingleAgentEnvRunner(config=config)


def env_of(runner) -> BoundsEnv:
    return runner.env.unwrapped.envs[0].unwrapped


def actor_actions(runner, episode) -> np.ndarray:
    obs = np.asarray(episode.get_observations()[:-1], np.float32)
    with torch.no_grad():
        return runner.module.actor(torch.as_tensor(obs)).numpy()


def test_stored_actions_are_normalized_and_env_actions_respect_bounds():
    runner = make_runner(random_steps=10_000)  # uniform warm-up over the whole box
    episodes = runner.sample(num_timesteps=300, explore=True)
    stored = np.concatenate([np.asarray(ep.get_actions()) for ep in episodes])
    received = np.stack(env_of(runner).received)
    low, high = BoundsEnv.LOW, BoundsEnv.HIGH

    # The episode (hence the replay) keeps normalized actions covering [-1, 1] ...
    assert stored.min() >= -1.0 and stored.max() <= 1.0
    assert stored.min() < -0.9 and stored.max() > 0.9
    # ... and the env got them rescaled to its own (asymmetric) bounds.
    assert np.all(received >= low - 1e-5) and np.all(received <= high + 1e-5)
    np.testing.assert_allclose(received, low + (stored + 1) / 2 * (high - low), rtol=1e-5)
    assert received[:, 1].min() < 11.0 and received[:, 1].max() > 29.0

    buffer = FlatReplayBuffer(capacity=1000)
    buffer.add(episodes)
    np.testing.assert_array_equal(buffer.cols["actions"][: len(buffer)], stored)


def test_env_actions_respect_bounds_when_noise_pushes_past_them():
    runner = make_runner(random_steps=0, noise_sigma=5.0)
    runner.sample(num_timesteps=200, explore=True)
    received = np.stack(env_of(runner).received)
    assert np.all(received >= BoundsEnv.LOW - 1e-5) and np.all(received <= BoundsEnv.HIGH + 1e-5)
    # Huge noise saturates at the bounds instead of leaving them.
    assert np.isclose(received, BoundsEnv.HIGH, atol=1e-4).any()


@pytest.mark.parametrize("noise", ["gaussian", "ou"])
def test_evaluation_uses_no_noise(noise):
    runner = make_runner(random_steps=0, exploration_noise=noise, noise_sigma=0.5)
    for ep in runner.sample(num_episodes=2, explore=False):
        np.testing.assert_allclose(
            np.asarray(ep.get_actions()), actor_actions(runner, ep), rtol=0, atol=1e-6
        )
    explored = runner.sample(num_episodes=1, explore=True)[0]
    assert not np.allclose(np.asarray(explored.get_actions()), actor_actions(runner, explored))


def lag1_autocorrelation(x: np.ndarray) -> float:
    x = x - x.mean()
    return float(np.sum(x[1:] * x[:-1]) / np.sum(x * x))


def test_ou_noise_is_temporally_correlated_and_resets_per_episode():
    sigma = 0.3
    runner = make_runner(200, random_steps=0, exploration_noise="ou", noise_sigma=sigma)
    episodes = runner.sample(num_episodes=6, explore=True)
    assert len(episodes) == 6
    firsts, lasts, correlations = [], [], []
    for ep in episodes:
        noise = np.asarray(ep.get_actions()) - actor_actions(runner, ep)
        assert len(noise) == 200
        correlations += [lag1_autocorrelation(noise[:, d]) for d in range(noise.shape[1])]
        firsts.append(np.abs(noise[0]).max())
        lasts.append(np.abs(noise[-50:]).mean())
    # A Gaussian's lag-1 autocorrelation is about 0 (see below); OU's is close to 1.
    assert np.mean(correlations) > 0.8
    # Each episode's process starts at zero: one step of noise (std sigma*sqrt(dt) = 0.03).
    assert max(firsts) < 0.15
    assert np.mean(lasts) > 2 * np.mean(firsts)
    # Finished episodes' states are dropped.
    ou = next(c for c in runner._module_to_env.connectors if type(c).__name__.startswith("Orn"))
    assert len(ou.states) <= 1


def test_gaussian_noise_is_independent_per_step():
    runner = make_runner(200, random_steps=0, exploration_noise="gaussian", noise_sigma=0.1)
    ep = runner.sample(num_episodes=1, explore=True)[0]
    noise = np.asarray(ep.get_actions()) - actor_actions(runner, ep)
    assert abs(lag1_autocorrelation(noise[:, 0])) < 0.25
    assert 0.06 < noise.std() < 0.14


def test_random_warm_up_then_actor():
    runner = make_runner(random_steps=60, exploration_noise="none")
    episodes = runner.sample(num_timesteps=100, explore=True)
    actions = np.concatenate([np.asarray(e.get_actions()) for e in episodes])
    actor = np.concatenate([actor_actions(runner, e) for e in episodes])
    assert not np.allclose(actions[:60], actor[:60], atol=1e-3)
    np.testing.assert_allclose(actions[60:], actor[60:], rtol=1e-5, atol=1e-6)


def test_non_box_or_unbounded_action_spaces_are_rejected_naming_the_env(ray_local):
    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    with pytest.raises(ValueError, match="my-env.*Discrete"):
        check_spaces(box, gym.spaces.Discrete(3), env_name="my-env")
    with pytest.raises(ValueError, match="bounded.*my-env"):
        check_spaces(box, gym.spaces.Box(-np.inf, np.inf, (2,), np.float32), env_name="my-env")
    with pytest.raises(ValueError, match="CartPole-v1"):
        DDPGConfig().environment("CartPole-v1").env_runners(num_env_runners=0).build_algo()

    from ray.tune.registry import register_env

    register_env("raypipe-test-discrete", lambda cfg: DiscreteEnv(cfg))
    with pytest.raises(ValueError, match="raypipe-test-discrete"):
        DDPGConfig().environment("raypipe-test-discrete").env_runners(
            num_env_runners=0
        ).build_algo()
