"""Fixtures of the RL tests (helpers live in ``rl_helpers.py``)."""

from __future__ import annotations

import pytest
from rl_helpers import ACT_SPACE, OBS_SPACE


@pytest.fixture
def make_learner():
    """Builds a local DDPG learner with tiny networks (no Ray cluster needed)."""

    def build(**training):
        from components.rl.algorithm import DDPGConfig

        config = (
            DDPGConfig()
            .environment(observation_space=OBS_SPACE, action_space=ACT_SPACE)
            .training(actor_hiddens=[16], critic_hiddens=[16], **training)
            .debugging(seed=0)
        )
        return config.build_learner()

    return build
