"""DDPG (and TD3) as a first-class RLlib algorithm on the new API stack.

Written the way RLlib writes SAC and TQC: an ``AlgorithmConfig`` (``DDPGConfig``), an
``Algorithm`` (``DDPG``), a default RLModule (``module.py``: tanh actor, Q critic(s), targets)
and a TorchLearner (``learner.py``: the losses and the Polyak step). TD3 is DDPG with three
switches (``twin_q``, ``policy_delay``, ``target_noise``); ``TD3Config`` turns them on.

    from components.rl.algorithm import DDPGConfig
    algo = DDPGConfig().environment("Pendulum-v1").build_algo()
    algo.train()

Training step (``DDPG.training_step``), by default on the fast path:
  1. sample ``rollout_fragment_length`` steps per env runner (exploring: uniform warm-up, then
     the actor plus Gaussian or Ornstein-Uhlenbeck noise; RLlib rescales actions to the env);
  2. add them to a flat array replay (``replay.py``) as normalized-action n-step transitions;
  3. once ``num_steps_sampled_before_learning_starts`` env steps were sampled, take
     ``updates_per_env_step`` gradient steps per new env step: one ``LearnerGroup.update`` call
     carries all of them as minibatches of one ready batch (no episode slicing, no learner
     connector);
  4. update priorities (prioritized replay), then sync the actor to the env runners (copied
     in place when the only env runner shares the learner's process).
With ``fast_replay=False`` the algorithm runs RLlib's own off-policy step instead (DQN/SAC's
``training_step`` with RLlib's episode replay buffers); the learner accepts both.

Importing this module registers ``DDPG`` and ``TD3`` with Tune.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.algorithms.sac.sac import SAC, SACConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    EVALUATION_RESULTS,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_ADD_DATA_TIMER,
    REPLAY_BUFFER_RESULTS,
    REPLAY_BUFFER_SAMPLE_TIMER,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TD_ERROR_KEY,
    TIMERS,
)
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger
from ray.rllib.utils.numpy import convert_to_numpy
from ray.tune.registry import ENV_CREATOR, _global_registry, register_trainable

from components.rl.replay import FlatReplayBuffer
from components.rl.settings import DDPGSettings

NOISE_KINDS = ("gaussian", "ou", "none")


class DDPGConfig(SACConfig):
    """Configuration of DDPG / TD3 (SAC's config minus the entropy terms, plus the below).

    Defaults are those of the ``rl.ddpg`` stage (``settings.DDPGSettings``, where each is
    documented): rl-baselines3-zoo's, the DDPG of Fujimoto et al. (TD3 paper, "our DDPG").
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or DDPG)
        defaults = DDPGSettings()
        # Networks (normalized action space; tanh actor).
        self.actor_hiddens = list(defaults.hiddens)
        self.critic_hiddens = list(defaults.hiddens)
        self.twin_q = False
        # Optimization.
        self.actor_lr = defaults.actor_lr
        self.critic_lr = defaults.critic_lr
        self.gamma = defaults.gamma
        self.tau = defaults.tau
        self.n_step = defaults.n_step
        self.grad_clip = defaults.grad_clip
        self.train_batch_size_per_learner = defaults.batch_size
        self.updates_per_env_step = defaults.updates_per_step
        # TD3 switches (all off: plain DDPG; TD3Config turns them on).
        self.policy_delay = 1
        self.target_noise = 0.0
        self.target_noise_clip = 0.5
        # Exploration.
        self.exploration_noise = defaults.exploration_noise
        self.noise_sigma = defaults.noise_sigma
        self.ou_theta = 0.15
        self.ou_dt = 1e-2
        self.random_steps = defaults.random_steps  # None: until learning starts
        self.num_steps_sampled_before_learning_starts = defaults.learning_starts
        # Replay: uniform by default; "PrioritizedEpisodeReplayBuffer" turns on prioritized.
        self.replay_buffer_config = {
            "type": "EpisodeReplayBuffer",
            "capacity": defaults.buffer_size,
        }
        self.fast_replay = True
        self.rollout_fragment_length = defaults.rollout_fragment_length
        # Reporting and evaluation: evaluation is deterministic (never explores).
        self.min_time_s_per_iteration = 0
        self.min_sample_timesteps_per_iteration = defaults.eval_every
        self.evaluation_config = {"explore": False}
        self.evaluation_duration = defaults.eval_episodes
        self.evaluation_duration_unit = "episodes"
        self.custom_evaluation_function = evaluate_deterministic

    def training(
        self,
        *,
        actor_hiddens: list[int] | None = NotProvided,
        critic_hiddens: list[int] | None = NotProvided,
        policy_delay: int | None = NotProvided,
        target_noise: float | None = NotProvided,
        target_noise_clip: float | None = NotProvided,
        exploration_noise: str | None = NotProvided,
        noise_sigma: float | None = NotProvided,
        ou_theta: float | None = NotProvided,
        ou_dt: float | None = NotProvided,
        random_steps: int | None = NotProvided,
        updates_per_env_step: float | None = NotProvided,
        fast_replay: bool | None = NotProvided,
        **kwargs,
    ) -> DDPGConfig:
        """Sets DDPG's training options (and, through ``**kwargs``, SAC's and RLlib's).

        Args:
            actor_hiddens: hidden layer sizes of the actor.
            critic_hiddens: hidden layer sizes of each critic.
            policy_delay: critic updates per actor (and target) update; TD3 uses 2.
            target_noise: std of TD3's smoothing noise on the target action (0: off).
            target_noise_clip: the smoothing noise is clipped to +-this.
            exploration_noise: ``gaussian``, ``ou`` (Ornstein-Uhlenbeck, per episode) or
                ``none``; in normalized action units.
            noise_sigma: scale of the exploration noise.
            ou_theta: OU mean reversion.
            ou_dt: OU time step.
            random_steps: uniform-random warm-up, in env steps (None: until learning starts).
            updates_per_env_step: gradient steps per sampled env step.
            fast_replay: use the flat array replay (``replay.py``) instead of RLlib's episode
                replay + learner connector.
            **kwargs: ``SACConfig.training`` options (``twin_q``, ``tau``, ``n_step``,
                ``actor_lr``, ``critic_lr``, ``grad_clip``, ``replay_buffer_config`` ...).
        """
        super().training(**kwargs)
        for name, value in dict(
            actor_hiddens=actor_hiddens,
            critic_hiddens=critic_hiddens,
            policy_delay=policy_delay,
            target_noise=target_noise,
            target_noise_clip=target_noise_clip,
            exploration_noise=exploration_noise,
            noise_sigma=noise_sigma,
            ou_theta=ou_theta,
            ou_dt=ou_dt,
            random_steps=random_steps,
            updates_per_env_step=updates_per_env_step,
            fast_replay=fast_replay,
        ).items():
            if value is not NotProvided:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        super().validate()
        if self.exploration_noise not in NOISE_KINDS:
            raise ValueError(
                f"exploration_noise must be one of {NOISE_KINDS}, got {self.exploration_noise!r}"
            )
        if int(self.policy_delay) < 1:
            raise ValueError(f"policy_delay must be >= 1, got {self.policy_delay}")
        if self.target_noise < 0 or self.target_noise_clip < 0:
            raise ValueError("target_noise and target_noise_clip must be >= 0")
        if self.updates_per_env_step <= 0:
            raise ValueError("updates_per_env_step must be > 0")
        if isinstance(self.n_step, (tuple, list)):
            raise ValueError("DDPG takes a fixed n_step (an int)")
        if self.training_intensity is None:
            # RLlib's own step (fast_replay=False) reads the ratio as replayed / sampled steps.
            self.training_intensity = self.updates_per_env_step * self.train_batch_size_per_learner

    @property
    def warmup_steps(self) -> int:
        """Env steps of uniform-random actions at the start of training."""
        if self.random_steps is None:
            return int(self.num_steps_sampled_before_learning_starts)
        return int(self.random_steps)

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from components.rl.module import DDPGTorchRLModule

        return RLModuleSpec(module_class=DDPGTorchRLModule)

    def get_default_learner_class(self):
        from components.rl.learner import DDPGTorchLearner

        return DDPGTorchLearner

    def build_module_to_env_connector(self, env=None, spaces=None):
        pipeline = super().build_module_to_env_connector(env, spaces)
        if self.exploration_noise == "ou":
            from ray.rllib.connectors.module_to_env import NormalizeAndClipActions

            from components.rl.noise import OrnsteinUhlenbeckNoise

            pipeline.insert_before(
                NormalizeAndClipActions,
                OrnsteinUhlenbeckNoise(
                    sigma=self.noise_sigma,
                    theta=self.ou_theta,
                    dt=self.ou_dt,
                    random_steps=self.warmup_steps // max(self.num_env_runners, 1),
                    seed=self.seed,
                ),
            )
        return pipeline

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "actor_hiddens": list(self.actor_hiddens),
            "critic_hiddens": list(self.critic_hiddens),
            "exploration_noise": self.exploration_noise,
            "noise_sigma": self.noise_sigma,
            "random_steps": self.warmup_steps,
        }


class TD3Config(DDPGConfig):
    """TD3 (Fujimoto et al. 2018): DDPG with clipped double Q, delayed actor, target smoothing."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TD3)
        self.twin_q = True
        self.policy_delay = 2
        self.target_noise = 0.2
        self.target_noise_clip = 0.5


def check_spaces(observation_space: gym.Space, action_space: gym.Space, env_name: str) -> None:
    """Rejects spaces DDPG cannot act in, naming the env.

    Raises:
        ValueError: the action space is not a bounded 1-D Box, or observations are not a Box.
    """
    if not isinstance(action_space, gym.spaces.Box):
        raise ValueError(
            f"DDPG needs a continuous (gymnasium Box) action space; env {env_name!r} has "
            f"{action_space}"
        )
    if not action_space.is_bounded("both") or not np.all(np.isfinite(action_space.low)):
        raise ValueError(
            f"DDPG needs a bounded action space (finite low and high); env {env_name!r} has "
            f"{action_space}"
        )
    if len(action_space.shape) != 1:
        raise ValueError(f"DDPG needs a 1-D action Box; env {env_name!r} has {action_space}")
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(
            f"DDPG needs a 1-D Box observation space; env {env_name!r} has {observation_space}"
        )


def env_spaces(config: AlgorithmConfig) -> tuple[gym.Space, gym.Space]:
    """Makes the configured env once (a Tune-registered name, a gymnasium id or a class)."""
    from ray.rllib.env.env_context import EnvContext

    if config.observation_space is not None and config.action_space is not None:
        return config.observation_space, config.action_space
    env_config = EnvContext(config.env_config or {}, worker_index=0)
    if isinstance(config.env, str) and _global_registry.contains(ENV_CREATOR, config.env):
        env = _global_registry.get(ENV_CREATOR, config.env)(env_config)
    elif isinstance(config.env, str):
        env = gym.make(config.env, **(config.env_config or {}))
    else:
        env = config.env(env_config)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def evaluate_deterministic(algo: Algorithm, eval_workers) -> tuple[dict[str, Any], int, int]:
    """RLlib custom evaluation: ``evaluation_duration`` episodes without exploration.

    Returns the mean, std, min and max episode return (RLlib's own evaluation has no std).
    """
    n = int(algo.config.evaluation_duration)
    remote = eval_workers.num_healthy_remote_workers()
    if remote == 0:
        episodes = eval_workers.local_env_runner.sample(num_episodes=n, explore=False)
    else:
        per = -(-n // remote)
        parts = eval_workers.foreach_env_runner(
            lambda r: r.sample(num_episodes=per, explore=False), local_env_runner=False
        )
        episodes = [ep for part in parts for ep in part][:n]
    # Episodes come back in chunks only when they did not finish; here every one finished.
    returns = np.array([ep.get_return() for ep in episodes if ep.is_done], np.float64)
    lengths = [len(ep) for ep in episodes if ep.is_done]
    steps = int(sum(len(ep) for ep in episodes))
    results = {
        "episode_return_mean": float(returns.mean()),
        "episode_return_std": float(returns.std()),
        "episode_return_min": float(returns.min()),
        "episode_return_max": float(returns.max()),
        "episode_len_mean": float(np.mean(lengths)),
        "num_episodes": len(returns),
    }
    # On the new API stack RLlib reads evaluation results from the algorithm's metrics.
    logger = MetricsLogger()
    for key, value in results.items():
        logger.log_value(key, value, window=1)
    algo.metrics.aggregate([logger.reduce()], key=(EVALUATION_RESULTS, ENV_RUNNER_RESULTS))
    algo.last_evaluation_returns = returns.tolist()
    return results, steps, steps


class DDPG(SAC):
    """Deep Deterministic Policy Gradient (Lillicrap et al. 2016), with TD3's options."""

    @classmethod
    def get_default_config(cls) -> DDPGConfig:
        return DDPGConfig()

    def setup(self, config: AlgorithmConfig) -> None:
        name = config.env if isinstance(config.env, str) else getattr(config.env, "__name__", "?")
        check_spaces(*env_spaces(config), env_name=str(name))
        super().setup(config)
        if self.config.fast_replay:
            rb = self.config.replay_buffer_config
            self.local_replay_buffer = FlatReplayBuffer(
                capacity=int(rb.get("capacity", 1e6)),
                n_step=int(self.config.n_step),
                gamma=self.config.gamma,
                prioritized="Prioritized" in str(rb.get("type", "")),
                alpha=rb.get("alpha", 0.6),
                beta=rb.get("beta", 0.4),
                seed=self.config.seed,
            )
        # Gradient steps owed to the env steps sampled so far (fractional ratios carry over).
        self._update_credit = 0.0
        #: Seconds spent in :meth:`evaluate` so far (a stage reports its training time without).
        self.evaluation_s = 0.0

    def evaluate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.evaluation_s += time.perf_counter() - started

    def training_step(self) -> None:
        if not self.config.fast_replay:
            return super().training_step()
        cfg = self.config

        # 1. Sample from the env runners (exploring).
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, env_runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group,
                concat=True,
                sample_timeout_s=cfg.sample_timeout_s,
                _uses_new_env_runners=True,
                _return_metrics=True,
            )
        self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)

        # 2. Store normalized-action n-step transitions.
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_ADD_DATA_TIMER)):
            self.local_replay_buffer.add(episodes)
        for key, value in self.local_replay_buffer.get_metrics().items():
            self.metrics.log_value((REPLAY_BUFFER_RESULTS, key), value, window=1)
        env_steps = self.metrics.peek(
            (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0
        )
        if env_steps < cfg.num_steps_sampled_before_learning_starts:
            return
        self._update_credit += sum(len(ep) for ep in episodes) * cfg.updates_per_env_step
        num_updates = int(self._update_credit)
        if num_updates == 0:
            return
        self._update_credit -= num_updates

        # 3. All gradient steps of this iteration: one ready batch, cut into minibatches.
        batch_size = cfg.train_batch_size_per_learner
        with self.metrics.log_time((TIMERS, REPLAY_BUFFER_SAMPLE_TIMER)):
            data, rows = self.local_replay_buffer.sample(num_updates * batch_size)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=len(rows)),
                minibatch_size=batch_size,
                num_epochs=1,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: env_steps,
                    NUM_AGENT_STEPS_SAMPLED_LIFETIME: env_steps,
                },
            )
        # 4. Priorities (prioritized replay only), then the new actor to the env runners.
        td = [
            np.concatenate([np.ravel(x) for x in convert_to_numpy(r[mid].pop(TD_ERROR_KEY).peek())])
            for r in learner_results
            for mid in list(r)
            if isinstance(r[mid], dict) and TD_ERROR_KEY in r[mid]
        ]
        if td and len(td[0]) == len(rows):
            self.local_replay_buffer.update_priorities(rows, td[0])
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            if not self._copy_actor_in_process():
                self.env_runner_group.sync_weights(
                    from_worker_or_learner_group=self.learner_group,
                    policies=[DEFAULT_MODULE_ID],
                    inference_only=True,
                )

    def _copy_actor_in_process(self) -> bool:
        """With no remote env runners and a local learner (``env_runners: 0``: both in this
        process), copies the learner's actor into the env runner's in place and returns True.
        ``sync_weights`` does the same through state dicts, numpy copies and an object-store
        put, about 2 ms each time on the zoo's networks."""
        runner = self.env_runner_group.local_env_runner
        if runner is None or self.env_runner_group.num_remote_workers():
            return False
        if not self.learner_group.is_local:
            return False
        learned = self.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped().actor
        acting = runner.module.unwrapped().actor
        with torch.no_grad():
            for mine, theirs in zip(acting.parameters(), learned.parameters(), strict=True):
                mine.copy_(theirs)
        return True


class TD3(DDPG):
    """TD3: ``DDPG`` with ``TD3Config``'s defaults."""

    @classmethod
    def get_default_config(cls) -> TD3Config:
        return TD3Config()


def register_with_tune() -> None:
    """Registers ``DDPG`` and ``TD3`` with Tune by name (idempotent).

    Tune keeps registrations in the connected cluster's key-value store: after
    ``ray.shutdown()`` and a new ``ray.init()`` in the same process they are gone, so code that
    starts a new cluster calls this again.
    """
    register_trainable("DDPG", DDPG)
    register_trainable("TD3", TD3)


register_with_tune()
