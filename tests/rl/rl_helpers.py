"""Helpers shared by the RL tests: batches, learner updates and envs with odd action bounds."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class BoundsEnv(gym.Env):
    """A 3-D observation, 2-D action env with asymmetric bounds that records the actions it gets.

    The reward pulls the action toward the middle of the box; episodes are truncated after
    ``max_steps`` (never terminated), like Pendulum.
    """

    LOW = np.array([-2.0, 10.0], np.float32)
    HIGH = np.array([2.0, 30.0], np.float32)

    def __init__(self, config=None):
        config = dict(config or {})
        self.max_steps = int(config.get("max_steps", 20))
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Box(self.LOW, self.HIGH, dtype=np.float32)
        self.received: list[np.ndarray] = []
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), {}

    def step(self, action):
        self.received.append(np.array(action, np.float32))
        self.t += 1
        middle = (self.LOW + self.HIGH) / 2
        reward = -float(np.sum(((np.asarray(action) - middle) / (self.HIGH - self.LOW)) ** 2))
        obs = self.np_random.uniform(-1, 1, 3).astype(np.float32)
        return obs, reward, False, self.t >= self.max_steps, {}


class DiscreteEnv(gym.Env):
    """An env with a discrete action space, which DDPG must reject."""

    def __init__(self, config=None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(3)


OBS_SPACE = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACT_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def random_batch(n: int, seed: int = 0, terminated=None) -> dict[str, np.ndarray]:
    """A batch of ``n`` random transitions in the flat replay's format."""
    from ray.rllib.core.columns import Columns

    rng = np.random.default_rng(seed)
    return {
        Columns.OBS: rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        Columns.ACTIONS: rng.uniform(-1, 1, (n, 2)).astype(np.float32),
        Columns.REWARDS: rng.normal(size=n).astype(np.float32),
        Columns.NEXT_OBS: rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        Columns.TERMINATEDS: (
            np.zeros(n, np.float32) if terminated is None else np.asarray(terminated, np.float32)
        ),
        "n_step": np.ones(n, np.float32),
    }


def learner_update(learner, data: dict[str, np.ndarray], minibatch_size: int | None = None):
    """One ``Learner.update`` call on a ready batch (as ``DDPG.training_step`` makes it)."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    n = len(data["n_step"])
    return learner.update(
        batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(dict(data))}, env_steps=n),
        minibatch_size=minibatch_size or n,
        num_epochs=1,
        timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 0},
    )
