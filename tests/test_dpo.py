"""Flow-DPO: the loss by hand, its sign, beta schedules, shared (t, noise) per pair, offline data, online
pairing, and short seeded learning / resume runs on a tiny shapes model."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from rlflow.config import ConfigError  # noqa: E402
from rlflow.data.preferences import LABEL_A, LABEL_B, LABEL_TIE, PreferenceSet, save_preferences  # noqa: E402
from rlflow.trainers.dpo import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    best_worst_pairs,
    dpo_beta,
    dpo_loss,
    offline_pairs,
    pair_errors,
)
from rlflow.trainers.flow_objectives import OnlineGroups  # noqa: E402
from rlflow.trainers.text_to_image import ModelConfig  # noqa: E402
from tests.test_flow_objectives import tiny_shapes_model  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two red circles"]


def test_dpo_loss_by_hand():
    # bracket = (0.3 - 0.4) - (0.5 - 0.4) = -0.2; logits = -(2 / 2) * (-0.2) = 0.2;
    # loss = -log sigmoid(0.2) = log(1 + exp(-0.2)).
    out = dpo_loss(
        torch.tensor([0.3]),
        torch.tensor([0.5]),
        torch.tensor([0.4]),
        torch.tensor([0.4]),
        torch.tensor([2.0]),
    )
    torch.testing.assert_close(out.bracket, torch.tensor([-0.2]))
    torch.testing.assert_close(out.logits, torch.tensor([0.2]))
    torch.testing.assert_close(out.loss, torch.tensor([math.log1p(math.exp(-0.2))]))
    # Policy == reference: log 2 whatever the errors.
    same = dpo_loss(
        torch.tensor([0.7]),
        torch.tensor([0.1]),
        torch.tensor([0.7]),
        torch.tensor([0.1]),
        torch.tensor([5000.0]),
    )
    torch.testing.assert_close(same.loss, torch.tensor([math.log(2.0)]))
    # Large margins stay finite (softplus form).
    big = dpo_loss(
        torch.tensor([0.0]),
        torch.tensor([10.0]),
        torch.tensor([10.0]),
        torch.tensor([0.0]),
        torch.tensor([5000.0]),
    )
    assert torch.isfinite(big.loss).all() and float(big.loss) < 1e-6


def test_dpo_loss_sign():
    """A winner error below the reference's lowers the loss; a loser error below it raises the loss."""
    ref = torch.tensor([0.5])
    beta = torch.tensor([10.0])
    winner_errors = torch.tensor([0.3, 0.4, 0.5, 0.6])
    losses = dpo_loss(winner_errors, ref.expand(4), ref.expand(4), ref.expand(4), beta.expand(4)).loss
    assert (losses.diff() > 0).all()
    assert float(losses[2]) == pytest.approx(math.log(2.0))
    loser_losses = dpo_loss(ref.expand(4), winner_errors, ref.expand(4), ref.expand(4), beta.expand(4)).loss
    assert (loser_losses.diff() < 0).all()


def test_beta_schedules():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(dpo_beta(t, 4.0, "constant"), torch.tensor([4.0, 4.0, 4.0]))
    # beta * t^2 (= beta * (1 - sigma)^2 in diffusers' sigma = 1 - t).
    torch.testing.assert_close(dpo_beta(t, 4.0, "diffusion_dpo"), torch.tensor([0.0, 1.0, 4.0]))
    with pytest.raises(ValueError, match="beta_schedule"):
        dpo_beta(t, 4.0, "linear")


class RecordingModel:
    """``v = 0``; records every (x_t, t) it is called with, and whether it was in reference mode."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.in_reference = False

    def encode_prompts(self, prompts):
        return list(prompts)

    def velocity(self, x, t, cond):
        assert len(cond) == x.shape[0]
        self.calls.append((x.detach().clone(), t.detach().clone(), self.in_reference))
        return torch.zeros_like(x)

    @contextlib.contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False


def test_winner_and_loser_share_t_and_noise():
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    noise = torch.randn(3, 2, 4, generator=g)
    model = RecordingModel()
    pw, pl, rw, rl = pair_errors(model, ["a", "b", "c"], winners, losers, t, noise)
    assert [call[2] for call in model.calls] == [False, True]  # policy, then reference
    for x_t, times, _ in model.calls:
        torch.testing.assert_close(times, torch.cat([t, t]))
        tt = times.reshape(-1, 1, 1)
        # Recover x0 from x_t = (1 - t) x0 + t x1: identical for a pair's winner and loser.
        recovered = (x_t - tt * torch.cat([winners, losers])) / (1.0 - tt)
        torch.testing.assert_close(recovered[:3], noise)
        torch.testing.assert_close(recovered[3:], noise)
    # v = 0: the error is the squared target velocity, the same for policy and reference.
    torch.testing.assert_close(pw, (winners - noise).square().flatten(1).mean(1))
    torch.testing.assert_close(pl, rl)


def test_loss_is_log2_at_init():
    model = tiny_shapes_model()
    from rlflow.trainers.text_to_image import prepare_model

    # Full fine-tuning (reference = frozen copy); the LoRA reference is tested in test_flow_objectives.
    prepare_model(ModelConfig(lora_r=0), model=model)
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    errors = pair_errors(
        model, PROMPTS[:2], winners, losers, torch.rand(2, generator=g), torch.randn_like(winners)
    )
    out = dpo_loss(*errors, torch.full((2,), 5000.0))
    torch.testing.assert_close(out.loss, torch.full((2,), math.log(2.0)))


def test_best_worst_pairing():
    rewards = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [1.0, 0.0, 0.5]])
    latents = torch.arange(9.0).reshape(3, 3, 1)  # latent value = 3 * prompt + sample
    groups = OnlineGroups(["p0", "p1", "p2"], latents, torch.zeros(3, 3, 3, 1, 1), rewards)
    pairs, keep = best_worst_pairs(groups)
    assert keep.tolist() == [True, False, True]
    assert pairs.prompts == ["p0", "p2"]
    assert pairs.winners.flatten().tolist() == [1.0, 6.0]
    assert pairs.losers.flatten().tolist() == [0.0, 7.0]


def preference_set(num_pairs: int = 12, seed: int = 0) -> PreferenceSet:
    """Winners are bright-ish images, losers dark-ish; one pair per 4 is a tie; labels swap A/B."""
    g = torch.Generator().manual_seed(seed)
    bright = (0.5 + 0.1 * torch.randn(num_pairs, 3, 32, 32, generator=g)).clamp(-1, 1)
    dark = (-0.5 + 0.1 * torch.randn(num_pairs, 3, 32, 32, generator=g)).clamp(-1, 1)
    a_wins = torch.arange(num_pairs) % 2 == 0
    mask = a_wins.reshape(-1, 1, 1, 1)
    latents_a, latents_b = torch.where(mask, bright, dark), torch.where(mask, dark, bright)
    labels = torch.where(a_wins, LABEL_A, LABEL_B)
    labels[3::4] = LABEL_TIE
    return PreferenceSet(
        kind="image",
        dimensions=["alignment", "quality"],
        prompts=[PROMPTS[i % len(PROMPTS)] for i in range(num_pairs)],
        a=(latents_a + 1) / 2,
        b=(latents_b + 1) / 2,
        labels=torch.stack([labels, torch.full_like(labels, LABEL_TIE)], dim=1),
        latents_a=latents_a,
        latents_b=latents_b,
    )


def test_offline_pairs_orient_winners_and_drop_ties():
    prefs = preference_set()
    pairs, ties = offline_pairs(prefs, "alignment")
    assert ties == 3 and len(pairs) == 9
    assert (pairs.winners.mean(dim=(1, 2, 3)) > 0).all() and (pairs.losers.mean(dim=(1, 2, 3)) < 0).all()
    assert offline_pairs(prefs, "quality")[1] == 12
    with pytest.raises(ConfigError, match="unknown label dimension"):
        offline_pairs(prefs, "style")
    no_latents = PreferenceSet("image", ["alignment"], prefs.prompts, prefs.a, prefs.b, prefs.labels[:, :1])
    with pytest.raises(ConfigError, match="no latents"):
        offline_pairs(no_latents)


def brightness(images, prompts):
    return images.flatten(1).mean(dim=1)


def test_offline_dpo_learns_from_a_saved_preference_set(tmp_path):
    """Loader integration + learning: the fixed-noise DPO loss falls and the implicit accuracy rises."""
    directory = save_preferences(preference_set(16), tmp_path / "prefs")
    config = DPOConfig(
        output_dir=str(tmp_path / "run"),
        mode="offline",
        preferences=str(directory),
        dimension="alignment",
        heldout_fraction=0.0,
        rewards={},
        model=ModelConfig(lora_r=0),
        iterations=12,
        pairs_per_iteration=12,
        timesteps_per_pair=2,
        beta=1000.0,
        learning_rate=1e-3,
        eval_steps=100,
        save_steps=100,
        num_eval_prompts=2,
        eval_num_steps=2,
        report_to="none",
        plots=False,
        num_threads=1,
    )
    trainer = DPOTrainer(config, model=tiny_shapes_model())
    assert trainer.ties_dropped == 4 and len(trainer.train_pairs) == 12

    def fixed_noise_metrics():
        with torch.no_grad():
            _, metrics = trainer.loss(trainer.train_pairs, torch.Generator().manual_seed(7))
        return float(metrics["train/loss"]), float(metrics["train/implicit_accuracy"])

    loss0, _ = fixed_noise_metrics()
    assert loss0 == pytest.approx(math.log(2.0), abs=1e-5)
    summary = trainer.train()
    loss1, accuracy1 = fixed_noise_metrics()
    assert loss1 < loss0 - 0.05
    assert accuracy1 >= 0.75
    assert summary["ties_dropped"] == 4 and (tmp_path / "run" / "model").is_dir()


def test_online_dpo_runs_and_resumes(tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    common = dict(
        output_dir=str(tmp_path / "run"),
        prompts=str(prompt_file),
        rewards={"brightness": 1.0},
        model=ModelConfig(lora_r=0),
        prompts_per_iteration=2,
        samples_per_prompt=3,
        num_steps=2,
        ema_decay=0.5,
        eval_num_steps=2,
        num_eval_prompts=2,
        grid_size=2,
        eval_steps=1,
        save_steps=1,
        report_to="none",
        plots=False,
        num_threads=1,
    )
    summary = DPOTrainer(
        DPOConfig(iterations=2, **common), model=tiny_shapes_model(), reward=brightness
    ).train()
    assert summary["iterations"] == 2 and "final_reward_mean" in summary
    run = tmp_path / "run"
    assert (run / "images" / "eval_00002.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train/loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference at first
    assert {"rollout/pairs", "train/implicit_accuracy", "train/beta_t_mean"} <= set(rows[1])
    resumed = DPOTrainer(DPOConfig(iterations=3, **common), model=tiny_shapes_model(), reward=brightness)
    summary = resumed.train()
    assert summary["iterations"] == 3 and summary["weights"] == "ema"
    assert resumed.ema is not None and resumed.ema.num_updates == 3  # restored from the checkpoint, +1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_config_errors():
    with pytest.raises(ConfigError, match="preferences"):
        DPOConfig(mode="offline")
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        DPOConfig(samples_per_prompt=1)
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="rewards"):
        DPOConfig(rewards={})
