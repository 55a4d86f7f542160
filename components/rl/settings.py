"""The settings of a DDPG/TD3 agent: the ``rl.ddpg`` stage's ``with:`` block and the one place
every default lives. Imports only pydantic, so validating a pipeline never imports RLlib.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from components.api import StrictModel

#: Env seed of the first episode a trained policy is scored on (the stage's test episodes and
#: a gate's default): apart from the seeds RLlib's evaluation runner uses during training, as a
#: test split is apart from validation.
TEST_SEED = 10_000


class DDPGSettings(StrictModel):
    """Settings of the ``rl.ddpg`` stage (the ``with:`` block), and the defaults of
    ``DDPGConfig`` (``algorithm.py``): each default lives here, once. They are
    rl-baselines3-zoo's Pendulum settings, except ``learning_starts`` (the zoo waits 10k steps;
    1k reaches about -175 by 5k steps, ``benchmarks/rl.py --learning-starts 1000``).

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
        learner_cpus: CPUs the stage's own task (a tune trial's process) holds for the learner,
            and with ``env_runners`` 0 for sampling and evaluation; torch computes with as many
            threads. Each env runner holds one CPU of its own.
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
    learner_cpus: int = Field(1, ge=1)
    gamma: float = Field(0.98, gt=0, le=1)
    tau: float = Field(0.005, gt=0, le=1)
    actor_lr: float = Field(1e-3, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    hiddens: list[int] = Field(default_factory=lambda: [400, 300])
    batch_size: int = Field(256, gt=0)
    buffer_size: int = Field(200_000, gt=0)
    learning_starts: int = Field(1_000, ge=0)
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
