"""Model cards (README.md with Hub front matter) written by every save, and push_to_hub (the Hub replaced)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
import yaml

from rlflow.cli import COMMANDS, main
from rlflow.config import ConfigError, config_from_dict, config_to_dict
from rlflow.policies import FlowPolicy, FlowPolicyConfig
from rlflow.utils.model_card import HubError, ModelCardInfo, push_folder_to_hub, read_front_matter

TRAINERS = (
    "pretrain",
    "pretrain-t2i",
    "pretrain-vae",
    "ppo",
    "grpo",
    "nft",
    "dpo",
    "rwr",
    "actor-critic",
    "reward-model",
)


def _front_matter(directory: Path) -> dict:
    """The YAML between the first two '---' lines of directory/README.md."""
    text = (directory / "README.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    data = yaml.safe_load("\n".join(lines[1:end]))
    assert data == read_front_matter(text)
    return data


def _yaml_block(text: str, heading: str) -> dict:
    """The ```yaml block that follows ``heading`` in a card's body."""
    section = text.split(f"## {heading}", 1)[1]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def _policy(obs_dim: int = 3) -> FlowPolicy:
    torch.manual_seed(0)
    return FlowPolicy(FlowPolicyConfig(obs_dim=obs_dim, act_dim=2, hidden_dims=[8]))


@pytest.fixture()
def hub(monkeypatch):
    """huggingface_hub with a token and its network calls recorded instead of made."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        # What would be uploaded: the folder's files at the time of the call.
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", {**kwargs, "files": files}))

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


# ------------------------------------------------------------------------------------------- the card
def test_a_plain_save_writes_a_minimal_card(tmp_path):
    directory = _policy().save_pretrained(tmp_path / "policy")
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    data = _front_matter(directory)
    assert data["library_name"] == "rlflow"
    assert {"rlflow", "flow-matching"} <= set(data["tags"])
    assert data["pipeline_tag"] == "reinforcement-learning"  # a policy acting on observations
    assert "method" not in data and "final_metrics" not in data  # nothing known about its training
    text = (directory / "README.md").read_text()
    assert "from rlflow.policies.loading import load_policy" in text
    assert f'load_policy("{directory.as_posix()}")' in text
    assert _yaml_block(text, "Model config")["obs_dim"] == 3
    # An unconditional model is not a robot policy.
    assert "pipeline_tag" not in _front_matter(_policy(obs_dim=0).save_pretrained(tmp_path / "toy"))


def test_a_card_with_training_info_shows_method_metrics_reward_and_recipe(tmp_path):
    recipe = {"learning_rate": 0.001, "rewards": {"remote": {"url": "http://x", "token": "s3cret"}}}
    info = ModelCardInfo(
        method="grpo",
        base_model="stabilityai/stable-diffusion-3.5-medium",
        reward=recipe["rewards"],
        metrics={"final_accuracy": 0.5, "base_accuracy": 0.25},
        training={"iterations": 40, "wall_seconds": 200.0},
        recipe=recipe,
        tags=["grpo", "reinforcement-learning"],
    )
    directory = _policy().save_pretrained(tmp_path / "policy", card=info)
    data = _front_matter(directory)
    assert data["library_name"] == "rlflow" and data["method"] == "grpo"
    assert data["final_metrics"] == {"final_accuracy": 0.5, "base_accuracy": 0.25}
    assert data["base_model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert {"rlflow", "grpo", "reinforcement-learning"} <= set(data["tags"])
    assert data["reward"] == {"remote": {"url": "http://x", "token": "<redacted>"}}
    text = (directory / "README.md").read_text()
    assert "s3cret" not in text  # a card is meant to be published
    assert _yaml_block(text, "Training recipe") == {
        "learning_rate": 0.001,
        "rewards": {"remote": {"url": "http://x", "token": "<redacted>"}},
    }
    assert "| final_accuracy | 0.5 |" in text and "40 iterations" in text and "3.3 min" in text
    # A local base model is named in the body only: the Hub rejects a base_model that is not a repo id.
    info.base_model = str(tmp_path)
    directory = _policy().save_pretrained(tmp_path / "policy", card=info)
    assert "base_model" not in _front_matter(directory)
    assert str(tmp_path) in (directory / "README.md").read_text()


def test_saves_keep_the_users_files_and_replace_their_own_card(tmp_path):
    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me\n")
    _policy().save_pretrained(directory, card=ModelCardInfo(method="pretrain"))
    _policy().save_pretrained(directory, card=ModelCardInfo(method="reinflow"))  # over our own card
    assert (directory / "notes.txt").read_text() == "keep me\n"
    assert _front_matter(directory)["method"] == "reinflow"
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]

    # A README.md that is not an rlflow card is the user's: kept, and no card is written over it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("---\nlicense: mit\n---\nmy notes\n")
    _policy().save_pretrained(mine)
    assert (mine / "README.md").read_text() == "---\nlicense: mit\n---\nmy notes\n"
    assert FlowPolicy.from_pretrained(mine).config.obs_dim == 3


def test_reward_model_and_shapes_saves_write_cards(tmp_path):
    from rlflow.reward_models.learned import RewardModelConfig, build_reward_model

    model = build_reward_model(RewardModelConfig(kind="segment", obs_dim=3, act_dim=1))
    data = _front_matter(model.save_pretrained(tmp_path / "rm"))
    assert data["library_name"] == "rlflow" and "reward-model" in data["tags"]
    assert "load_reward_model(" in (tmp_path / "rm" / "README.md").read_text()

    pytest.importorskip("diffusers")
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model

    torch.manual_seed(0)
    shapes = build_shapes_model(tiny_shapes_config(image_size=8, patch_size=4))
    data = _front_matter(save_shapes_model(shapes, tmp_path / "shapes"))
    assert data["pipeline_tag"] == "text-to-image" and "flow-matching" in data["tags"]
    assert "load_text_to_image_model(" in (tmp_path / "shapes" / "README.md").read_text()


# --------------------------------------------------------------------------------------- push_to_hub
def test_push_folder_to_hub_uploads_the_folder_with_its_card(tmp_path, hub):
    directory = _policy().save_pretrained(tmp_path / "policy")
    url = push_folder_to_hub(directory, "me/toy-policy", "rlflow pretrain: run")
    assert url == "https://huggingface.co/me/toy-policy"
    (_, created), (_, uploaded) = hub
    assert created["repo_id"] == "me/toy-policy" and created["exist_ok"] is True
    assert uploaded["repo_id"] == "me/toy-policy"
    assert Path(uploaded["folder_path"]) == directory
    assert "README.md" in uploaded["files"]
    assert uploaded["commit_message"] == "rlflow pretrain: run"


def test_push_failures_are_one_line_and_keep_the_local_model(tmp_path, hub, monkeypatch):
    import huggingface_hub

    directory = _policy().save_pretrained(tmp_path / "policy")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def unreachable(self, **kwargs):
        raise OSError("Failed to resolve 'huggingface.co'\n(Name or service not known)")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", unreachable)
    with pytest.raises(HubError) as error:
        push_folder_to_hub(directory, "me/toy-policy", "message")
    message = str(error.value)
    assert "\n" not in message and "me/toy-policy" in message and str(directory) in message
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line, exit status 2

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="no Hugging Face token"):
        push_folder_to_hub(directory, "me/toy-policy", "message")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


@pytest.mark.parametrize("command", TRAINERS)
def test_every_trainer_config_has_the_hub_fields(command):
    module, _, name = COMMANDS[command].config.partition(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match="push_to_hub: true needs hub_model_id"):
        config_from_dict(cls, {"push_to_hub": True})
    with pytest.raises(ConfigError, match="not a Hub repository id"):
        config_from_dict(cls, {"hub_model_id": "not a repo"})
    config = config_from_dict(cls, {"push_to_hub": True, "hub_model_id": "me/model"})
    assert config.push_to_hub and config.hub_model_id == "me/model"


def test_cli_push_to_hub_without_hub_model_id_is_a_one_line_error(capsys):
    assert main(["pretrain", "--push_to_hub", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "push_to_hub" in err and "hub_model_id" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------ a trainer's card
def test_pretrain_run_writes_a_card_with_its_final_metrics_and_pushes_it(tmp_path, hub, monkeypatch):
    import huggingface_hub

    from rlflow.trainers.pretrain import PretrainTrainer
    from tests.test_pretrain import _config

    config = _config(
        tmp_path, steps=4, batch_size=16, eval_samples=64, push_to_hub=True, hub_model_id="me/toy"
    )
    summary = PretrainTrainer(config).train()
    policy_dir = Path(summary["policy_dir"])
    data = _front_matter(policy_dir)
    assert data["method"] == "pretrain" and "pretrain" in data["tags"]
    for key in ("sliced_w2", "sliced_w2_data_floor", "fm_loss"):
        assert data["final_metrics"][key] == pytest.approx(summary[key])
    assert "steps" not in data["final_metrics"]  # a fact about the run, not a metric
    text = (policy_dir / "README.md").read_text()
    assert _yaml_block(text, "Training recipe") == config_to_dict(config)
    assert 'load_policy(snapshot_download("me/toy"))' in text
    assert "4 steps" in text
    # Pushed after the local save: the policy folder, card included.
    (_, created), (_, uploaded) = hub
    assert created["repo_id"] == "me/toy" and Path(uploaded["folder_path"]) == policy_dir
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])

    # A failed upload stops with one line naming the complete local folder; rerunning the finished run
    # only retries the upload.
    def refused(self, **kwargs):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refused)
    with pytest.raises(HubError, match="rerun the same command"):
        PretrainTrainer(config).train()
    assert (policy_dir / "model.safetensors").is_file() and (tmp_path / "run" / "summary.json").is_file()
