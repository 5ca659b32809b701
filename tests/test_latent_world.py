"""The latent shapes world: held-out evaluation prompts, accuracy with standard errors, the VAE and its trainer,
latent-space shapes models (save/load, the SD3 decode path) and latent pretraining."""

from __future__ import annotations

import math

import pytest
import torch

from rlflow.config import ConfigError, config_from_dict
from rlflow.rollout.prompts import FilePrompts, accuracy_metrics
from rlflow.testing import TINY_SHAPES_SIZES
from rlflow.worlds.shapes.prompts import (
    CATEGORIES,
    HELD_OUT_PAIRS,
    ShapesPrompts,
    all_prompts,
    heldout_eval_prompts,
    is_held_out,
    parse_prompt,
    prompts_by_category,
    sample_prompts,
)
from rlflow.worlds.shapes.render import shapes_batches

TINY_VAE = {"image_size": 32, "block_out_channels": [8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}


# ------------------------------------------------------------------------------------------ held-out prompts
def test_training_prompts_never_hold_a_held_out_pair_and_cover_every_category():
    prompts = sample_prompts(3000, torch.Generator().manual_seed(0), include_held_out=False)
    assert not any(is_held_out(p) for p in prompts)
    assert {parse_prompt(p).category for p in prompts} == set(CATEGORIES)
    # Every colour and every shape still appears in training with some partner.
    seen = {(o.color, o.shape) for p in prompts for o in parse_prompt(p).objects}
    assert {c for c, _ in seen} == {c for c, _ in HELD_OUT_PAIRS} | {"yellow", "white"}
    assert {s for _, s in seen} == {"circle", "square", "triangle"}


def test_heldout_eval_set_is_256_distinct_held_out_prompts_over_all_categories():
    prompts = heldout_eval_prompts()
    assert len(set(prompts)) == 256
    assert all(is_held_out(p) for p in prompts)
    counts = {c: sum(parse_prompt(p).category == c for p in prompts) for c in CATEGORIES}
    distinct = {c: len({p for p in prompts if parse_prompt(p).category == c}) for c in CATEGORIES}
    assert distinct == {"single": 3, "counting": 6, "two_objects": 78, "position": 169}
    # small categories repeat their prompts (each copy gets its own noise) to 128 images
    assert counts == {"single": 128, "counting": 128, "two_objects": 128, "position": 169}
    assert prompts == heldout_eval_prompts()  # fixed
    held = [p for p in all_prompts() if is_held_out(p)]
    assert len(held) == 399
    with pytest.raises(ValueError, match="num_prompts"):
        heldout_eval_prompts(400)


def test_shapes_prompt_source_trains_apart_from_its_evaluation_prompts():
    source = ShapesPrompts(num_eval=64)
    evaluation = set(source.eval_prompts())
    drawn = source.sample(500, torch.Generator().manual_seed(1))
    assert not evaluation & set(drawn)
    assert not source.overlaps_training()
    assert ShapesPrompts(held_out=False).overlaps_training()


def test_prompt_split_holds_out_a_quarter_of_each_category_with_every_pair_in_training():
    held = {c: [p for p in group if is_held_out(p, "prompts")] for c, group in prompts_by_category().items()}
    assert {c: len(v) for c, v in held.items()} == {
        "single": 4,
        "counting": 8,
        "two_objects": 53,
        "position": 210,
    }
    training = sample_prompts(4000, torch.Generator().manual_seed(0), include_held_out=False, split="prompts")
    assert not any(is_held_out(p, "prompts") for p in training)
    assert {parse_prompt(p).category for p in training} == set(CATEGORIES)
    # unlike the "pairs" split, every colour-shape pair of the grammar occurs in training
    pairs = {(o.color, o.shape) for p in training for o in parse_prompt(p).objects}
    assert set(HELD_OUT_PAIRS) <= pairs and len(pairs) == 15
    evaluation = heldout_eval_prompts(split="prompts")
    assert len(set(evaluation)) == 256 and all(is_held_out(p, "prompts") for p in evaluation)
    distinct = {c: len({p for p in evaluation if parse_prompt(p).category == c}) for c in CATEGORIES}
    assert distinct == {"single": 4, "counting": 8, "two_objects": 53, "position": 191}
    assert evaluation == heldout_eval_prompts(split="prompts")  # fixed
    source = ShapesPrompts(num_eval=256, split="prompts")
    assert not set(source.eval_prompts()) & set(source.sample(2000, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="held-out split 'colours'.*pairs, prompts"):
        ShapesPrompts(split="colours")


def test_trainer_prompt_source_names_pick_the_split():
    from rlflow.rollout.prompts import build_prompt_source
    from rlflow.trainers.grpo import GRPOConfig

    assert build_prompt_source(config_from_dict(GRPOConfig, {})).split == "pairs"
    source = build_prompt_source(config_from_dict(GRPOConfig, {"prompts": "shapes_prompt_split"}))
    assert source.split == "prompts" and not source.overlaps_training()


def test_file_prompts_held_out_refuses_a_file_with_no_training_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="allow_eval_overlap"):
        FilePrompts(str(path), num_eval=3, held_out=True)
    path.write_text("a\nb\nc\na\n")
    with pytest.raises(ValueError, match="repeat"):
        FilePrompts(str(path), num_eval=2, held_out=True)
    path.write_text("a\nb\nc\nd\n")
    source = FilePrompts(str(path), num_eval=2, held_out=True)
    assert source.eval_prompts() == ["a", "b"]
    assert set(source.sample(50, torch.Generator().manual_seed(0))) <= {"c", "d"}


@pytest.mark.parametrize("command", ["grpo", "rwr", "dpo"])
def test_trainers_refuse_overlapping_evaluation_prompts_unless_allowed(command):
    from rlflow.cli import COMMANDS, _load
    from rlflow.rollout.prompts import build_prompt_source

    config_class = _load(COMMANDS[command].config)
    config = config_from_dict(config_class, {"prompts": "shapes_all"}, source="test")
    with pytest.raises(ConfigError, match="allow_eval_overlap"):
        build_prompt_source(config)
    allowed = config_from_dict(
        config_class, {"prompts": "shapes_all", "allow_eval_overlap": True}, source="t"
    )
    assert build_prompt_source(allowed).overlaps_training()
    assert not build_prompt_source(config_from_dict(config_class, {}, source="t")).overlaps_training()


# ------------------------------------------------------------------------------------------ accuracy metrics
def test_accuracy_metrics_by_hand():
    correct = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    categories = ["a", "a", "b", "b", "b", "b"]
    m = accuracy_metrics(correct, categories)
    assert m["eval/accuracy/a"] == 0.5 and m["eval/accuracy/b"] == 0.5
    assert m["eval/accuracy"] == pytest.approx(0.5)
    assert m["eval/accuracy_micro"] == pytest.approx(0.5)
    se_a, se_b = math.sqrt(0.25 / 2), math.sqrt(0.25 / 4)
    assert m["eval/accuracy_stderr/a"] == pytest.approx(se_a)
    assert m["eval/accuracy_stderr"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)
    # Macro (GenEval) and micro means differ when categories have different sizes.
    m = accuracy_metrics(torch.tensor([1.0, 0.0, 0.0, 0.0]), ["a", "b", "b", "b"])
    assert m["eval/accuracy"] == pytest.approx(0.5) and m["eval/accuracy_micro"] == pytest.approx(0.25)
    plain = accuracy_metrics(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert plain == {"eval/accuracy": 0.5, "eval/accuracy_stderr": pytest.approx(0.25)}


# ------------------------------------------------------------------------------------------ the VAE
@pytest.fixture(scope="module")
def tiny_vae():
    from rlflow.worlds.shapes.vae import ShapesVAEConfig, build_shapes_vae

    torch.manual_seed(0)
    return build_shapes_vae(ShapesVAEConfig(**TINY_VAE)).eval()


def test_calibration_gives_unit_scale_latents_and_encode_inverts_the_pipeline_decode_path(tiny_vae):
    import copy

    from rlflow.generators.families import SD3Family
    from rlflow.worlds.shapes.vae import calibrate_latent_scale, encode_images

    vae = copy.deepcopy(tiny_vae)
    images, _ = next(shapes_batches(64, torch.Generator().manual_seed(0)))
    shift, scale = calibrate_latent_scale(vae, images)
    assert vae.config.shift_factor == shift and vae.config.scaling_factor == scale
    with torch.no_grad():
        latents = encode_images(vae, images)
        assert latents.shape == (64, 4, 8, 8)
        assert abs(float(latents.mean())) < 1e-4 and float(latents.std()) == pytest.approx(1.0, rel=1e-4)
        # The SD3 pipeline's decode (latents / scale + shift -> vae.decode) sees the raw posterior mean.
        decoded = SD3Family().decode(vae, latents)
        direct = (vae.decode(vae.encode(images).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, direct, atol=1e-5, rtol=1e-5)


def test_latent_shapes_model_saves_and_loads_with_its_vae(tmp_path, tiny_vae):
    from rlflow.generators.loading import load_text_to_image_model
    from rlflow.worlds.shapes.model import (
        ShapesModelConfig,
        build_shapes_model,
        load_shapes_model,
        save_shapes_model,
    )

    config = ShapesModelConfig(
        **{**TINY_SHAPES_SIZES, "image_size": 8, "channels": 4, "patch_size": 2, "latent_space": "vae"}
    )
    model = build_shapes_model(config, vae=tiny_vae)
    save_shapes_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "vae" / "config.json").is_file()
    loaded = load_shapes_model(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert load_text_to_image_model(tmp_path / "m").vae is not None
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert loaded.decode(latents).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="needs a VAE"):
        build_shapes_model(config)
    with pytest.raises(ValueError, match="channels"):
        build_shapes_model(ShapesModelConfig(**{**TINY_SHAPES_SIZES, "latent_space": "vae"}), vae=tiny_vae)


# ------------------------------------------------------------------------------------------ training
def _vae_config(tmp_path, **overrides):
    from rlflow.trainers.vae_pretrain import VAEPretrainConfig

    data = {
        "output_dir": str(tmp_path / "vae"),
        "num_threads": 1,
        "vae": TINY_VAE,
        "steps": 30,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "logging_steps": 5,
        "eval_steps": 1000,
        "eval_images": 16,
        "calibration_images": 64,
        "grid_size": 4,
        "save_steps": 10,
        "report_to": "none",
        **overrides,
    }
    return config_from_dict(VAEPretrainConfig, data, source="test")


def test_vae_training_lowers_the_reconstruction_error_and_saves_a_calibrated_diffusers_vae(tmp_path):
    from rlflow.trainers.vae_pretrain import VAEPretrainTrainer
    from rlflow.worlds.shapes.vae import load_shapes_vae

    trainer = VAEPretrainTrainer(_vae_config(tmp_path))
    before = trainer.evaluate()["eval/mse"]
    summary = trainer.train()
    assert summary["mse"] < 0.7 * before
    assert 0.0 <= summary["verifier_accuracy"] <= 1.0
    vae = load_shapes_vae(tmp_path / "vae" / "final")
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert (tmp_path / "vae" / "plots" / "reconstructions.png").is_file()


def test_latent_pretraining_learns_from_cached_latents_and_refuses_a_missing_vae(tmp_path):
    from rlflow.trainers.t2i_pretrain import T2IPretrainConfig, T2IPretrainTrainer
    from rlflow.trainers.vae_pretrain import VAEPretrainTrainer

    VAEPretrainTrainer(_vae_config(tmp_path, steps=4, save_steps=4)).train()
    model = {**TINY_SHAPES_SIZES, "image_size": 8, "channels": 4, "patch_size": 2, "latent_space": "vae"}
    data = {
        "output_dir": str(tmp_path / "t2i"),
        "num_threads": 1,
        "vae_path": str(tmp_path / "vae" / "final"),
        "model": model,
        "steps": 25,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "logging_steps": 5,
        "eval_steps": 1000,
        "eval_prompts": 8,
        "eval_num_steps": 3,
        "eval_loss_samples": 32,
        "grid_size": 4,
        "save_steps": 1000,
        "latent_cache_size": 200,
        "report_to": "none",
        "plot_curves": False,
    }
    trainer = T2IPretrainTrainer(config_from_dict(T2IPretrainConfig, data, source="test"))
    before = trainer.fixed_batch_loss(trainer.model)
    summary = trainer.train()
    assert trainer.fixed_batch_loss(trainer.model) < 0.8 * before
    assert "accuracy_stderr" in summary and "accuracy/position" in summary
    assert (tmp_path / "t2i" / "final" / "vae" / "config.json").is_file()
    with pytest.raises(ConfigError, match="vae_path"):
        config_from_dict(T2IPretrainConfig, {**data, "vae_path": None}, source="test")
    with pytest.raises(ConfigError, match="latent_space"):
        config_from_dict(T2IPretrainConfig, {**data, "model": TINY_SHAPES_SIZES}, source="test")


# ------------------------------------------------------------------------------------------ reward models
def test_noise_aware_reward_model_of_the_latent_world_scores_latents_and_pretrains_on_encoded_renders(
    tmp_path, tiny_vae
):
    """A latent world's preference set holds 32 px images and 4x8x8 VAE latents: the noise-aware model takes
    the latents, its renderer pretraining encodes 32 px renders with the set's VAE, and the pixel
    symmetries (which do not act on VAE latents) and a set without its model are refused."""
    from rlflow.data.preferences import PreferenceSet
    from rlflow.trainers.reward_model import RewardModelTrainConfig, RewardModelTrainer
    from rlflow.worlds.shapes.model import ShapesModelConfig, build_shapes_model, save_shapes_model
    from rlflow.worlds.shapes.vae import encode_images

    config = ShapesModelConfig(
        **{**TINY_SHAPES_SIZES, "image_size": 8, "channels": 4, "patch_size": 2, "latent_space": "vae"}
    )
    save_shapes_model(build_shapes_model(config, vae=tiny_vae), tmp_path / "base")
    images, prompts = next(shapes_batches(16, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        latents = encode_images(tiny_vae, images * 2 - 1)
    pairs = PreferenceSet(
        kind="image",
        dimensions=["alignment"],
        prompts=list(prompts[:8]),
        a=images[:8],
        b=images[8:],
        labels=torch.zeros(8, 1, dtype=torch.long),
        latents_a=latents[:8],
        latents_b=latents[8:],
        meta={"model_path": str(tmp_path / "base")},
    )
    data = {
        "data_dir": str(tmp_path / "prefs"),
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "noise_aware": True,
        "symmetry_augment": False,
        "model": {"conv_channels": [8], "hidden_dim": 16, "text_dim": 8, "text_buckets": 64, "time_dim": 8},
        "pretrain_steps": 1,
        "pretrain_batch_size": 4,
        "steps": 2,
        "batch_size": 4,
        "warmup_steps": 0,
        "heldout_fraction": 0.25,
        "report_to": "none",
    }
    trainer = RewardModelTrainer(config_from_dict(RewardModelTrainConfig, data, source="test"), pairs)
    assert (trainer.model_config.channels, trainer.model_config.image_size) == (4, 8)
    assert trainer.pretrain_vae is not None and trainer.render_size == 32
    seen = []
    forward = trainer.model.forward
    trainer.model.forward = lambda x, p, t=None: seen.append(tuple(x.shape)) or forward(x, p, t)
    trainer.pretrain()
    assert seen == [(12, 4, 8, 8)]  # positive, negative and degraded renders, encoded
    with pytest.raises(ConfigError, match="symmetry_augment"):
        RewardModelTrainer(
            config_from_dict(RewardModelTrainConfig, {**data, "symmetry_augment": True}, source="test"), pairs
        )
    pairs.meta = {}
    with pytest.raises(ConfigError, match="model_path"):
        RewardModelTrainer(config_from_dict(RewardModelTrainConfig, data, source="test"), pairs)
