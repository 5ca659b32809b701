"""DiffusionNFT: formulas against hand values and closed forms, the old policy, learning, exact resume, the
no-learning-signal stop and config validation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from rlflow.reward_models import Brightness  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.flows.time import time_grid  # noqa: E402
from rlflow.rollout.advantages import LearningSignalMonitor, flat_group_fraction  # noqa: E402
from rlflow.testing import tiny_shapes_config  # noqa: E402
from rlflow.trainers import nft as nft_module  # noqa: E402
from rlflow.trainers.nft import (  # noqa: E402
    NFTConfig,
    NFTTrainer,
    implicit_velocities,
    nft_loss,
    old_policy_decay,
    optimality_probabilities,
    soft_update_,
)
from rlflow.trainers.online_weighted import OnlineBatch  # noqa: E402
from rlflow.trainers.rwr import RWRConfig, RWRTrainer  # noqa: E402
from rlflow.worlds.shapes.model import build_shapes_model  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white circle"]


class TinyPrompts:
    """Four valid shapes-world prompts (the tiny model's tokenizer knows the words)."""

    def sample(self, num: int, generator: torch.Generator) -> list[str]:
        index = torch.randint(len(PROMPTS), (num,), generator=generator)
        return [PROMPTS[i] for i in index.tolist()]

    def eval_prompts(self) -> list[str]:
        return list(PROMPTS)


def constant_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    return torch.full((len(images),), 0.25)


def darkness(images: torch.Tensor, prompts) -> torch.Tensor:
    return -Brightness()(images, prompts)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_shapes_model(tiny_shapes_config(image_size=8, patch_size=4))


def tiny_values(tmp_path: Path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "run"),
        resume=True,
        report_to="none",
        num_threads=1,
        iterations=2,
        prompts_per_iteration=4,
        samples_per_prompt=8,
        num_steps=4,
        eval_num_steps=4,
        num_eval_prompts=4,
        eval_steps=100,
        save_steps=1,
        minibatch_size=16,
        learning_rate=3e-3,
        gradient_steps_per_iteration=2,
    )
    values.update(overrides)
    return values


def tiny_nft(tmp_path: Path, lora_r: int = 0, reward=None, **overrides) -> NFTTrainer:
    config = NFTConfig(**tiny_values(tmp_path, **overrides))
    config.model.lora_r = lora_r
    config.model.lora_alpha = float(max(lora_r, 1))
    return NFTTrainer(config, model=tiny_model(), reward=reward or Brightness(), prompts=TinyPrompts())


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def hand_batch(generator: torch.Generator) -> OnlineBatch:
    return OnlineBatch(
        latents=torch.randn(4, 3, 8, 8, generator=generator),
        prompts=PROMPTS,
        rewards=torch.tensor([0.1, 0.4, 0.3, 0.8]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        group_size=2,
    )


# ------------------------------------------------------------------------------------------------ formulas
def test_optimality_probabilities_hand_values():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0])  # two groups of two; group means 0.5 and 2.5
    global_std = math.sqrt(1.25)  # population std of the batch
    a = 0.5 / (global_std + 1e-4)
    expected = torch.tensor([0.5 - a / 10, 0.5 + a / 10, 0.5 - a / 10, 0.5 + a / 10])
    torch.testing.assert_close(optimality_probabilities(rewards, 2, std_mode="global", clip=5.0), expected)
    # Group std 0.5: A = +-0.5 / 0.5001, p = 1/2 +- A / 10.
    a = 0.5 / 0.5001
    grouped = optimality_probabilities(rewards, 2, std_mode="group", clip=5.0)
    torch.testing.assert_close(grouped, torch.tensor([0.5 - a / 10, 0.5 + a / 10] * 2))
    # The brief's form 1/2 + 1/2 clip((r - mean) / (c std), -1, 1), here saturated by a small clip.
    torch.testing.assert_close(
        optimality_probabilities(rewards, 2, std_mode="group", clip=0.5), torch.tensor([0.0, 1.0, 0.0, 1.0])
    )
    # A flat group gets 1/2; the other group is unaffected by the flat one's mean.
    mixed = optimality_probabilities(torch.tensor([0.3, 0.3, 0.0, 1.0]), 2, std_mode="group")
    assert mixed[:2].tolist() == [0.5, 0.5] and mixed[2] < 0.5 < mixed[3]
    with pytest.raises(ValueError, match="group_size"):
        optimality_probabilities(rewards, 3)


def test_nft_loss_hand_values():
    v_theta, v_old, target = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    # beta 0.5: v+ = 0.5, v- = -0.5; E+ = 2.25, E- = 6.25; L = (0.75 * 2.25 + 0.25 * 6.25) / 0.5 = 6.5.
    terms = nft_loss(v_theta, v_old, target, torch.tensor([0.75]), 0.5)
    torch.testing.assert_close(terms.positive, torch.tensor([2.25]))
    torch.testing.assert_close(terms.negative, torch.tensor([6.25]))
    torch.testing.assert_close(terms.loss, torch.tensor([6.5]))
    # beta 1: L = p ||v_theta - v||^2 + (1 - p) ||2 v_old - v_theta - v||^2, per-element mean.
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, target = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    p = torch.tensor([0.0, 0.3, 1.0])
    expected = p * (v_theta - target).square().flatten(1).mean(1) + (1 - p) * (
        2 * v_old - v_theta - target
    ).square().flatten(1).mean(1)
    torch.testing.assert_close(nft_loss(v_theta, v_old, target, p, 1.0).loss, expected)


def test_adaptive_weighting_hand_values_and_detached_scale():
    target = torch.zeros(1, 2)
    t = torch.tensor([0.5])
    # beta 1, p 1: v+ = v_theta = [2, 6]; e = (1 - t)(v+ - target) = [1, 3]; E = mean(e^2) / mean|e| = 5 / 2.
    v_theta = torch.tensor([[2.0, 6.0]], requires_grad=True)
    terms = nft_loss(v_theta, v_theta.detach(), target, torch.ones(1), 1.0, t=t, weighting="adaptive")
    torch.testing.assert_close(terms.positive, torch.tensor([2.5]))
    terms.loss.sum().backward()
    # The scale is a constant: dE/dv = 2 e (1 - t) / (n * scale) = 2 * [1, 3] * 0.5 / (2 * 2).
    torch.testing.assert_close(v_theta.grad, torch.tensor([[0.25, 0.75]]))
    # At t = 1 the data prediction is exact: the clamped scale keeps the loss finite (zero).
    zero = nft_loss(
        v_theta.detach(), v_theta.detach(), target, torch.ones(1), 1.0, t=torch.ones(1), weighting="adaptive"
    )
    assert zero.loss.item() == 0.0
    with pytest.raises(ValueError, match="times"):
        nft_loss(v_theta, v_theta, target, torch.ones(1), 1.0, weighting="adaptive")
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_theta, v_theta, target, torch.ones(1), 0.0)


def test_implicit_policies_equal_v_old_when_v_theta_does():
    v = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for beta in (0.1, 1.0, 2.0):
        positive, negative = implicit_velocities(v, v, beta)
        torch.testing.assert_close(positive, v, rtol=0, atol=1e-6)
        torch.testing.assert_close(negative, v, rtol=0, atol=1e-6)


def test_gradient_descent_reaches_the_closed_form_minimiser():
    """For fixed v_old the per-sample quadratic is minimised at v_old + (2 / beta)(p - 1/2)(v - v_old)."""
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0, 0.7])
    beta = torch.tensor([1.0, 1.0, 0.5, 0.1, 2.0, 0.3])
    v_old = torch.tensor([0.3, -1.0, 0.5, 0.2, 1.0, -0.4])
    target = torch.tensor([1.0, 0.5, -2.0, 0.4, -1.0, 0.6])
    v_theta = v_old.clone().requires_grad_(True)
    for _ in range(200):  # each sample's curvature is 2 beta: step 1 / (4 beta) contracts the error by 1/2
        loss = sum(
            nft_loss(
                v_theta[i : i + 1, None],
                v_old[i : i + 1, None],
                target[i : i + 1, None],
                p[i : i + 1],
                float(b),
            ).loss
            for i, b in enumerate(beta)
        )
        (grad,) = torch.autograd.grad(loss.sum(), v_theta)
        with torch.no_grad():
            v_theta -= grad / (4 * beta)
    expected = v_old + (2 / beta) * (p - 0.5) * (target - v_old)
    torch.testing.assert_close(v_theta.detach(), expected, rtol=0, atol=1e-5)


def test_old_policy_decay_schedule_and_soft_update():
    # NVlabs decay_type 1 (ramp 0.001, max 0.5) and 2 (start 75, ramp 0.0075, max 0.999).
    assert [old_policy_decay(s, ramp=0.001, maximum=0.5) for s in (0, 1, 250, 500, 10_000)] == [
        0.0,
        0.001,
        0.25,
        0.5,
        0.5,
    ]
    type2 = [old_policy_decay(s, ramp=0.0075, maximum=0.999, start=75) for s in (10, 75, 76, 175, 1000)]
    assert type2 == pytest.approx([0.0, 0.0, 0.0075, 0.75, 0.999])
    old, new = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -1.0])]
    soft_update_(old, new, 0.25)  # 0.25 * old + 0.75 * new
    torch.testing.assert_close(old[0], torch.tensor([2.5, -0.25]))
    soft_update_(old, new, 1.0)
    torch.testing.assert_close(old[0], torch.tensor([2.5, -0.25]))
    fresh = [torch.randn(2, generator=torch.Generator().manual_seed(2))]
    soft_update_(old, fresh, 0.0)  # a hard copy, bit for bit
    assert torch.equal(old[0], fresh[0])


def test_flat_groups_and_learning_signal_monitor():
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert flat_group_fraction(torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0]), groups) == pytest.approx(2 / 3)
    monitor = LearningSignalMonitor(patience=2)
    flat, varied = torch.ones(6), torch.arange(6.0)
    assert monitor.update(flat, groups) == 1.0 and monitor.streak == 1
    monitor.update(varied, groups)  # one informative batch resets the count
    assert monitor.streak == 0
    monitor.update(flat, groups)
    with pytest.raises(ConfigError, match="no learning signal: every group scored the same for 2 iterations"):
        monitor.update(flat, groups)
    LearningSignalMonitor(0).update(flat, groups)  # 0: never raises


# ------------------------------------------------------------------------------------------------ trainer
def test_first_minibatch_has_equal_implicit_policies_and_uses_the_old_parameters(tmp_path):
    trainer = tiny_nft(tmp_path)
    g = torch.Generator().manual_seed(3)
    batch = hand_batch(g)
    trainer.prepare(batch)
    rows, t = torch.tensor([2, 0, 3]), torch.tensor([0.0, 0.4, 0.8])
    noise = torch.randn(3, 3, 8, 8, generator=g)
    _, metrics = trainer.loss(batch, rows, t, noise)
    # Before any update v_theta = v_old: v+ = v- = v_old, so both errors agree and nothing deviates.
    assert metrics["train/old_deviation"].item() == 0.0
    torch.testing.assert_close(metrics["train/positive_error"], metrics["train/negative_error"])

    # v_old comes from the old parameters (a perturbed copy here); the trained weights are restored exactly.
    with torch.no_grad():
        for old in trainer.old_params:
            old.add_(0.05)
    trained = [p.detach().clone() for p in trainer.trainable]
    _, metrics = trainer.loss(batch, rows, t, noise)
    assert all(torch.equal(a, b) for a, b in zip(trained, trainer.trainable, strict=True))
    reference = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for param, old in zip(reference.trainable_parameters(), trainer.old_params, strict=True):
            param.copy_(old)
        x_t = (1 - t.view(3, 1, 1, 1)) * noise + t.view(3, 1, 1, 1) * batch.latents[rows]
        cond = trainer.model.encode_prompts([PROMPTS[i] for i in rows.tolist()])
        deviation = (trainer.model.velocity(x_t, t, cond) - reference.velocity(x_t, t, cond)).square().mean()
    torch.testing.assert_close(metrics["train/old_deviation"], deviation, rtol=1e-4, atol=1e-7)


def test_sampling_uses_the_old_policy_and_the_old_policy_update(tmp_path, monkeypatch):
    trainer = tiny_nft(tmp_path, old_policy_decay_ramp=0.3, old_policy_decay_max=0.5)
    initial = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.learn(trainer.collect())
    trainer.iteration += 1
    # After 2 optimizer steps: decay min(0.5, 0.3 * 2) = 0.5, old = 0.5 * initial + 0.5 * theta.
    assert metrics["train/old_policy_decay"] == 0.5 and metrics["train/updates"] == 2.0
    for old, start, now in zip(trainer.old_params, initial, trainer.trainable, strict=True):
        torch.testing.assert_close(old, 0.5 * start + 0.5 * now.detach(), rtol=0, atol=1e-7)

    seen = []
    original = nft_module.OnlineWeightedTrainer.collect

    def spy(self):
        seen.append([p.detach().clone() for p in self.trainable])
        return original(self)

    monkeypatch.setattr(nft_module.OnlineWeightedTrainer, "collect", spy)
    trained = [p.detach().clone() for p in trainer.trainable]
    trainer.collect()
    assert all(torch.equal(a, b) for a, b in zip(seen[0], trainer.old_params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(trained, trainer.trainable, strict=True))


def test_grid_times_and_optimizer_step_partition(tmp_path):
    trainer = tiny_nft(
        tmp_path, num_steps=5, time_shift=3.0, gradient_steps_per_iteration=2, minibatch_size=3
    )
    allowed = set(time_grid(5, shift=3.0)[:-1].tolist())
    times = trainer.training_times(200)
    assert set(times.tolist()) == allowed and 0.0 in allowed  # every step-start time, never t = 1
    steps = trainer.optimizer_steps(torch.arange(16))
    assert [[len(rows) for rows in step] for step in steps] == [[3, 3, 2], [3, 3, 2]]
    assert trainer.config.updates_per_iteration() == 2
    # times_per_sample: every sample of a step appears that many times in it (one step per part still).
    trainer.config.times_per_sample = 3
    steps = trainer.optimizer_steps(torch.arange(16))
    assert len(steps) == 2 and trainer.config.updates_per_iteration() == 2
    for part, step in zip(torch.arange(16).tensor_split(2), steps, strict=True):
        rows = torch.cat(step)
        assert sorted(rows.tolist()) == sorted(part.tolist() * 3)


def test_nft_raises_brightness(tmp_path):
    """Seeded: 20 iterations on the tiny model raise the rollouts' and the evaluation's brightness, and the
    same run with the negated reward lowers it (the direction comes from the rewards, not from drift)."""

    def run(name: str, reward) -> tuple[list[float], dict]:
        trainer = tiny_nft(
            tmp_path, reward=reward, output_dir=str(tmp_path / name), iterations=20, save_steps=20
        )
        summary = trainer.train()
        return [r["rollout/reward_mean"] for r in rows_of(tmp_path / name)[1:]], summary

    rollout, summary = run("bright", Brightness())
    assert sum(rollout[-3:]) / 3 > sum(rollout[:3]) / 3 + 0.008, rollout
    assert summary["final_reward_mean"] > summary["base_reward_mean"] + 0.008, summary
    dark, _ = run("dark", darkness)
    assert sum(dark[-3:]) / 3 > sum(dark[:3]) / 3 + 0.008, dark  # -brightness rises: darker images


def test_nft_resume_gives_the_same_weights_and_old_policy(tmp_path, monkeypatch):
    from rlflow.utils.run import RunLogger

    monkeypatch.setattr(RunLogger, "plot", lambda self: [])

    def run(out: str, iterations: int) -> NFTTrainer:
        trainer = tiny_nft(
            tmp_path, output_dir=str(tmp_path / out), iterations=iterations, old_policy_decay_ramp=0.2
        )
        # The shapes model caches prompt embeddings, and its pooled embedding differs in the last bits with
        # the batch it was first encoded in: fill the cache as the straight run's step-0 evaluation does.
        trainer.model.encode_prompts(PROMPTS)
        trainer.train()
        return trainer

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4)
    for a, b in zip(straight.trainable, resumed.trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.old_params, resumed.old_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["step"] for r in rows_of(tmp_path / "resumed")] == [0, 1, 2, 3, 4]


def test_lora_old_policy_holds_only_adapters_and_kl_starts_at_zero(tmp_path):
    trainer = tiny_nft(tmp_path, lora_r=2, kl_beta=1e-2)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert [o.shape for o in trainer.old_params] == [p.shape for p in trainer.trainable]
    batch = hand_batch(torch.Generator().manual_seed(4))
    trainer.prepare(batch)
    _, metrics = trainer.loss(batch, torch.arange(4), torch.full((4,), 0.5), torch.randn(4, 3, 8, 8))
    assert metrics["train/kl"].item() == 0.0  # LoRA B = 0 at the start: the model is the reference
    before = [p.detach().clone() for p in trainer.trainable]
    trainer.learn(trainer.collect())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable, strict=True))


def test_no_learning_signal_stops_nft_and_rwr(tmp_path):
    trainer = tiny_nft(tmp_path, reward=constant_reward, iterations=5, save_steps=100)
    with pytest.raises(
        ConfigError, match=r"no learning signal: every group scored the same for 3 iterations"
    ):
        trainer.train()
    assert len(rows_of(tmp_path / "run")) == 3  # the base evaluation and two flat iterations were logged
    config = RWRConfig(
        **{
            k: v
            for k, v in tiny_values(tmp_path, output_dir=str(tmp_path / "rwr")).items()
            if k != "gradient_steps_per_iteration"
        },
        max_flat_iterations=1,
    )
    rwr = RWRTrainer(config, model=tiny_model(), reward=constant_reward, prompts=TinyPrompts())
    with pytest.raises(ConfigError, match="increase samples_per_prompt"):
        rwr.train()


def test_non_finite_loss_stops_before_the_step(tmp_path, monkeypatch):
    trainer = tiny_nft(tmp_path)
    original = NFTTrainer.loss

    def poisoned(self, *args):
        loss, metrics = original(self, *args)
        return loss * float("nan"), metrics

    monkeypatch.setattr(NFTTrainer, "loss", poisoned)
    before = [p.detach().clone() for p in trainer.trainable]
    with pytest.raises(FloatingPointError, match="nft loss is nan at iteration 1"):
        trainer.learn(trainer.collect())
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable, strict=True))


def test_nft_config_errors():
    cases = {
        "beta": dict(beta=0.0),
        "advantage_clip": dict(advantage_clip=0.0),
        "kl_beta": dict(kl_beta=-1.0),
        "gradient_steps_per_iteration": dict(gradient_steps_per_iteration=0),
        "old_policy_decay_max": dict(old_policy_decay_max=1.0),
        "old_policy_decay_ramp": dict(old_policy_decay_ramp=-0.1),
        "std_mode": dict(std_mode="batch"),
        "loss_weighting": dict(loss_weighting="x0"),
        "time_distribution": dict(time_distribution="beta"),
        "max_flat_iterations": dict(max_flat_iterations=-1),
        "samples_per_prompt": dict(samples_per_prompt=0),
    }
    for name, values in cases.items():
        with pytest.raises(ConfigError, match=name):
            NFTConfig(**values)
    with pytest.raises(ConfigError, match=r"gradient_steps_per_iteration must be in \[1, 4\]"):
        NFTConfig(prompts_per_iteration=2, samples_per_prompt=2, gradient_steps_per_iteration=5)


def test_nft_is_a_cli_command():
    from rlflow.cli import COMMANDS

    assert COMMANDS["nft"].config == "rlflow.trainers.nft:NFTConfig"
    assert NFTConfig().output_dir == "runs/nft"
