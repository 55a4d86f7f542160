"""The DDPG/TD3 update, as an RLlib TorchLearner.

One call of ``_uncompiled_update`` is one gradient step on one minibatch (the math is in
``compute_loss_for_module``, top to bottom):

    y      = r + gamma^n * (1 - terminated) * min_i Q'_i(s', clip(mu'(s') + clip(eps, -c, c)))
    L_Q    = sum_i mean(w * (Q_i(s, a) - y)^2)          w: importance weights (1 if uniform)
    L_mu   = -mean(Q_1(s, mu(s)))                      only every `policy_delay`-th step
    theta' <- tau * theta + (1 - tau) * theta'          after each actor step (every step in DDPG)

Terminations mask the bootstrap; truncations (time limits) do not: a truncated transition keeps
its real next observation and is bootstrapped. ``eps ~ N(0, target_noise)`` is TD3's target
smoothing (off in DDPG).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.connectors.common.add_observations_from_episodes_to_batch import (
    AddObservationsFromEpisodesToBatch,
)
from ray.rllib.connectors.learner.add_next_observations_from_episodes_to_train_batch import (
    AddNextObservationsFromEpisodesToTrainBatch,
)
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.apis import TargetNetworkAPI
from ray.rllib.utils.metrics import TD_ERROR_KEY

from components.rl.module import Q_TARGET

ACTOR_LOSS = "actor_loss"
CRITIC_LOSS = "critic_loss"
Q_MEAN = "q_mean"
ACTOR_UPDATES = "num_actor_updates"


def td_target(
    module, batch: dict[str, Any], gamma: float, target_noise: float, target_noise_clip: float
) -> torch.Tensor:
    """y = r + gamma^n (1 - terminated) min_i Q'_i(s', mu'(s') + clipped noise), without grad.

    Terminations mask the bootstrap; a truncated transition (time limit) has
    ``terminated = 0`` and its real next observation, so it is bootstrapped.
    """
    rewards = batch[Columns.REWARDS].float()
    terminated = batch[Columns.TERMINATEDS].float()
    n_step = batch["n_step"] if "n_step" in batch else torch.ones_like(rewards)
    with torch.no_grad():
        next_obs = batch[Columns.NEXT_OBS]
        next_action = module.target_action(next_obs, target_noise, target_noise_clip)
        q_next = module.forward_target({Columns.OBS: next_obs, Columns.ACTIONS: next_action})
        return rewards + (gamma**n_step) * (1.0 - terminated) * q_next[Q_TARGET]


@torch.no_grad()
def polyak_update(main_net: torch.nn.Module, target_net: torch.nn.Module, tau: float) -> None:
    """target <- tau * main + (1 - tau) * target, in place, as one fused ``lerp`` over all
    parameters (half the time of a per-tensor loop on the zoo's networks).

    The same rule as RLlib's ``update_target_network``, which rebuilds and reloads a whole
    state dict each call (a measurable share of a small network's update).
    """
    targets, mains = list(target_net.parameters()), list(main_net.parameters())
    if len(targets) != len(mains):
        raise ValueError(f"{len(mains)} main parameters against {len(targets)} target ones")
    torch._foreach_lerp_(targets, mains, tau)


class DDPGTorchLearner(TorchLearner):
    """Critic every step, actor (and Polyak targets) every ``policy_delay`` steps."""

    def build(self) -> None:
        super().build()
        # Gradient steps taken so far; decides which steps also update the actor.
        self.num_critic_updates = 0
        self._update_actor = True
        self.module.foreach_module(
            lambda mid, mod: (
                mod.make_target_networks() if isinstance(mod, TargetNetworkAPI) else None
            )
        )
        # Only used on RLlib's episode-replay path (the flat replay hands a ready batch).
        if self._learner_connector is not None:
            self._learner_connector.insert_after(
                AddObservationsFromEpisodesToBatch, AddNextObservationsFromEpisodesToTrainBatch()
            )

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        module = self._module[module_id]
        for name, net, lr in (
            ("actor", module.actor, config.actor_lr),
            ("critic", module.critics, config.critic_lr),
        ):
            params = self.get_parameters(net)
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params, fused=True),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def compute_loss_for_module(
        self, *, module_id, config, batch: dict[str, Any], fwd_out: dict[str, Any]
    ) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        obs, actions = batch[Columns.OBS], batch[Columns.ACTIONS]
        rewards = batch[Columns.REWARDS].float()

        y = td_target(module, batch, config.gamma, config.target_noise, config.target_noise_clip)
        weights = batch["weights"].float() if "weights" in batch else torch.ones_like(rewards)
        q_values = module.q_values(obs, actions)
        critic_loss = sum(torch.mean(weights * (q - y) ** 2) for q in q_values)
        td_error = (q_values[0] - y).detach()
        loss = critic_loss

        if self._update_actor:
            actor_loss = -module.q_frozen(obs, module.actor(obs)).mean()
            loss = loss + actor_loss
            self.metrics.log_value((module_id, ACTOR_LOSS), actor_loss.detach(), window=1)

        self.metrics.log_value((module_id, CRITIC_LOSS), critic_loss.detach(), window=1)
        self.metrics.log_value((module_id, Q_MEAN), q_values[0].detach().mean(), window=1)
        if "weights" in batch:
            # Only prioritized replay needs these, and they are large.
            self.metrics.log_value((module_id, TD_ERROR_KEY), td_error, reduce="item_series")
        return loss

    def compute_gradients(self, loss_per_module, **kwargs):
        # On critic-only steps the actor has no gradient (None): drop it, so the actor's
        # optimizer leaves it alone (a zero gradient would still move it through Adam's momentum).
        grads = super().compute_gradients(loss_per_module, **kwargs)
        return {pid: g for pid, g in grads.items() if g is not None}

    def apply_gradients(self, gradients_dict) -> None:
        if self._lr_scheduler_classes is not None or self.config.torch_skip_nan_gradients:
            return super().apply_gradients(gradients_dict)
        # RLlib's version turns `isfinite(grad).all()` into a Python bool once per parameter
        # tensor on every step; one check over all gradient norms does the same job.
        grads = list(gradients_dict.values())
        if grads and not torch.isfinite(torch.stack([g.norm() for g in grads])).all():
            gradients_dict = {pid: torch.nan_to_num(g) for pid, g in gradients_dict.items()}
        for pid, grad in gradients_dict.items():
            self._params[pid].grad = grad
        for module_id, optimizer_names in self._module_optimizers.items():
            for name in optimizer_names:
                self.get_optimizer(module_id, name).step()

    def _uncompiled_update(self, batch: dict, **kwargs):
        # One gradient step. The policy delay is counted here, per step, so it holds however
        # many minibatches one `update()` call carries.
        self._update_actor = self.num_critic_updates % int(self.config.policy_delay) == 0
        out = super()._uncompiled_update(batch, **kwargs)
        self.num_critic_updates += 1
        if self._update_actor:
            for mid, module in self.module._rl_modules.items():
                tau = self.config.get_config_for_module(mid).tau
                for main_net, target_net in module.unwrapped().get_target_network_pairs():
                    polyak_update(main_net, target_net, tau)
                self.metrics.log_value((mid, ACTOR_UPDATES), 1, reduce="lifetime_sum")
        return out

    @classmethod
    def rl_module_required_apis(cls) -> list[type]:
        return [TargetNetworkAPI]
