"""Flow-RWR: weights against hand values, the weighted loss against a hand computation, learning, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from rlflow.reward_models import Brightness  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.testing import tiny_shapes_config  # noqa: E402
from rlflow.trainers.online_weighted import OnlineBatch, weighted_flow_matching_loss  # noqa: E402
from rlflow.trainers.rwr import RWRConfig, RWRTrainer, rwr_weights  # noqa: E402
from rlflow.worlds.shapes.model import build_shapes_model  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a white circle"]


class TinyPrompts:
    """A four-prompt source of valid shapes-world prompts (the tiny model's tokenizer knows the words)."""

    def sample(self, num: int, generator: torch.Generator) -> list[str]:
        index = torch.randint(len(PROMPTS), (num,), generator=generator)
        return [PROMPTS[i] for i in index.tolist()]

    def eval_prompts(self) -> list[str]:
        return list(PROMPTS)


def tiny_shapes_model(seed: int = 0):
    """A 1-layer shapes model on 3x8x8 images (~10k parameters)."""
    torch.manual_seed(seed)
    config = tiny_shapes_config(image_size=8, patch_size=4)
    return build_shapes_model(config)


def tiny_values(tmp_path: Path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "run"),
        resume=True,
        report_to="none",
        num_threads=1,
        iterations=2,
        prompts_per_iteration=4,
        samples_per_prompt=4,
        num_steps=4,
        eval_num_steps=4,
        num_eval_prompts=4,
        eval_steps=100,
        save_steps=1,
        minibatch_size=8,
        learning_rate=3e-3,
    )
    values.update(overrides)
    return values


def tiny_rwr(tmp_path: Path, lora_r: int = 0, **overrides) -> RWRTrainer:
    config = RWRConfig(**tiny_values(tmp_path, **overrides))
    config.model.lora_r = lora_r
    config.model.lora_alpha = float(max(lora_r, 1))
    return RWRTrainer(config, model=tiny_shapes_model(), reward=Brightness(), prompts=TinyPrompts())


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ weights
def test_rwr_weights_hand_values():
    rewards = torch.tensor([0.0, 1.0, 2.0])
    total = 1 + math.e + math.e**2
    expected = torch.tensor([3 / total, 3 * math.e / total, 3 * math.e**2 / total])
    weights = rwr_weights(rewards, temperature=1.0)
    torch.testing.assert_close(weights, expected)
    assert weights.mean().item() == pytest.approx(1.0)
    # Temperature 0.5 doubles the logits: exp(2 r) / mean(exp(2 r)).
    e2 = torch.exp(2 * rewards)
    torch.testing.assert_close(rwr_weights(rewards, 0.5), e2 / e2.mean())
    # An offset of the rewards changes nothing (only differences matter).
    torch.testing.assert_close(rwr_weights(rewards + 7.0, 1.0), weights)


def test_rwr_weight_temperature_limits_groups_and_clip():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1])
    torch.testing.assert_close(rwr_weights(rewards, 1e6), torch.ones(4))  # hot: self-distillation
    torch.testing.assert_close(rwr_weights(rewards, 1e-4), torch.tensor([0.0, 4.0, 0.0, 0.0]))  # cold: best
    grouped = rwr_weights(rewards, 1e-4, group_size=2)  # the best of each prompt's pair gets 2
    torch.testing.assert_close(grouped, torch.tensor([0.0, 2.0, 2.0, 0.0]))
    clipped = rwr_weights(rewards, 1e-4, clip=1.5)
    torch.testing.assert_close(clipped, torch.tensor([0.0, 1.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(rewards, 0.0)
    with pytest.raises(ValueError, match="clip"):
        rwr_weights(rewards, 1.0, clip=0.5)
    with pytest.raises(ValueError, match="group_size"):
        rwr_weights(rewards, 1.0, group_size=3)


def test_weighted_loss_hand_value_and_trainer_loss(tmp_path):
    torch.testing.assert_close(
        weighted_flow_matching_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.0, 1.5])),
        torch.tensor((0.5 + 2.0 + 6.0) / 3),
    )
    trainer = tiny_rwr(tmp_path, temperature=0.05)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(6, 3, 8, 8, generator=g)
    batch = OnlineBatch(
        latents=latents,
        prompts=[PROMPTS[i % 4] for i in range(6)],
        rewards=torch.tensor([0.1, 0.4, 0.3, 0.8, 0.2, 0.5]),
        group_ids=torch.arange(3).repeat_interleave(2),
        group_size=2,
    )
    trainer.prepare(batch)
    rows = torch.tensor([4, 1, 3])
    t = torch.tensor([0.2, 0.5, 0.9])
    noise = torch.randn(3, 3, 8, 8, generator=g)
    loss, _ = trainer.loss(batch, rows, t, noise)
    # By hand: x_t = (1 - t) x0 + t x1, error = mean((x1 - x0 - v)^2), weights 6 softmax(r / 0.05).
    x1 = latents[rows]
    tt = t.view(3, 1, 1, 1)
    with torch.no_grad():
        v = trainer.model.velocity(
            (1 - tt) * noise + tt * x1,
            t,
            trainer.model.encode_prompts(["a white circle", "a blue square", "a white circle"]),
        )
    errors = ((x1 - noise) - v).square().flatten(1).mean(1)
    w = torch.softmax(batch.rewards / 0.05, 0) * 6
    torch.testing.assert_close(loss.detach(), (w[rows] * errors).mean(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_rwr_raises_brightness(tmp_path):
    """Online RWR on a tiny shapes model: the rollouts' brightness (and the evaluation's) goes up."""
    trainer = tiny_rwr(
        tmp_path,
        iterations=16,
        samples_per_prompt=8,
        minibatch_size=16,
        temperature=0.01,
        eval_steps=16,
        save_steps=16,
        seed=0,
    )
    summary = trainer.train()
    rollout = [r["rollout/reward_mean"] for r in rows_of(Path(trainer.config.output_dir))[1:]]
    assert sum(rollout[-3:]) / 3 > sum(rollout[:3]) / 3 + 0.005, rollout
    assert summary["final_reward_mean"] > summary["base_reward_mean"] + 0.01, summary
    run = Path(trainer.config.output_dir)
    assert (run / "images" / "eval_00016.png").is_file() and (run / "summary.json").is_file()
    assert (run / "model").is_dir() and list((run / "plots").glob("*.png"))


def test_rwr_resume_gives_the_same_weights(tmp_path, monkeypatch):
    from rlflow.utils.run import RunLogger

    monkeypatch.setattr(RunLogger, "plot", lambda self: [])  # plots cost seconds on a loaded CPU

    def run(out: str, iterations: int) -> RWRTrainer:
        trainer = tiny_rwr(tmp_path, output_dir=str(tmp_path / out), iterations=iterations, temperature=0.05)
        trainer.train()
        return trainer

    straight = run("straight", 2)
    run("resumed", 1)
    resumed = run("resumed", 2)
    for a, b in zip(straight.trainable, resumed.trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["step"] for r in rows_of(tmp_path / "resumed")] == [0, 1, 2]


def test_rwr_with_lora_trains_only_adapters(tmp_path):
    trainer = tiny_rwr(tmp_path, lora_r=2, iterations=1)
    assert trainer.trainable and all(
        "lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad
    )
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.update(trainer.collect())
    assert metrics["train/weight_mean"] == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable, strict=True))


def test_rwr_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        RWRConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="weight_clip"):
        RWRConfig(weight_clip=0.5)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        RWRConfig(samples_per_prompt=0)
    with pytest.raises(ConfigError, match="rollout_refresh_iterations"):
        RWRConfig(rollout_refresh_iterations=0)


def test_policy_snapshot_swaps_in_and_restores_bit_for_bit():
    from rlflow.trainers.policy_snapshot import PolicySnapshot

    live = [torch.randn(3, 2), torch.randn(5)]
    initial = [t.clone() for t in live]
    snapshot = PolicySnapshot(live)
    trained = [t + 1.0 for t in live]
    with torch.no_grad():
        for t, new in zip(live, trained, strict=True):
            t.copy_(new)
    with snapshot.swapped_in():  # the snapshot's (initial) values inside the block
        assert all(torch.equal(t, s) for t, s in zip(live, snapshot.values, strict=True))
        assert all(torch.equal(t, start) for t, start in zip(live, initial, strict=True))
    assert all(torch.equal(t, new) for t, new in zip(live, trained, strict=True))
    snapshot.update()  # a hard refresh copies the live values
    assert all(torch.equal(s, new) for s, new in zip(snapshot.values, trained, strict=True))
    names = ["a", "b"]
    state = snapshot.state(names)
    other = PolicySnapshot([torch.zeros(3, 2), torch.zeros(5)])
    assert other.load_state(state, names) and all(
        torch.equal(a, b) for a, b in zip(other.values, snapshot.values, strict=True)
    )
    assert not other.load_state({"a": state["a"]}, names)


def test_rwr_rollout_refresh_samples_from_the_frozen_copy(tmp_path):
    """With rollout_refresh_iterations 3, iterations 1-3 sample from the initial weights (the same latents
    as a fresh, untrained model drawing with the same generator state), and the copy is refreshed after 3."""
    trainer = tiny_rwr(tmp_path, rollout_refresh_iterations=3, iterations=3, temperature=0.05)
    initial = [p.detach().clone() for p in trainer.trainable]
    for _ in range(2):
        batch = trainer.collect()
        trainer.learn(batch)
        trainer.iteration += 1
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.trainable, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.rollout_snapshot.values, strict=True))
    # The third iteration's samples come from the initial weights, not the trained ones.
    state = trainer.generator.get_state()
    batch = trainer.collect()
    trained = [p.detach().clone() for p in trainer.trainable]
    with torch.no_grad():
        for p, v in zip(trainer.trainable, initial, strict=True):
            p.copy_(v)
    trainer.generator.set_state(state)
    torch.testing.assert_close(trainer.collect().latents, batch.latents, rtol=0, atol=0)
    with torch.no_grad():
        for p, v in zip(trainer.trainable, trained, strict=True):
            p.copy_(v)
    metrics = trainer.learn(batch)
    assert metrics["rollout/policy_age"] == 2.0
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.trainable, trainer.rollout_snapshot.values, strict=True)
    )


def test_rwr_rollout_refresh_resume_gives_the_same_weights(tmp_path, monkeypatch):
    from rlflow.utils.run import RunLogger

    monkeypatch.setattr(RunLogger, "plot", lambda self: [])

    def run(out: str, iterations: int) -> RWRTrainer:
        trainer = tiny_rwr(
            tmp_path, output_dir=str(tmp_path / out), iterations=iterations, rollout_refresh_iterations=2
        )
        trainer.train()
        return trainer

    straight = run("straight", 3)
    run("resumed", 1)  # stops with a snapshot that differs from the trained weights
    resumed = run("resumed", 3)
    for a, b in zip(straight.trainable, resumed.trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.rollout_snapshot.values, resumed.rollout_snapshot.values, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rwr_heun_samples_count_two_evaluations_per_step(tmp_path):
    from rlflow.flows.solvers import integrate_ode
    from rlflow.flows.time import time_grid
    from rlflow.trainers.flow_objectives import ode_sample

    trainer = tiny_rwr(tmp_path, ode_method="heun", iterations=1)
    trainer.learn(trainer.collect())
    assert trainer.nfe == 4 * 4 * 4 * 2 + 16  # P*N samples x K steps x 2, then one loss forward per sample
    model = trainer.model
    noise_generator = torch.Generator().manual_seed(3)
    latents = ode_sample(
        model, PROMPTS, num_steps=4, time_shift=1.0, generator=torch.Generator().manual_seed(3), method="heun"
    )
    x0 = torch.randn((len(PROMPTS), *model.latent_shape), generator=noise_generator)
    with torch.no_grad():
        expected = integrate_ode(model, x0, time_grid(4), model.encode_prompts(PROMPTS), method="heun")
    torch.testing.assert_close(latents, expected)
