"""The trained policy as a standalone artifact: load it and act with torch + gymnasium only.

``export_policy`` writes ``policy/actor.pt`` (the actor's state dict) and ``policy/policy.json``
(how to rebuild it and which env it acts in); ``load_policy`` rebuilds it without Ray or RLlib,
and ``rollout`` runs it (what ``raypipe rollout RUN STAGE`` calls).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.rl.module import build_actor

POLICY_DIR = "policy"


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
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes the actor and its description into ``out_dir/policy``; returns that folder."""
    folder = Path(out_dir) / POLICY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in actor_state.items()}, folder / "actor.pt")
    spec = {
        "obs_dim": int(obs_dim),
        "act_low": np.asarray(act_low, np.float64).tolist(),
        "act_high": np.asarray(act_high, np.float64).tolist(),
        "hiddens": list(hiddens),
        "env": env,
        "env_config": env_config,
        "env_entry_point": env_entry_point,
        **(extra or {}),
    }
    (folder / "policy.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    return folder


class Policy:
    """A deterministic DDPG actor that maps an env observation to an env action."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if (folder / POLICY_DIR / "policy.json").exists():
            folder = folder / POLICY_DIR
        self.spec = json.loads((folder / "policy.json").read_text())
        self.low = np.asarray(self.spec["act_low"], np.float32)
        self.high = np.asarray(self.spec["act_high"], np.float32)
        self.actor = build_actor(self.spec["obs_dim"], len(self.low), self.spec["hiddens"])
        self.actor.load_state_dict(torch.load(folder / "actor.pt", weights_only=True))
        self.actor.eval()

    def normalized_action(self, obs: np.ndarray) -> np.ndarray:
        """The actor's output in [-1, 1]."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(obs, np.float32))
            return self.actor(x).numpy()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """The env action: [-1, 1] rescaled to the env's bounds (as RLlib's connector does)."""
        a = self.normalized_action(obs)
        return np.clip(self.low + (a + 1.0) * 0.5 * (self.high - self.low), self.low, self.high)

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
    """Loads the exported policy of an ``rl.ddpg`` artifact (or of a ``policy`` folder)."""
    return Policy(Path(artifact_dir))


def rollout(
    artifact_dir: Path, episodes: int = 5, video: bool = False, out: Path | None = None, seed=0
) -> list[float]:
    """Runs the exported policy for some episodes and returns their returns.

    Args:
        artifact_dir: the ``rl.ddpg`` stage's artifact directory.
        episodes: episodes to run (seeded ``seed``, ``seed + 1``, ...).
        video: also record the first episode: a GIF where the env can render frames
            (``rgb_array``), otherwise a PNG plot of its observations, actions and rewards.
        out: where the GIF or PNG goes (default: ``rollout.gif`` / ``rollout.png`` in the
            current directory).
        seed: seed of the first episode's reset.
    """
    policy = load_policy(artifact_dir)
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
