"""FlowPolicy save_pretrained / from_pretrained: exact round trip and clear errors on bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from rlflow.policies import FlowPolicy, FlowPolicyConfig
from rlflow.policies.gaussian import GaussianPolicy, GaussianPolicyConfig
from rlflow.utils.checkpoint import CheckpointError


def _policy():
    torch.manual_seed(0)
    policy = FlowPolicy(FlowPolicyConfig(act_dim=3, horizon=2, obs_dim=5, hidden_dims=[32, 32], num_steps=3))
    torch.nn.init.normal_(policy.noise_std.net.output.weight)
    return policy


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    policy = _policy()
    policy.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config == policy.config
    obs = torch.randn(16, 5)
    a = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(obs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.chain, b.chain) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(loaded.log_prob(a), policy.log_prob(a))
    for key, value in policy.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_overrides_change_the_sampler_not_the_weights(tmp_path):
    _policy().save_pretrained(tmp_path / "p")
    loaded = FlowPolicy.from_pretrained(tmp_path / "p", kernel="flow_sde", num_steps=10)
    assert loaded.config.kernel == "flow_sde"
    assert loaded.sample(torch.randn(2, 5)).log_probs.shape == (2, 10)


def test_save_replaces_an_existing_checkpoint_atomically(tmp_path):
    policy = _policy()
    policy.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        policy.velocity_net.output.bias.add_(1.0)
    policy.save_pretrained(tmp_path / "p")
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temp directories left behind
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.velocity_net.output.bias, policy.velocity_net.output.bias)


def test_truncated_weights_give_a_clear_error(tmp_path):
    _policy().save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        FlowPolicy.from_pretrained(tmp_path / "p")


def test_garbage_weights_give_a_clear_error(tmp_path):
    _policy().save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        FlowPolicy.from_pretrained(tmp_path / "p")


def test_corrupt_config_gives_a_clear_error(tmp_path):
    _policy().save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        FlowPolicy.from_pretrained(tmp_path / "p")


def test_config_that_does_not_match_the_weights(tmp_path):
    _policy().save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["hidden_dims"] = [64, 32]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"velocity_net\.hidden\.0\.weight"):
        FlowPolicy.from_pretrained(tmp_path / "p")


def test_not_a_policy_directory(tmp_path):
    with pytest.raises(CheckpointError, match="missing does not exist"):
        FlowPolicy.from_pretrained(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        FlowPolicy.from_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "something_else"}))
    with pytest.raises(CheckpointError, match="model_type='something_else' .not an rlflow model., not a flow-matching"):
        FlowPolicy.from_pretrained(tmp_path / "other")
    GaussianPolicy(GaussianPolicyConfig(obs_dim=3, act_dim=2)).save_pretrained(tmp_path / "gaussian")
    with pytest.raises(CheckpointError, match="holds rlflow.GaussianPolicy"):
        FlowPolicy.from_pretrained(tmp_path / "gaussian")
