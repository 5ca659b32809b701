"""``rlflow.load_pretrained``: one function loads every kind of model directory rlflow writes."""

from __future__ import annotations

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
    assert (tmp_path / "tuned" / "rlflow_diffusers.json").is_file()
    again = rlflow.load_pretrained(tmp_path / "tuned")
    assert isinstance(again, DiffusersFlowModel) and again.has_lora


def test_unknown_and_missing_directories_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        rlflow.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="rlflow_diffusers.json"):
        rlflow.load_pretrained(tmp_path / "notes")
