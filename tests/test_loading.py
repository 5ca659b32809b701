"""``rlflow.load_pretrained``: one function loads every kind of model directory rlflow writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlflow
from rlflow.config import ConfigError
from rlflow.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def test_a_shipped_robot_policy_loads_with_its_normalization():
    from rlflow.policies import FlowPolicy

    policy = rlflow.load_pretrained(ROOT / "recipes/robotics/artifacts/hopper_medium_flow")
    assert isinstance(policy, FlowPolicy) and not policy.training
    assert policy.normalization is not None  # the robot policy's obs / action statistics come with it
    assert policy.config.obs_dim == 11


def test_a_saved_reward_model_loads_as_itself(tmp_path):
    from rlflow.reward_models.learned import RewardModelConfig, SegmentRewardModel, save_reward_model

    model = SegmentRewardModel(
        RewardModelConfig(kind="segment", dimensions=["progress"], obs_dim=3, act_dim=2)
    )
    save_reward_model(model, tmp_path / "rm")
    loaded = rlflow.load_pretrained(tmp_path / "rm")
    assert isinstance(loaded, SegmentRewardModel) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_the_shipped_latent_world_models_load():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from rlflow.generators.diffusers_flow import DiffusersFlowModel

    base = rlflow.load_pretrained(ROOT / "recipes/alignment/artifacts/shapes_latent_base")
    assert isinstance(base, DiffusersFlowModel) and base.vae is not None
    vae = rlflow.load_pretrained(ROOT / "recipes/alignment/artifacts/shapes_vae")
    assert isinstance(vae, AutoencoderKL)


def test_a_fine_tune_directory_loads_through_its_base(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from rlflow.generators.diffusers_flow import DiffusersFlowModel
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model

    torch.manual_seed(0)
    base = build_shapes_model(tiny_shapes_config())
    save_shapes_model(base, tmp_path / "base")
    tuned = rlflow.load_pretrained(tmp_path / "base")
    tuned.add_lora(4, 4.0)
    tuned.save_pretrained(tmp_path / "tuned")
    assert (
        json.loads((tmp_path / "tuned" / "config.json").read_text())["model_type"]
        == "rlflow.DiffusersFineTune"
    )
    again = rlflow.load_pretrained(tmp_path / "tuned")
    assert isinstance(again, DiffusersFlowModel) and again.has_lora


def test_unknown_and_missing_directories_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        rlflow.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="rlflow.FlowPolicy"):  # lists the model types it knows
        rlflow.load_pretrained(tmp_path / "notes")
    (tmp_path / "notes" / "config.json").write_text('{"model_type": "rlflow.FlowPolicy", "con')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rlflow.load_pretrained(tmp_path / "notes")


def test_every_native_model_writes_the_one_format(tmp_path):
    """Policies, reward models, shapes models and fine-tunes: config.json {model_type, format_version,
    config} + safetensors + a model card."""
    pytest.importorskip("diffusers")
    from rlflow.reward_models.learned import ImageRewardModel, RewardModelConfig

    from rlflow.policies import FlowPolicy, FlowPolicyConfig
    from rlflow.testing import tiny_shapes_config
    from rlflow.utils.model_format import FORMAT_VERSION, MODEL_TYPES
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model

    FlowPolicy(FlowPolicyConfig(obs_dim=3, act_dim=2, hidden_dims=[8])).save_pretrained(tmp_path / "policy")
    ImageRewardModel(RewardModelConfig(image_size=8, conv_channels=[4])).save_pretrained(tmp_path / "rm")
    shapes = build_shapes_model(tiny_shapes_config())
    save_shapes_model(shapes, tmp_path / "shapes")
    shapes.base_model = str(tmp_path / "shapes")
    shapes.save_pretrained(tmp_path / "tune")  # no LoRA: a full fine-tune
    seen = set()
    for name in ("policy", "rm", "shapes", "tune"):
        meta = json.loads((tmp_path / name / "config.json").read_text())
        assert (
            set(meta) == {"model_type", "format_version", "config"}
            and meta["format_version"] == FORMAT_VERSION
        )
        assert (tmp_path / name / "README.md").is_file()
        assert list((tmp_path / name).rglob("*.safetensors"))
        seen.add(meta["model_type"])
        assert type(rlflow.load_pretrained(tmp_path / name)).__name__ in (
            "FlowPolicy",
            "ImageRewardModel",
            "DiffusersFlowModel",
        )
    assert seen == set(MODEL_TYPES) - {"rlflow.GaussianPolicy"}


def test_directories_in_the_formats_before_it_still_load(tmp_path):
    """rlflow_model.json (shapes models), rlflow_diffusers.json (fine-tunes) and the flat reward-model
    config.json of earlier versions load, and saving into such a directory leaves only the new file."""
    pytest.importorskip("diffusers")
    from rlflow.reward_models.learned import ImageRewardModel, RewardModelConfig, load_reward_model

    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, load_shapes_model, save_shapes_model

    def downgrade(directory: Path, name: str, legacy: dict) -> None:
        (directory / "config.json").unlink()
        (directory / name).write_text(json.dumps(legacy))

    shapes = build_shapes_model(tiny_shapes_config())
    save_shapes_model(shapes, tmp_path / "shapes")
    meta = json.loads((tmp_path / "shapes" / "config.json").read_text())
    downgrade(
        tmp_path / "shapes", "rlflow_model.json", {"model_type": "shapes_t2i", "config": meta["config"]}
    )
    old = load_shapes_model(tmp_path / "shapes")
    save_shapes_model(old, tmp_path / "shapes")  # re-saving migrates it
    assert not (tmp_path / "shapes" / "rlflow_model.json").exists()
    assert (tmp_path / "shapes" / "config.json").is_file()

    shapes.base_model = str(tmp_path / "shapes")
    shapes.save_pretrained(tmp_path / "tune")
    meta = json.loads((tmp_path / "tune" / "config.json").read_text())
    downgrade(
        tmp_path / "tune",
        "rlflow_diffusers.json",
        {"format": "rlflow.diffusers_flow", "version": 1, **meta["config"]},
    )
    assert rlflow.load_pretrained(tmp_path / "tune").base_model == str(tmp_path / "shapes")

    model = ImageRewardModel(RewardModelConfig(image_size=8, conv_channels=[4]))
    model.save_pretrained(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(
        json.dumps({"format": "rlflow-reward-model", "version": 1, **meta["config"]})
    )
    assert load_reward_model(tmp_path / "rm").config == model.config


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    from rlflow.policies import FlowPolicy, FlowPolicyConfig

    FlowPolicy(FlowPolicyConfig(obs_dim=3, act_dim=2, hidden_dims=[8])).save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer rlflow.*upgrade rlflow"):
        rlflow.load_pretrained(tmp_path / "p")
