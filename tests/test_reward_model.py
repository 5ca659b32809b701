"""Learned reward models: BT / BT-with-ties losses and metrics against hand computations, noise-aware pairs,
checkpoints, the reward protocol wrapper, guidance gradients, and seeded learning on known preference rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rlflow.reward_models.learned import (
    ImageRewardModel,
    LearnedReward,
    RewardModelConfig,
    SegmentRewardModel,
    load_reward_model,
    reward_gradient,
    save_reward_model,
)
from rlflow.reward_models.losses import (
    accuracy_with_ties,
    accuracy_without_ties,
    bradley_terry_loss,
    bt_ties_loss,
    bt_ties_probabilities,
    noised_pair,
    preference_loss,
    preference_metrics,
)

from rlflow.config import ConfigError, config_from_dict
from rlflow.data.preferences import PreferenceSet, save_preferences
from rlflow.errors import CheckpointError
from rlflow.trainers.reward_model import RewardModelTrainConfig, RewardModelTrainer, train
from rlflow.worlds.shapes.augmentation import (
    degrade_images,
    perturb_prompts,
    pretraining_batch,
    symmetry_augment,
)
from rlflow.worlds.shapes.prompts import COLORS, SHAPES, parse_prompt, sample_prompts
from rlflow.worlds.shapes.render import render

A, B, TIE = 0, 1, 2
TINY_IMAGE = {"conv_channels": [32], "hidden_dim": 32, "text_dim": 16, "text_buckets": 256, "time_dim": 16}


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------- losses
def test_bradley_terry_loss_matches_hand_values_with_margin_and_centring():
    r_a = torch.tensor([2.0, 0.5, 1.0])
    r_b = torch.tensor([1.0, 1.5, 3.0])
    labels = torch.tensor([A, B, TIE])
    loss = bradley_terry_loss(r_a, r_b, labels)
    assert loss[0].item() == pytest.approx(-math.log(_sig(1.0)))
    assert loss[1].item() == pytest.approx(-math.log(_sig(1.0)))  # B wins: r_w - r_l = 1.5 - 0.5
    assert loss[2].item() == 0.0  # ties carry no BT information
    with_margin = bradley_terry_loss(r_a, r_b, labels, margin=0.5, center_coef=0.1)
    assert with_margin[0].item() == pytest.approx(-math.log(_sig(0.5)) + 0.1 * 3.0**2)
    assert with_margin[1].item() == pytest.approx(-math.log(_sig(0.5)) + 0.1 * 2.0**2)
    assert with_margin[2].item() == 0.0


def test_bt_ties_loss_matches_the_anchor_formulas():
    theta = 5.0
    r_a = torch.tensor([2.0, 0.5, 1.0])
    r_b = torch.tensor([1.0, 1.5, 0.2])
    loss = bt_ties_loss(r_a, r_b, torch.tensor([A, B, TIE]), theta=theta)
    lt = math.log(theta)
    assert loss[0].item() == pytest.approx(-math.log(_sig(1.0 - lt)))
    assert loss[1].item() == pytest.approx(-math.log(_sig(1.0 - lt)))
    d = 0.8
    tie = -math.log(_sig(d - lt)) - math.log(_sig(-d - lt)) - math.log(theta**2 - 1)
    assert loss[2].item() == pytest.approx(tie)
    # and the tie term is -log of the closed-form tie probability
    ea, eb = math.exp(1.0), math.exp(0.2)
    p_tie = (theta**2 - 1) * ea * eb / ((ea + theta * eb) * (theta * ea + eb))
    assert loss[2].item() == pytest.approx(-math.log(p_tie))
    with pytest.raises(ValueError, match="theta must be > 1"):
        bt_ties_loss(r_a, r_b, torch.tensor([A, B, TIE]), theta=1.0)


def test_bt_ties_probabilities_sum_to_one_and_match_the_closed_form():
    g = torch.Generator().manual_seed(0)
    r_a, r_b = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    for theta in (1.5, 5.0, 20.0):
        p = bt_ties_probabilities(r_a.double(), r_b.double(), theta)
        assert p.shape == (50, 3)
        torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
        ea, eb = r_a.double().exp(), r_b.double().exp()
        torch.testing.assert_close(p[:, 0], ea / (ea + theta * eb))
        torch.testing.assert_close(p[:, 1], eb / (eb + theta * ea))
        torch.testing.assert_close(
            p[:, 2], (theta**2 - 1) * ea * eb / ((ea + theta * eb) * (theta * ea + eb))
        )


def test_multi_head_loss_averages_each_dimension_over_its_pairs_then_over_dimensions():
    r_a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    r_b = torch.zeros(2, 2)
    labels = torch.tensor([[A, TIE], [B, TIE]])  # dimension 1 has no decided pair
    total, per_dim = preference_loss(r_a, r_b, labels, loss="bt")
    expected0 = (-math.log(_sig(1.0)) - math.log(_sig(0.0))) / 2
    torch.testing.assert_close(per_dim, torch.tensor([expected0, 0.0]))
    assert total.item() == pytest.approx(expected0 / 2)
    total, per_dim = preference_loss(r_a, r_b, labels, loss="bt_ties", theta=5.0)
    torch.testing.assert_close(per_dim, bt_ties_loss(r_a, r_b, labels, 5.0).mean(0))


# ------------------------------------------------------------------------------------------------ metrics
def test_accuracy_metrics_on_hand_made_scores():
    r_a = torch.tensor([2.0, 0.0, 1.0, 0.0, 5.0, 3.0])
    r_b = torch.tensor([0.0, 2.0, 2.0, 0.0, 5.0, 3.1])
    labels = torch.tensor([A, B, A, A, TIE, TIE])
    # decided pairs: right, right, wrong, equal scores (1/2) -> 2.5 / 4
    assert accuracy_without_ties(r_a, r_b, labels) == pytest.approx(2.5 / 4)
    # theta = 5 (log 5 = 1.61): d = 2 -> (0.60, 0.03, 0.38) predicts A; d = -2 -> B; d = -1 -> (0.07, 0.35, 0.58)
    # and d = 0 -> (1/6, 1/6, 2/3) predict a tie: right on pairs 0, 1, 4, 5
    assert accuracy_with_ties(r_a, r_b, labels, theta=5.0) == pytest.approx(4 / 6)
    # theta close to 1 makes ties unlikely: pairs 0, 1 right, pair 2 predicts B, d = 0 gives argmax A (the
    # first of two equal maxima): right on pair 3, wrong on the tie 4; pair 5 predicts B
    assert accuracy_with_ties(r_a, r_b, labels, theta=1.01) == pytest.approx(3 / 6)
    metrics = preference_metrics(r_a, r_b, labels, theta=5.0)
    assert metrics["margin"] == pytest.approx((2 + 2 - 1 + 0) / 4)
    assert metrics["tie_fraction"] == pytest.approx(2 / 6)
    assert math.isnan(accuracy_without_ties(r_a[4:], r_b[4:], labels[4:]))


# -------------------------------------------------------------------------------------- noise-aware pairs
def test_noised_pairs_share_time_and_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    x1a, x1b = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    noise, t = torch.randn(4, 3, 4, 4, generator=g), torch.rand(4, generator=g)
    xa, xb = noised_pair(x1a, x1b, t, noise)
    tt = t[:, None, None, None]
    torch.testing.assert_close(xa, (1 - tt) * noise + tt * x1a)
    torch.testing.assert_close(xb - xa, tt * (x1b - x1a))  # same noise: only the data differs

    # The trainer draws one (t, noise) per pair: a pair of identical latents stays identical after noising.
    pairs = _image_set(8, seed=1, size=16)
    pairs.b = pairs.a.clone()
    config = _config(tmp_path, noise_aware=True, steps=2)
    trainer = RewardModelTrainer(config, pairs)
    seen = {}

    def spy(x, prompts, t=None):
        seen["x"], seen["t"] = x, t
        return torch.zeros(x.shape[0], 1)

    batch = trainer.make_batch(trainer.train_set.select(torch.arange(4)), None)
    trainer.scores(spy, batch, torch.Generator().manual_seed(0))
    xa, xb = seen["x"].chunk(2)
    torch.testing.assert_close(xa, xb)
    ta, tb = seen["t"].chunk(2)
    torch.testing.assert_close(ta, tb)
    assert not torch.allclose(xa, batch.a)  # actually noised


# ------------------------------------------------------------------------------------------------- models
def _image_model(noise_aware: bool = False, dimensions=("alignment", "quality")) -> ImageRewardModel:
    torch.manual_seed(0)
    return ImageRewardModel(
        RewardModelConfig(
            kind="image", dimensions=list(dimensions), noise_aware=noise_aware, image_size=16, **TINY_IMAGE
        )
    )


def test_save_load_round_trip_and_corrupt_files(tmp_path):
    model = _image_model(noise_aware=True)
    path = model.save_pretrained(tmp_path / "rm")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = ImageRewardModel.from_pretrained(path)
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    prompts = ["a red circle", "", "two blue squares"]
    torch.testing.assert_close(loaded(x, prompts, t), model(x, prompts, t))

    seg = SegmentRewardModel(RewardModelConfig(kind="segment", dimensions=["progress"], obs_dim=3, act_dim=2))
    save_reward_model(seg, tmp_path / "seg")
    assert isinstance(load_reward_model(tmp_path / "seg"), SegmentRewardModel)
    with pytest.raises(CheckpointError, match="not a ImageRewardModel"):
        ImageRewardModel.from_pretrained(tmp_path / "seg")

    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_reward_model(path)
    (tmp_path / "seg" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_reward_model(tmp_path / "seg")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_reward_model(tmp_path / "missing")


def test_learned_reward_follows_the_reward_protocol(tmp_path):
    model = _image_model()
    save_reward_model(model, tmp_path / "rm")
    images = torch.rand(5, 3, 16, 16)
    prompts = ["a red circle"] * 5
    reward = LearnedReward(tmp_path / "rm", head="quality", batch_size=2)
    out = reward(images, prompts)
    assert out.shape == (5,) and out.dtype == torch.float32 and out.device.type == "cpu"
    with torch.no_grad():
        expected = model(images, prompts)
    torch.testing.assert_close(out, expected[:, 1])
    mixed = LearnedReward(tmp_path / "rm", weights={"alignment": 2.0, "quality": -1.0})(images, prompts)
    torch.testing.assert_close(mixed, 2 * expected[:, 0] - expected[:, 1])
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        reward(images * 2 - 1, prompts)
    with pytest.raises(ValueError, match="choose one with head"):
        LearnedReward(tmp_path / "rm")
    with pytest.raises(ValueError, match="unknown reward model head"):
        LearnedReward(tmp_path / "rm", head="aesthetics")


def test_learned_reward_builds_from_a_recipe_mapping(tmp_path, monkeypatch):
    from rlflow.reward_models import combine

    save_reward_model(_image_model(), tmp_path / "rm")
    monkeypatch.setitem(combine.REWARDS, "learned", LearnedReward)  # what the registry entry will be
    spec = {
        "learned": {"path": str(tmp_path / "rm"), "head": "alignment"},
        "rm_quality": {"type": "learned", "path": str(tmp_path / "rm"), "head": "quality", "weight": 0.5},
    }
    out = combine.build_rewards(spec)(torch.rand(3, 3, 16, 16), ["a red circle"] * 3)
    torch.testing.assert_close(out.total, out.components["learned"] + 0.5 * out.components["rm_quality"])


def test_noise_aware_model_has_a_gradient_wrt_x():
    model = _image_model(noise_aware=True).double()  # float64: the finite-difference check below is exact
    x, t = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    prompts = ["a red circle", "a blue square", "a green triangle", "two white circles"]
    reward, grad = reward_gradient(model, x, prompts, t, head="alignment")
    assert reward.shape == (4,) and grad.shape == x.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # per-sample: perturbing sample 0 along its gradient changes only its own reward (finite difference)
    eps = 1e-3
    with torch.no_grad():
        moved = model(x + eps * grad * (torch.arange(4) == 0)[:, None, None, None], prompts, t)[:, 0]
    assert (moved[0] - reward[0]).item() == pytest.approx(eps * grad[0].pow(2).sum().item(), rel=0.05)
    torch.testing.assert_close(moved[1:], reward[1:])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="noise-aware: pass t"):
        model(x, prompts)


# --------------------------------------------------------------------------------------------- learning
def _image_set(n: int, seed: int, size: int = 16) -> PreferenceSet:
    """Pairs for one prompt "a <colour> <shape>": the image of the prompt's colour wins ``alignment``; an image
    with speckle noise loses ``quality`` (tie when both or neither are speckled). Rendered at 32 px,
    average-pooled to ``size``."""
    g = torch.Generator().manual_seed(seed)
    colors, shapes = list(COLORS), list(SHAPES)
    color = torch.randint(len(colors), (n,), generator=g)
    other = (color + torch.randint(1, len(colors), (n,), generator=g)) % len(colors)
    shape = torch.randint(len(shapes), (n,), generator=g).tolist()
    prompts = [f"a {colors[c]} {shapes[s]}" for c, s in zip(color.tolist(), shape, strict=True)]
    wrong = [f"a {colors[c]} {shapes[s]}" for c, s in zip(other.tolist(), shape, strict=True)]
    good, bad = render(prompts, g), render(wrong, g)
    if size != good.shape[-1]:
        good, bad = F.adaptive_avg_pool2d(good, size), F.adaptive_avg_pool2d(bad, size)
    swap = (torch.rand(n, generator=g) < 0.5)[:, None, None, None]
    a, b = torch.where(swap, bad, good), torch.where(swap, good, bad)
    speckled_a, speckled_b = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5

    def speckle(x, mask):
        # grey speckles (equal in every channel) change brightness, not hue: alignment stays readable
        dots = 0.5 * (torch.rand(x.shape[0], 1, *x.shape[2:], generator=g) < 0.1)
        return torch.where(mask[:, None, None, None], (x + dots).clamp(0, 1), x)

    quality = torch.where(speckled_a == speckled_b, TIE, torch.where(speckled_b, A, B))
    return PreferenceSet(
        kind="image",
        dimensions=["alignment", "quality"],
        prompts=prompts,
        a=speckle(a, speckled_a),
        b=speckle(b, speckled_b),
        labels=torch.stack([swap.flatten().long(), quality], dim=1),
    )


def _segment_set(n: int, seed: int, length: int = 5, obs_dim: int = 3, act_dim: int = 2) -> PreferenceSet:
    """Segments where the one with the larger sum of obs[0] wins (tie when the sums are within 0.3)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, length, obs_dim + act_dim, generator=g)
    b = torch.randn(n, length, obs_dim + act_dim, generator=g)
    diff = a[:, :, 0].sum(1) - b[:, :, 0].sum(1)
    labels = torch.where(diff.abs() < 0.3, TIE, torch.where(diff > 0, A, B))[:, None]
    return PreferenceSet(
        kind="segment",
        dimensions=["progress"],
        prompts=[""] * n,
        a=a,
        b=b,
        labels=labels,
        meta={"obs_dim": obs_dim, "act_dim": act_dim},
    )


def _config(tmp_path, **overrides) -> RewardModelTrainConfig:
    data = {
        "data_dir": str(tmp_path / "prefs"),
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "model": TINY_IMAGE,
        "steps": 150,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "warmup_steps": 10,
        "logging_steps": 25,
        "eval_steps": 1000,
        "eval_train_pairs": 64,
        "heldout_fraction": 0.25,
        "save_steps": 1000,
        "report_to": "none",
        "plot_curves": False,
        **overrides,
    }
    data["warmup_steps"] = min(data["warmup_steps"], data["steps"] - 1)
    return config_from_dict(RewardModelTrainConfig, data, source="test")


def test_image_reward_model_learns_prompt_alignment_and_quality(tmp_path, one_thread):
    save_preferences(_image_set(400, seed=0), tmp_path / "prefs")
    config = _config(tmp_path)
    trainer = RewardModelTrainer(config)
    before = trainer.evaluate()
    summary = trainer.train()
    # Chance is 0.5; a hand-made rule (colour matches the prompt / no speckles) is learnable in 150 steps.
    assert before["eval/alignment/accuracy"] < 0.7
    assert summary["alignment/accuracy"] > 0.8, summary
    assert summary["quality/accuracy"] > 0.9, summary
    assert summary["quality/accuracy_with_ties"] > 0.7, (
        summary
    )  # ties (half the quality labels) are predicted too
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/alignment/accuracy" in row for row in rows)
    reward = LearnedReward(summary["model_dir"], head="alignment")
    held = trainer.heldout_set
    wins = reward(held.a, held.prompts) > reward(held.b, held.prompts)
    assert (wins == (held.labels[:, 0] == A)).float().mean() == pytest.approx(
        summary["alignment/accuracy"], abs=0.02
    )


def test_noise_aware_reward_model_learns_on_noised_pairs(tmp_path, one_thread):
    pairs = _image_set(400, seed=0)
    pairs.latents_a, pairs.latents_b = pairs.a * 2 - 1, pairs.b * 2 - 1  # the shapes world's latents
    config = _config(tmp_path, noise_aware=True, dimensions=["alignment"], steps=150)
    trainer = RewardModelTrainer(config, pairs)
    before = trainer.evaluate()
    summary = trainer.train()
    assert before["eval/alignment/accuracy"] < 0.7
    assert summary["alignment/accuracy"] > 0.75, summary  # noised held-out pairs, t ~ U(0, 1)
    assert summary["eval_clean/alignment/accuracy"] > 0.75, summary  # the same pairs at t = 1
    model = load_reward_model(summary["model_dir"])
    assert model.config.noise_aware and model.dimensions == ["alignment"]


def test_segment_reward_model_learns_and_resumes(tmp_path, one_thread):
    pairs = _segment_set(600, seed=0)
    config = _config(tmp_path, steps=60, batch_size=64, loss="bt", center_coef=0.01, save_steps=30)
    summary = RewardModelTrainer(config, pairs).train()
    assert summary["progress/accuracy"] > 0.85, summary
    model = load_reward_model(summary["model_dir"])
    obs, act = pairs.a[:4, :, :3], pairs.a[:4, :, 3:]
    torch.testing.assert_close(model.step_rewards(obs, act).sum(1), model(pairs.a[:4]))
    # A finished run returns its summary; a fresh run into the same directory without resume is refused.
    again = RewardModelTrainer(config, pairs).train()
    assert again["progress/accuracy"] == summary["progress/accuracy"]
    with pytest.raises(ConfigError, match="already has checkpoints"):
        RewardModelTrainer(_config(tmp_path, steps=60, resume=False), pairs).train()


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="'theta' must be > 1"):
        _config(tmp_path, theta=1.0)
    with pytest.raises(ConfigError, match="margin"):
        _config(tmp_path, margin=0.5, loss="bt_ties")
    with pytest.raises(ConfigError, match="noise_aware applies to image"):
        RewardModelTrainer(_config(tmp_path, noise_aware=True), _segment_set(20, seed=0))
    with pytest.raises(ValueError, match="unknown label dimension"):
        RewardModelTrainer(_config(tmp_path, dimensions=["aesthetics"]), _segment_set(20, seed=0))


def test_train_entry_point_runs_on_a_saved_set(tmp_path, one_thread):
    save_preferences(_segment_set(40, seed=1), tmp_path / "prefs")
    summary = train(_config(tmp_path, steps=3, batch_size=8))
    assert summary["steps"] == 3 and (tmp_path / "run" / "model" / "config.json").is_file()


# ------------------------------------------------------------------------------------ renderer pretraining
def test_perturbed_prompts_differ_in_one_respect():
    from rlflow.worlds.shapes.augmentation import _perturb_one

    spec = parse_prompt("a red circle to the left of a blue square")
    other = "two white triangles"
    # options for a position prompt: color, shape, other, swap_colors, relation, relation
    assert _perturb_one(spec, 0.0, 0.0, other) == "a green circle to the left of a blue square"
    assert _perturb_one(spec, 1 / 6, 0.9, other).startswith("a red circle to the left of a blue ")
    assert _perturb_one(spec, 2 / 6, 0.0, other) == other
    assert _perturb_one(spec, 3 / 6, 0.0, other) == "a blue circle to the left of a red square"
    relation = _perturb_one(spec, 4 / 6, 0.0, other)
    assert relation == "a red circle to the right of a blue square"
    # single-object prompts change their count instead of swapping colours
    assert _perturb_one(parse_prompt("a red circle"), 0.99, 0.0, other) == "two red circles"
    prompts = sample_prompts(200, torch.Generator().manual_seed(0))
    changed = perturb_prompts(prompts, torch.Generator().manual_seed(1))
    assert all(p != c for p, c in zip(prompts, changed, strict=True))
    for c in changed:
        parse_prompt(c)  # every perturbed prompt is in the grammar


def test_degrade_images_and_symmetry_augment():
    g = torch.Generator().manual_seed(0)
    images = render(["a red circle to the left of a green square"] * 4, g)
    torch.testing.assert_close(degrade_images(images, torch.zeros(4), g), images)
    heavy = degrade_images(images, torch.ones(4), g)
    assert heavy.min() >= 0 and heavy.max() <= 1 and (heavy - images).abs().mean() > 0.005
    # symmetries: flip + left/right, red/green channel swap + colour words; both members transformed alike
    torch.manual_seed(0)
    a, b, prompts = symmetry_augment(
        images, images.clone(), ["a red circle to the left of a green square"] * 4, g
    )
    torch.testing.assert_close(a, b)
    for x, original, prompt in zip(a, images, prompts, strict=True):
        expected, text = original, "a red circle to the left of a green square"
        if prompt in (
            "a red circle to the right of a green square",
            "a green circle to the right of a red square",
        ):
            expected, text = expected.flip(-1), text.replace("left", "right")
        if prompt.startswith("a green circle"):
            expected, text = (
                expected[[1, 0, 2]],
                "a green circle to the " + text.split("the ")[1].split(" of")[0] + " of a red square",
            )
        assert prompt == text
        torch.testing.assert_close(x, expected)
    assert len(set(prompts)) > 1


def test_pretraining_batch_and_stage_improve_renderer_comparisons(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    batch = pretraining_batch(8, g)
    assert batch.positive.shape == batch.negative.shape == batch.degraded.shape == (8, 3, 32, 32)
    assert len(batch.prompts) == 8
    pairs = _image_set(64, seed=0, size=32)
    config = _config(
        tmp_path,
        steps=2,
        pretrain_steps=40,
        pretrain_batch_size=16,
        pretrain_lr=3e-3,
        model={**TINY_IMAGE, "conv_channels": [8, 16], "stem_channels": 4},
        eval_steps=1,
        eval_train_pairs=0,
    )
    trainer = RewardModelTrainer(config, pairs)
    stage = trainer.renderer_pretraining
    objectives = stage.head_objectives()
    assert objectives == {0: "match", 1: "clean"}
    probe = pretraining_batch(64, torch.Generator().manual_seed(123))
    with torch.no_grad():
        loss_before, before = stage.step_loss(trainer.model, probe, objectives, torch.Generator())
    metrics = trainer.pretrain()
    with torch.no_grad():
        loss_after, after = stage.step_loss(trainer.model, probe, objectives, torch.Generator())
    # a few steps of a tiny model: degraded renders are already told apart; scores are still small
    assert loss_after < loss_before, (loss_before, loss_after)
    clean_before, clean_after = (
        before["pretrain/quality/clean_accuracy"],
        after["pretrain/quality/clean_accuracy"],
    )
    assert clean_before < 0.6 and clean_after > 0.75, (before, after)
    assert set(metrics) >= {"pretrain/loss", "pretrain/alignment/match_accuracy"}
    with pytest.raises(ConfigError, match="pretrain_objectives"):
        RewardModelTrainer(
            _config(tmp_path, pretrain_steps=1, pretrain_objectives={"nope": "match"}), pairs
        ).renderer_pretraining.head_objectives()


def test_optional_stem_coordinates_and_dropout_round_trip(tmp_path):
    config = RewardModelConfig(
        dimensions=["alignment", "quality"], stem_channels=4, coord_channels=True, dropout=0.2, **TINY_IMAGE
    )
    model = ImageRewardModel(config).eval()
    x, prompts = torch.rand(3, 3, 32, 32), ["a red circle", "two blue squares", ""]
    out = model(x, prompts)
    assert out.shape == (3, 2)
    loaded = load_reward_model(save_reward_model(model, tmp_path / "m"))
    assert loaded.config == config
    torch.testing.assert_close(loaded(x, prompts), out)  # eval mode: dropout is off
    # the coordinate maps make the score depend on where things are: a flipped image scores differently
    assert not torch.allclose(model(x.flip(-1), prompts), out)
    with pytest.raises(ValueError, match="dropout"):
        RewardModelConfig(dropout=1.0)


def test_clean_fraction_sets_that_share_of_training_times_to_one(tmp_path):
    from rlflow.flows import sample_training_times

    pairs = _image_set(32, seed=0)
    pairs.latents_a, pairs.latents_b = pairs.a * 2 - 1, pairs.b * 2 - 1
    plain = RewardModelTrainer(_config(tmp_path, noise_aware=True), pairs)
    # clean_fraction 0: exactly the time distribution's draws (no extra random numbers)
    torch.testing.assert_close(
        plain.training_times(500, torch.Generator().manual_seed(3)),
        sample_training_times(500, "uniform", generator=torch.Generator().manual_seed(3)),
    )
    mixed = RewardModelTrainer(_config(tmp_path, noise_aware=True, clean_fraction=0.3), pairs)
    t = mixed.training_times(4000, torch.Generator().manual_seed(3))
    assert (t == 1).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert ((t >= 0) & (t <= 1)).all()
    with pytest.raises(ConfigError, match="clean_fraction"):
        _config(tmp_path, clean_fraction=1.5)


# -------------------------------------------------------------------------------- transformer backbone
def _tiny_flow_model_dir(tmp_path, image_size: int = 16):
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model

    torch.manual_seed(0)
    config = tiny_shapes_config(image_size=image_size, num_layers=2)
    return save_shapes_model(build_shapes_model(config), tmp_path / "flow")


def test_transformer_reward_model_starts_from_the_flow_model_and_round_trips(tmp_path):
    from rlflow.reward_models.learned import TransformerRewardModel

    from rlflow.worlds.shapes.model import load_shapes_model

    flow_dir = _tiny_flow_model_dir(tmp_path)
    model = TransformerRewardModel.from_flow_model(flow_dir, ["alignment", "quality"], noise_aware=True)
    flow = load_shapes_model(flow_dir)
    backbone = dict(model.transformer.named_parameters())
    copied = 0
    for name, value in flow.transformer.named_parameters():
        if name.startswith(("norm_out.", "proj_out.")):
            assert name not in backbone  # the readout replaces the output layers
        else:
            torch.testing.assert_close(backbone[name], value)
            copied += 1
    assert copied > 10
    for name, value in flow.prompt_encoder.state_dict().items():
        torch.testing.assert_close(model.text_encoder.state_dict()[name], value)

    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    prompts = ["a red circle", "", "two blue squares"]
    path = model.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(path)
    assert type(loaded) is TransformerRewardModel and loaded.config.backbone["image_size"] == 16
    torch.testing.assert_close(loaded(x, prompts, t), model.eval()(x, prompts, t))
    # differentiable in x (guidance), and every parameter takes part in the score (DDP needs that)
    r, grad = reward_gradient(loaded, x, prompts, t, head="alignment")
    assert grad.shape == x.shape and grad.abs().sum() > 0
    loaded(x, prompts, t).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())
    with pytest.raises(ValueError, match="unknown word"):
        loaded(x, ["a red circle", "a mauve circle", ""], t)


def test_transformer_reward_model_trains_from_a_flow_model_and_scores_as_a_reward(tmp_path, one_thread):
    flow_dir = _tiny_flow_model_dir(tmp_path)
    save_preferences(_image_set(400, seed=0), tmp_path / "prefs")
    model = {"architecture": "transformer", "init_from": str(flow_dir), "hidden_dim": 32}
    trainer = RewardModelTrainer(_config(tmp_path, model=model, steps=120, learning_rate=2e-3))
    before = trainer.evaluate()
    summary = trainer.train()
    assert before["eval/alignment/accuracy"] < 0.7
    assert summary["alignment/accuracy"] > 0.8, summary
    assert summary["quality/accuracy"] > 0.8, summary
    reward = LearnedReward(summary["model_dir"], head="alignment")
    held = trainer.heldout_set
    wins = reward(held.a, held.prompts) > reward(held.b, held.prompts)
    assert (wins == (held.labels[:, 0] == A)).float().mean() == pytest.approx(
        summary["alignment/accuracy"], abs=0.02
    )

    with pytest.raises(ConfigError, match="needs model.init_from"):
        RewardModelTrainer(_config(tmp_path, model={"architecture": "transformer"}))
    wrong_size = _tiny_flow_model_dir(tmp_path / "other", image_size=32)
    with pytest.raises(ConfigError, match="preference set's world"):
        RewardModelTrainer(
            _config(tmp_path, model={"architecture": "transformer", "init_from": str(wrong_size)})
        )
