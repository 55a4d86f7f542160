"""The DDPG/TD3 update math: Polyak targets, the critic target, TD3's delay and smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from rl_helpers import learner_update, random_batch

from components.rl.learner import td_target


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def test_target_update_is_exactly_polyak_with_tau(make_learner):
    tau = 0.1
    learner = make_learner(tau=tau)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    # Make targets differ from the main nets first, so the check is not trivially equal.
    with torch.no_grad():
        for p in module.target_actor.parameters():
            p.add_(0.5)
        for p in module.target_critics.parameters():
            p.sub_(0.25)
    old_targets = params(module.target_actor) + params(module.target_critics)

    learner_update(learner, random_batch(64))

    new_main = params(module.actor) + params(module.critics)
    new_targets = params(module.target_actor) + params(module.target_critics)
    for old_t, main, new_t in zip(old_targets, new_main, new_targets, strict=True):
        torch.testing.assert_close(new_t, tau * main + (1 - tau) * old_t, rtol=0, atol=1e-6)


def test_critic_target_masks_terminations_but_not_truncations(make_learner):
    gamma = 0.9
    learner = make_learner(gamma=gamma)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    # Row 0 ends in a termination; row 1 is a time-limit truncation (terminated=0, real s').
    data = random_batch(2, terminated=[1.0, 0.0])
    batch = {k: torch.as_tensor(v) for k, v in data.items()}

    y = td_target(module, batch, gamma, target_noise=0.0, target_noise_clip=0.5)

    with torch.no_grad():
        next_obs = batch[Columns.NEXT_OBS]
        q_next = module.target_critics[0](next_obs, module.target_actor(next_obs))
    assert y[0].item() == pytest.approx(data[Columns.REWARDS][0], abs=1e-6)
    expected = data[Columns.REWARDS][1] + gamma * q_next[1].item()
    assert y[1].item() == pytest.approx(expected, abs=1e-5)
    assert q_next[1].abs().item() > 1e-4  # the bootstrap term is really there


def test_n_step_target_discounts_by_gamma_to_the_n(make_learner):
    learner = make_learner(gamma=0.9)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    data = random_batch(4)
    data["n_step"] = np.array([1, 2, 3, 3], np.float32)
    batch = {k: torch.as_tensor(v) for k, v in data.items()}
    y = td_target(module, batch, 0.9, 0.0, 0.5)
    with torch.no_grad():
        s2 = batch[Columns.NEXT_OBS]
        q = module.target_critics[0](s2, module.target_actor(s2)).numpy()
    np.testing.assert_allclose(
        y.numpy(), data[Columns.REWARDS] + 0.9 ** data["n_step"] * q, rtol=1e-5, atol=1e-6
    )


def test_td3_updates_actor_once_per_policy_delay_critic_updates(make_learner):
    learner = make_learner(twin_q=True, policy_delay=2, target_noise=0.2, tau=0.5)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    assert len(module.critics) == 2
    actor_changed, critic_changed, target_changed = [], [], []
    for step in range(6):
        actor, critic, target = (
            params(module.actor),
            params(module.critics),
            params(module.target_actor),
        )
        learner_update(learner, random_batch(32, seed=step))
        changed = lambda old, new: any(  # noqa: E731
            not torch.equal(a, b) for a, b in zip(old, new, strict=True)
        )
        actor_changed.append(changed(actor, params(module.actor)))
        critic_changed.append(changed(critic, params(module.critics)))
        target_changed.append(changed(target, params(module.target_actor)))
    assert critic_changed == [True] * 6
    assert actor_changed == [True, False, True, False, True, False]
    assert target_changed == actor_changed  # targets move with the actor (TD3)
    assert learner.num_critic_updates == 6


def test_policy_delay_counts_gradient_steps_inside_one_update_call(make_learner):
    learner = make_learner(policy_delay=3)
    results = learner_update(learner, random_batch(6 * 16), minibatch_size=16)
    assert learner.num_critic_updates == 6
    assert results[DEFAULT_MODULE_ID]["num_actor_updates"].peek() == 2


def test_td3_target_smoothing_noise_is_clipped(make_learner):
    learner = make_learner(twin_q=True)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    torch.manual_seed(0)
    next_obs = torch.rand(20_000, 3) * 2 - 1
    with torch.no_grad():
        clean = module.target_actor(next_obs)
        smooth = module.target_action(next_obs, noise=0.2, noise_clip=0.5)
        wide = module.target_action(next_obs, noise=10.0, noise_clip=0.3)
    # Within the box, noise ~ N(0, 0.2) clipped to +-0.5; huge noise is clipped to +-0.3.
    inside = (smooth > -1) & (smooth < 1)
    eps = (smooth - clean)[inside]
    assert eps.abs().max() <= 0.5 + 1e-6
    assert 0.17 < eps.std().item() < 0.21
    assert (wide - clean).abs().max() <= 0.3 + 1e-6
    assert ((wide - clean).abs() > 0.299).float().mean() > 0.5  # most hit the clip
    assert smooth.abs().max() <= 1.0
    # DDPG (noise 0) uses the target actor's action as is.
    assert torch.equal(module.target_action(next_obs, 0.0, 0.5), clean)


def test_twin_critic_target_is_the_minimum(make_learner):
    learner = make_learner(twin_q=True)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    obs, act = torch.rand(50, 3), torch.rand(50, 2)
    with torch.no_grad():
        q1, q2 = (c(obs, act) for c in module.target_critics)
        out = module.forward_target({Columns.OBS: obs, Columns.ACTIONS: act})["q_target"]
    torch.testing.assert_close(out, torch.minimum(q1, q2))


def test_actor_loss_moves_only_the_actor_and_critic_loss_only_the_critic(make_learner):
    learner = make_learner(critic_lr=0.0)  # a zero critic step: only the actor may change
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    critic, actor = params(module.critics), params(module.actor)
    learner_update(learner, random_batch(32))
    assert all(torch.equal(a, b) for a, b in zip(critic, params(module.critics), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(actor, params(module.actor), strict=True))
