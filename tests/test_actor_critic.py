"""Actor-critic / ORW-CFM-W2: every component against hand values, warm-up gating, W2, learning, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from rlflow.reward_models import Brightness  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.trainers.actor_critic import (  # noqa: E402
    ActorCriticConfig,
    ActorCriticTrainer,
    RewardNormalizer,
    ValueCritic,
    actor_loss,
    advantages,
    critic_loss,
    critic_weights,
    explained_variance,
    orw_weights,
    velocity_errors,
    w2_penalty,
)
from rlflow.trainers.flow_objectives import flow_matching_errors  # noqa: E402
from rlflow.trainers.online_weighted import OnlineBatch  # noqa: E402
from rlflow.utils.run import RunLogger  # noqa: E402
from tests.test_rwr import PROMPTS, TinyPrompts, rows_of, tiny_shapes_model, tiny_values  # noqa: E402


def tiny_ac(tmp_path: Path, lora_r: int = 0, **overrides) -> ActorCriticTrainer:
    values = tiny_values(tmp_path, critic_width=8, critic_minibatch_size=16)
    values.update(overrides)
    config = ActorCriticConfig(**values)
    config.model.lora_r = lora_r
    config.model.lora_alpha = float(max(lora_r, 1))
    return ActorCriticTrainer(config, model=tiny_shapes_model(), reward=Brightness(), prompts=TinyPrompts())


@pytest.fixture()
def no_plots(monkeypatch):
    """Metric plots (tested in test_run_logger) cost seconds per run on a loaded CPU; skip them here."""
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])


def hand_batch(seed: int = 3) -> OnlineBatch:
    g = torch.Generator().manual_seed(seed)
    return OnlineBatch(
        latents=torch.randn(6, 3, 8, 8, generator=g),
        prompts=[PROMPTS[i % 4] for i in range(6)],
        rewards=torch.tensor([0.1, 0.4, 0.3, 0.8, 0.2, 0.5]),
        group_ids=torch.arange(3).repeat_interleave(2),
        group_size=2,
    )


# ------------------------------------------------------------------------------------------------ components
def test_reward_normalizer_modes_hand_values():
    running = RewardNormalizer("running", momentum=0.5, eps=0.0)
    z = running(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(z, (torch.tensor([1.0, 2.0, 3.0]) - 2.0) / math.sqrt(2 / 3))
    # Second batch {5, 5} merged with weight 1/2: the mixture's mean 3.5 and variance
    # 0.5 (2/3 + 4) + 0.5 * 25 - 3.5^2 = 31/12.
    z = running(torch.tensor([5.0, 5.0]))
    assert running.mean == pytest.approx(3.5) and running.var == pytest.approx(31 / 12)
    torch.testing.assert_close(z, torch.full((2,), 1.5 / math.sqrt(31 / 12)))
    restored = RewardNormalizer("running")
    restored.load_state_dict(running.state_dict())
    assert restored.mean == running.mean and restored.var == running.var

    group = RewardNormalizer("group", eps=0.0)(torch.tensor([1.0, 3.0, 10.0, 20.0]), group_size=2)
    torch.testing.assert_close(group, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    batch = RewardNormalizer("batch", eps=0.0)(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(RewardNormalizer("none")(torch.tensor([0.3])), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="group_size"):
        RewardNormalizer("group")(torch.ones(3), group_size=2)
    with pytest.raises(ValueError, match="running, batch"):
        RewardNormalizer("ema")  # type: ignore[arg-type]


def test_advantage_clipping_weights_and_orw_formula():
    r = torch.tensor([1.0, -3.0, 0.5])
    v = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(advantages(r, v, clip=2.0), torch.tensor([1.0, -2.0, -0.5]))
    a = torch.tensor([1.0, -2.0, -0.5])
    e = torch.exp(a / 0.5)
    torch.testing.assert_close(critic_weights(a, 0.5), 3 * e / e.sum())
    torch.testing.assert_close(critic_weights(a, 0.5, clip=1.2), (3 * e / e.sum()).clamp(max=1.2))
    rewards = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(orw_weights(rewards, 0.5), torch.tensor([1.0, math.exp(0.5), math.e]))
    raw = torch.tensor([1.0, math.exp(0.5), math.e])
    torch.testing.assert_close(orw_weights(rewards, 0.5, normalize=True), raw / raw.mean())
    with pytest.raises(ValueError, match="clip"):
        advantages(r, v, clip=0.0)


def test_w2_actor_loss_and_explained_variance_hand_values():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(w2_penalty(v, ref), torch.tensor([2.5, 5.0]))
    loss = actor_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]), torch.tensor([2.5, 5.0]), alpha=0.1)
    torch.testing.assert_close(loss, torch.tensor((0.5 + 4.5) / 2 + 0.1 * 3.75))
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    # residual [0.5, -0.5, 0.5, -0.5]: variance 0.25 vs 1.25 -> 0.8
    assert explained_variance(target + torch.tensor([0.5, -0.5, 0.5, -0.5]), target) == pytest.approx(0.8)
    torch.testing.assert_close(
        critic_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])), torch.tensor(2.5)
    )


def test_critic_learns_a_known_value(one_thread):
    """Reward = mean of x1; on x_t = (1 - t) x0 + t x1 the critic recovers it near t = 1 (not at t = 0)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        level = torch.rand(n, generator=g) * 2 - 1
        x1 = level.view(n, 1, 1, 1) + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
        return x1, x1.flatten(1).mean(1)

    def states(x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = torch.randn(x1.shape, generator=g)
        return (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1

    critic = ValueCritic(3, 4, width=8)
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(200):
        x1, r = data(64)
        t = torch.rand(64, generator=g)
        loss = critic_loss(critic(states(x1, t), t, torch.zeros(64, 4)), r)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x1, r = data(512)
    with torch.no_grad():
        late = torch.full((512,), 0.95)
        early = torch.zeros(512)
        assert explained_variance(critic(states(x1, late), late, torch.zeros(512, 4)), r) > 0.8
        assert explained_variance(critic(states(x1, early), early, torch.zeros(512, 4)), r) < 0.2


def test_velocity_errors_match_the_shared_flow_matching_errors():
    model = tiny_shapes_model()
    g = torch.Generator().manual_seed(1)
    x1, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    cond = model.encode_prompts(PROMPTS[:3])
    with torch.no_grad():
        errors, velocity, x_t = velocity_errors(model, x1, cond, t, noise)
        torch.testing.assert_close(errors, flow_matching_errors(model, x1, cond, t, noise))
        torch.testing.assert_close(velocity, model.velocity(x_t, t, cond))


# ------------------------------------------------------------------------------------------------ trainer
def test_warmup_trains_only_the_critic(tmp_path):
    trainer = tiny_ac(tmp_path, critic_warmup_iterations=1)
    actor = [p.detach().clone() for p in trainer.trainable]
    critic = [p.detach().clone() for p in trainer.critic.parameters()]
    metrics = trainer.update(trainer.collect())
    assert metrics["train/actor_active"] == 0.0 and "critic/loss" in metrics
    assert all(torch.equal(a, b) for a, b in zip(actor, trainer.trainable, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(critic, trainer.critic.parameters(), strict=True))
    trainer.iteration = 1  # warm-up over: the critic's advantages drive the actor
    metrics = trainer.update(trainer.collect())
    assert metrics["train/actor_active"] == 1.0 and "train/advantage_std" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(actor, trainer.trainable, strict=True))


def test_warmup_with_reward_weights_trains_the_actor(tmp_path):
    trainer = tiny_ac(tmp_path, critic_warmup_iterations=1, warmup_actor="reward", temperature=0.5)
    actor = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.update(trainer.collect())
    assert metrics["train/actor_active"] == 1.0 and "train/advantage_std" not in metrics
    assert metrics["train/weight_mean"] == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(actor, trainer.trainable, strict=True))


def test_actor_loss_in_the_trainer_equals_the_hand_formula(tmp_path):
    """Critic mode: w = 6 softmax(clip(r_norm - V) / tau) ... and the W2 term against the frozen copy."""
    trainer = tiny_ac(tmp_path, critic_warmup_iterations=0, temperature=0.7, advantage_clip=0.5, w2_alpha=0.3)
    batch = hand_batch()
    trainer.prepare(batch)
    with torch.no_grad():  # move the policy away from its reference so W2 is not zero
        for p in trainer.trainable:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows, t = torch.tensor([4, 1, 3]), torch.tensor([0.2, 0.5, 0.9])
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    loss, metrics = trainer.loss(batch, rows, t, noise)
    z = (batch.rewards - batch.rewards.mean()) / (batch.rewards.std(unbiased=False) + 1e-6)  # first batch
    prompts = [batch.prompts[i] for i in rows.tolist()]
    cond = trainer.model.encode_prompts(prompts)
    x1, tt = batch.latents[rows], t.view(3, 1, 1, 1)
    x_t = (1 - tt) * noise + tt * x1
    with torch.no_grad():
        v = trainer.model.velocity(x_t, t, cond)
        with trainer.model.reference():
            v_ref = trainer.model.velocity(x_t, t, cond)
        values = trainer.critic(x_t, t, cond.pooled)
    errors = ((x1 - noise) - v).square().flatten(1).mean(1)
    a = (z[rows] - values).clamp(-0.5, 0.5)
    w = torch.softmax(a / 0.7, 0) * 3
    w2 = (v - v_ref).square().flatten(1).mean(1)
    assert float(w2.mean()) > 0
    torch.testing.assert_close(loss.detach(), (w * errors).mean() + 0.3 * w2.mean(), rtol=1e-5, atol=1e-6)
    assert float(metrics["train/w2"]) == pytest.approx(float(w2.mean()), rel=1e-5)


def test_orw_special_case_and_w2_zero_with_lora_at_init(tmp_path):
    """use_critic false: L = mean(exp(tau r) e) + alpha mean(W2); with fresh LoRA adapters W2 is exactly 0."""
    trainer = tiny_ac(tmp_path, lora_r=2, use_critic=False, orw_tau=0.5, w2_alpha=1.0)
    assert trainer.critic is None and trainer.actor_active()
    batch = hand_batch()
    trainer.prepare(batch)
    rows, t = torch.tensor([0, 5]), torch.tensor([0.3, 0.7])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    loss, metrics = trainer.loss(batch, rows, t, noise)
    assert float(metrics["train/w2"]) == 0.0
    with torch.no_grad():
        errors = flow_matching_errors(
            trainer.model,
            batch.latents[rows],
            trainer.model.encode_prompts([batch.prompts[0], batch.prompts[5]]),
            t,
            noise,
        )
    expected = (torch.exp(0.5 * batch.rewards[rows]) * errors).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("use_critic", [True, False])
def test_actor_critic_and_orw_raise_brightness(tmp_path, no_plots, use_critic):
    overrides = dict(
        iterations=16,
        samples_per_prompt=8,
        minibatch_size=16,
        critic_warmup_iterations=3,
        temperature=0.5,
        w2_alpha=0.05,
        eval_steps=16,
        save_steps=16,
        seed=0,
        use_critic=use_critic,
    )
    if not use_critic:  # brightness spans ~0.1, so ORW's exp(tau r) needs a large tau to discriminate
        overrides.update(orw_tau=50.0, orw_normalize_weights=True)
    trainer = tiny_ac(tmp_path, **overrides)
    summary = trainer.train()
    rows = rows_of(Path(trainer.config.output_dir))[1:]
    rollout = [r["rollout/reward_mean"] for r in rows]
    assert sum(rollout[-3:]) / 3 > sum(rollout[:3]) / 3 + 0.005, rollout
    assert summary["final_reward_mean"] > summary["base_reward_mean"], summary
    if use_critic:
        assert all(r["train/actor_active"] == 0.0 for r in rows[:3]) and rows[3]["train/actor_active"] == 1.0
        assert "critic/explained_variance" in rows[-1] and Path(summary["critic_path"]).is_file()


def test_checkpoint_restores_critic_and_normalizer(tmp_path):
    trainer = tiny_ac(tmp_path, critic_warmup_iterations=0)
    trainer.update(trainer.collect())
    trainer.iteration = 1
    path = trainer.save_checkpoint()
    fresh = tiny_ac(tmp_path, critic_warmup_iterations=0)
    fresh.resume(path)
    assert fresh.iteration == 1 and fresh.normalizer.state_dict() == trainer.normalizer.state_dict()
    for a, b in zip(trainer.critic.parameters(), fresh.critic.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(trainer.trainable, fresh.trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    orw = tiny_ac(tmp_path, use_critic=False)
    with pytest.raises(ConfigError, match="different trainable|critic"):
        tiny_ac(tmp_path / "other", critic_warmup_iterations=0).resume(orw.save_checkpoint())


def test_actor_critic_config_errors():
    with pytest.raises(ConfigError, match="advantage_clip"):
        ActorCriticConfig(advantage_clip=0.0)
    with pytest.raises(ConfigError, match="w2_alpha"):
        ActorCriticConfig(w2_alpha=-1.0)
    with pytest.raises(ConfigError, match="critic_warmup_iterations"):
        ActorCriticConfig(critic_warmup_iterations=-1)
    with pytest.raises(ConfigError, match="weight_clip"):
        ActorCriticConfig(weight_clip=0.9)
    with pytest.raises(ConfigError, match="never train"):
        ActorCriticConfig(iterations=3, critic_warmup_iterations=3)
    ActorCriticConfig(iterations=3, critic_warmup_iterations=3, use_critic=False)  # ORW has no warm-up
