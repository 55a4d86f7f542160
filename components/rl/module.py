"""The DDPG/TD3 networks as an RLlib RLModule: a tanh actor, one or two Q critics, targets.

Everything here works in the *normalized* action space [-1, 1]: the actor ends in tanh, the
critics see normalized actions, and RLlib's ``NormalizeAndClipActions`` connector rescales an
action to the env's bounds only on its way to the env (the episode, hence the replay, keeps the
normalized one).

On env runners the module is built with ``inference_only=True`` and holds only the actor; the
learner's copy also has the critics and the target networks (made by the learner's ``build``).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

#: Key of a critic batch's target-network output (``forward_target``).
Q_TARGET = "q_target"


def mlp(sizes: list[int], out_activation: nn.Module | None = None) -> nn.Sequential:
    """Returns a ReLU multilayer perceptron with the given layer sizes."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


def build_actor(obs_dim: int, act_dim: int, hiddens: list[int]) -> nn.Sequential:
    """The deterministic policy: observation -> action in [-1, 1]."""
    return mlp([obs_dim, *hiddens, act_dim], nn.Tanh())


class Critic(nn.Module):
    """Q(s, a) for a normalized action ``a``."""

    def __init__(self, obs_dim: int, act_dim: int, hiddens: list[int]):
        super().__init__()
        self.net = mlp([obs_dim + act_dim, *hiddens, 1])

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class DDPGTorchRLModule(TorchRLModule, InferenceOnlyAPI, TargetNetworkAPI):
    """Actor, critic(s) and their target copies.

    ``model_config`` keys (filled in by ``DDPGConfig``): ``actor_hiddens``, ``critic_hiddens``,
    ``twin_q``, ``exploration_noise`` (``gaussian``, ``ou`` or ``none``), ``noise_sigma``,
    ``random_steps`` (uniform-random warm-up, in lifetime env steps).
    """

    framework = "torch"

    def setup(self) -> None:
        cfg = self.model_config
        obs_dim = int(self.observation_space.shape[0])
        act_dim = int(self.action_space.shape[0])
        self.actor = build_actor(obs_dim, act_dim, list(cfg["actor_hiddens"]))
        if not self.inference_only:
            n_critics = 2 if cfg["twin_q"] else 1
            self.critics = nn.ModuleList(
                Critic(obs_dim, act_dim, list(cfg["critic_hiddens"])) for _ in range(n_critics)
            )

    # -- acting -------------------------------------------------------------------------------

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        # The deterministic policy: evaluation and the exported policy act like this.
        return {Columns.ACTIONS: self.actor(batch[Columns.OBS])}

    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        cfg = self.model_config
        with torch.no_grad():
            action = self.actor(batch[Columns.OBS])
            if t < cfg["random_steps"]:
                # Warm-up: uniform in the normalized box (what the replay stores).
                action = torch.rand_like(action) * 2.0 - 1.0
            elif cfg["exploration_noise"] == "gaussian":
                noise = torch.randn_like(action) * cfg["noise_sigma"]
                action = (action + noise).clamp(-1.0, 1.0)
            # "ou" noise has per-episode state: the OrnsteinUhlenbeckNoise connector adds it.
        return {Columns.ACTIONS: action}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        # The learner computes the losses from the networks directly (see learner.py).
        return {}

    # -- pieces the learner uses ----------------------------------------------------------------

    def q_values(self, obs: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
        """Q_i(s, a) of every critic."""
        return [critic(obs, action) for critic in self.critics]

    def q_frozen(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q_1(s, a) with the critic's parameters frozen, for the actor loss.

        Gradients flow through ``action`` to the actor but never into the critic, so the actor
        loss cannot move the critic (SAC's module does the same).
        """
        params = list(self.critics[0].parameters())
        for p in params:
            p.requires_grad_(False)
        try:
            return self.critics[0](obs, action)
        finally:
            for p in params:
                p.requires_grad_(True)

    def target_action(self, next_obs: torch.Tensor, noise: float, noise_clip: float):
        """mu'(s') from the target actor, with TD3's clipped smoothing noise when noise > 0."""
        action = self.target_actor(next_obs)
        if noise > 0:
            eps = (torch.randn_like(action) * noise).clamp(-noise_clip, noise_clip)
            action = (action + eps).clamp(-1.0, 1.0)
        return action

    # -- RLlib APIs -------------------------------------------------------------------------------

    def make_target_networks(self) -> None:
        self.target_actor = make_target_network(self.actor)
        self.target_critics = make_target_network(self.critics)

    def get_target_network_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.actor, self.target_actor), (self.critics, self.target_critics)]

    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        """min_i Q'_i(s, a) of the target critics (the clipped double-Q of TD3 when twin)."""
        qs = [c(batch[Columns.OBS], batch[Columns.ACTIONS]) for c in self.target_critics]
        return {Q_TARGET: torch.min(torch.stack(qs), dim=0).values}

    def get_non_inference_attributes(self) -> list[str]:
        return ["critics", "target_actor", "target_critics"]
