"""Ornstein-Uhlenbeck exploration noise as a module-to-env connector piece.

OU noise is a per-episode random process, ``x <- x + theta (mu - x) dt + sigma sqrt(dt) N(0, 1)``,
so consecutive actions of one episode get correlated noise. The state has to live where episode
ids are known: RLlib's module-to-env connector pipeline, which sees each action together with its
episode. The state of an episode starts at zero on its first step and is dropped once the episode
is gone, so every episode starts afresh. With ``explore=False`` (evaluation) the piece does nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns


class OrnsteinUhlenbeckNoise(ConnectorV2):
    """Adds OU noise to normalized actions (then clips to [-1, 1]) while exploring.

    Args:
        sigma: scale of the noise.
        theta: pull back to ``mu`` per unit of time.
        dt: time step of the process.
        random_steps: lifetime env steps of the uniform warm-up (the module's random actions are
            left alone during it).
        seed: seed of the noise generator.
    """

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        sigma: float = 0.1,
        theta: float = 0.15,
        dt: float = 1e-2,
        random_steps: int = 0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.sigma, self.theta, self.dt = sigma, theta, dt
        self.random_steps = random_steps
        self.rng = np.random.default_rng(seed)
        self.states: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, eps_id: str, shape: tuple[int, ...]) -> np.ndarray:
        """Advances (or starts at zero) the noise process of one episode and returns it."""
        x = self.states.get(eps_id)
        if x is None:
            x = np.zeros(shape, np.float32)
        x = x + self.theta * (0.0 - x) * self.dt
        x = x + self.sigma * np.sqrt(self.dt) * self.rng.standard_normal(shape).astype(np.float32)
        self.states[eps_id] = x
        return x

    def __call__(self, *, rl_module, batch, episodes, explore=None, **kwargs) -> Any:
        if not explore:
            return batch
        live = {ep.id_ for ep in episodes}
        # Forget episodes that ended: a new episode's process starts from zero.
        for eps_id in list(self.states):
            if eps_id not in live:
                del self.states[eps_id]
        self.steps += len(episodes)
        if self.steps <= self.random_steps:
            return batch

        def add_noise(action, eps_id, agent_id, module_id):
            action = np.asarray(action, np.float32)
            return np.clip(action + self.step(eps_id, action.shape), -1.0, 1.0)

        self.foreach_batch_item_change_in_place(batch, Columns.ACTIONS, add_noise)
        return batch
