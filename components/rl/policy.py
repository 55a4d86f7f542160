"""The trained policy as a standalone model bundle: load it and act with torch + gymnasium only.

``export_policy`` writes the actor as a model bundle (``components/bundle.py``: ``bundle.json``
says how to rebuild it and which env it acts in, ``weights.pt`` holds the actor's state dict);
``load`` (the bundle's loader) rebuilds it without Ray or RLlib; ``rollout`` runs it (what
``raypipe rollout RUN STAGE`` calls) and ``score_policy`` scores it over deterministic episodes
(what the stage reports and a gate decides on).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.bundle import Bundle, read_bundle, save_bundle
from components.rl.module import build_actor


def export_policy(
    out_dir: Path,
    actor_state: dict[str, torch.Tensor],
    *,
    obs_dim: int,
    act_low: np.ndarray,
    act_high: np.ndarray,
    hiddens: list[int],
    env: str,
    env_config: dict[str, Any],
    env_entry_point: str | None,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes the actor as a ``model/ddpg`` bundle into ``out_dir``; returns ``out_dir``.

    Args:
        config: the resolved settings it was trained with.
        extra: more facts kept with the policy (algorithm, seed, env steps trained).
    """
    low = np.asarray(act_low, np.float64).tolist()
    high = np.asarray(act_high, np.float64).tolist()
    meta = {
        "obs_dim": int(obs_dim),
        "act_low": low,
        "act_high": high,
        "hiddens": list(hiddens),
        "env": env,
        "env_config": env_config,
        "env_entry_point": env_entry_point,
        **(extra or {}),
    }
    bundle = Bundle(
        component="rl.ddpg",
        kind="model/ddpg",
        loader="components.rl.policy:load",
        input={"type": "vector", "shape": [int(obs_dim)], "dtype": "float32"},
        output={"type": "action", "shape": [len(low)], "low": low, "high": high},
        hparams={"obs_dim": int(obs_dim), "act_dim": len(low), "hiddens": list(hiddens)},
        config=config,
        meta=meta,
    )
    return save_bundle(out_dir, bundle, {"actor": actor_state})


def load(bundle: Bundle) -> Policy:
    """The loader a ``model/ddpg`` bundle names."""
    return Policy(bundle)


class Policy:
    """A deterministic DDPG actor that maps an env observation to an env action.

    Attributes:
        module: the actor (tanh outputs in [-1, 1]).
        bundle: its bundle.
        spec: what it was trained on (``env``, ``env_config``, ``act_low``...; ``bundle.meta``).
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        weights = bundle.weights()["actor"]  # read first: a bad file fails before anything
        self.spec = bundle.meta
        self.low = np.asarray(self.spec["act_low"], np.float32)
        self.high = np.asarray(self.spec["act_high"], np.float32)
        self.module = build_actor(self.spec["obs_dim"], len(self.low), self.spec["hiddens"])
        self.module.load_state_dict(weights)
        self.module.eval()

    def normalized_action(self, obs: np.ndarray) -> np.ndarray:
        """The actor's output in [-1, 1]."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(obs, np.float32))
            return self.module(x).numpy()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """The env action: [-1, 1] rescaled to the env's bounds (as RLlib's connector does)."""
        a = self.normalized_action(obs)
        return np.clip(self.low + (a + 1.0) * 0.5 * (self.high - self.low), self.low, self.high)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The env action for an observation (or a batch of them)."""
        return self(obs)

    def rollout(
        self, episodes: int = 5, video: bool = False, out: Path | None = None, seed: int = 0
    ) -> list[float]:
        """Runs the policy for some episodes (``raypipe rollout``); see :func:`run_episodes`."""
        return run_episodes(self, episodes, video, out, seed)

    def make_env(self, render_mode: str | None = None):
        """Makes the env the policy was trained in."""
        return make_env(
            self.spec["env"], self.spec["env_config"], self.spec["env_entry_point"], render_mode
        )


def load_callable(entry_point: str):
    """Imports ``package.module:attribute``."""
    module, _, attr = entry_point.partition(":")
    return getattr(importlib.import_module(module), attr)


def make_env(
    env: str, env_config: dict[str, Any], entry_point: str | None, render_mode: str | None = None
):
    """A gymnasium env by id, or a custom one built by ``entry_point(env_config)``."""
    import gymnasium as gym

    if entry_point:
        config = dict(env_config)
        if render_mode:
            config["render_mode"] = render_mode
        return load_callable(entry_point)(config)
    kwargs = dict(env_config)
    if render_mode:
        kwargs["render_mode"] = render_mode
    return gym.make(env, **kwargs)


def load_policy(artifact_dir: Path) -> Policy:
    """Loads the exported policy of an ``rl.ddpg`` artifact."""
    return Policy(read_bundle(artifact_dir))


def score_policy(policy: Policy, episodes: int, seed: int) -> dict[str, Any]:
    """Returns of a policy over ``episodes`` deterministic episodes (env seeds ``seed``,
    ``seed + 1``, ...): the ``test/*`` metrics of a trained agent."""
    returns = run_episodes(policy, episodes=episodes, seed=seed)
    return {
        "test/episode_return_mean": float(np.mean(returns)),
        "test/episode_return_std": float(np.std(returns)),
        "test/episode_return_min": float(np.min(returns)),
        "test/episodes": episodes,
        "test/episode_returns": [float(r) for r in returns],
    }


def rollout(
    artifact_dir: Path, episodes: int = 5, video: bool = False, out: Path | None = None, seed=0
) -> list[float]:
    """Runs the exported policy of an ``rl.ddpg`` artifact; see :func:`run_episodes`."""
    return run_episodes(load_policy(artifact_dir), episodes, video, out, seed)


def run_episodes(
    policy: Policy, episodes: int = 5, video: bool = False, out: Path | None = None, seed=0
) -> list[float]:
    """Runs a policy for some episodes and returns their returns.

    Args:
        policy: the policy.
        episodes: episodes to run (seeded ``seed``, ``seed + 1``, ...).
        video: also record the first episode: a GIF where the env can render frames
            (``rgb_array``), otherwise a PNG plot of its observations, actions and rewards.
        out: where the GIF or PNG goes (default: ``rollout.gif`` / ``rollout.png`` in the
            current directory).
        seed: seed of the first episode's reset.
    """
    frames: list[np.ndarray] = []
    env = None
    if video:
        try:
            env = policy.make_env(render_mode="rgb_array")
            env.reset(seed=seed)
            frames.append(env.render())
        except Exception:  # no renderer (e.g. pygame missing): fall back to a plot
            env, frames = None, []
    env = env or policy.make_env()
    returns, trace = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            action = policy(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            if i == 0 and video:
                trace.append((np.ravel(obs), np.ravel(action), float(reward)))
                if frames:
                    frames.append(env.render())
            obs, total, done = next_obs, total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    if video:
        if frames:
            _write_gif(frames, Path(out or "rollout.gif"))
        else:
            _write_plot(trace, Path(out or "rollout.png"), title=policy.spec["env"])
    return returns


def _write_gif(frames: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=33, loop=0)


def _write_plot(trace, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obs = np.stack([t[0] for t in trace])
    act = np.stack([t[1] for t in trace])
    rew = np.array([t[2] for t in trace])
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(obs)
    axes[0].set_ylabel("observation")
    axes[1].plot(act)
    axes[1].set_ylabel("action")
    axes[2].plot(np.cumsum(rew))
    axes[2].set_ylabel("return so far")
    axes[2].set_xlabel("step")
    fig.suptitle(f"{title}: first rollout episode (no renderer available)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
