"""Shared flow objectives: per-sample flow-matching errors, ODE sampling, online groups, model preparation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from rlflow.reward_models.combine import WeightedRewards  # noqa: E402

from rlflow.generators.families import PromptEmbeddings  # noqa: E402
from rlflow.testing import tiny_shapes_config  # noqa: E402
from rlflow.trainers.flow_objectives import flow_matching_errors, ode_sample, sample_groups  # noqa: E402
from rlflow.trainers.text_to_image import ModelConfig, prepare_model  # noqa: E402
from rlflow.worlds.shapes.model import build_shapes_model  # noqa: E402


def tiny_shapes_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_shapes_model(tiny_shapes_config())


class ScaledState:
    """``v(x, t, c) = 2 x``: a velocity whose error is easy to compute by hand."""

    latent_shape = (2,)

    def velocity(self, x, t, cond):
        return 2.0 * x


class ConstantVelocity(torch.nn.Module):
    """``v = c(prompt)``: the Euler ODE from ``x0`` ends exactly at ``x0 + c`` for any grid."""

    latent_shape = (1, 2, 2)

    def encode_prompts(self, prompts):
        values = torch.tensor([float(len(p)) for p in prompts])
        return PromptEmbeddings(hidden_states=values[:, None, None], pooled=values[:, None])

    def velocity(self, x, t, cond):
        return cond.pooled.reshape(-1, 1, 1, 1).expand_as(x)

    def decode(self, latents):
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def test_flow_matching_errors_by_hand():
    x1 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    noise = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    t = torch.tensor([0.5, 0.25])
    # Row 0: x_t = 0.5 * [0, 1] + 0.5 * [1, 2] = [0.5, 1.5]; target x1 - x0 = [1, 1]; v = 2 x_t = [1, 3]:
    # squared error [0, 4]. Row 1: x_t = 0.75 * [1, -1] = [0.75, -0.75]; target [-1, 1]; v = [1.5, -1.5]:
    # squared error [6.25, 6.25].
    mean = flow_matching_errors(ScaledState(), x1, None, t, noise, "mean")
    total = flow_matching_errors(ScaledState(), x1, None, t, noise, "sum")
    torch.testing.assert_close(mean, torch.tensor([2.0, 6.25]))
    torch.testing.assert_close(total, torch.tensor([4.0, 12.5]))
    with pytest.raises(ValueError, match="reduction"):
        flow_matching_errors(ScaledState(), x1, None, t, noise, "max")
    with pytest.raises(ValueError, match="t must have shape"):
        flow_matching_errors(ScaledState(), x1, None, t[:1], noise)


def test_ode_sample_is_exact_for_constant_velocity_and_chunk_invariant():
    model = ConstantVelocity()
    prompts = ["a", "bb", "ccc"]
    out = ode_sample(model, prompts, num_steps=4, time_shift=3.0, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = noise + torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    torch.testing.assert_close(out, expected)
    chunked = ode_sample(
        model, prompts, num_steps=4, time_shift=3.0, generator=torch.Generator().manual_seed(1), chunk_size=1
    )
    torch.testing.assert_close(chunked, out)


def test_sample_groups_shapes_rewards_and_components():
    model = ConstantVelocity()

    def brightness(images, prompts):
        return images.flatten(1).mean(1)

    reward = WeightedRewards({"brightness": brightness}, {"brightness": 2.0})
    groups = sample_groups(
        model, ["a", "bb"], 3, reward, num_steps=2, time_shift=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert groups.latents.shape == (2, 3, 1, 2, 2) and groups.images.shape == (2, 3, 3, 2, 2)
    assert groups.flat_prompts() == ["a", "a", "a", "bb", "bb", "bb"]
    # Rewards are laid out [prompt, sample] like the images they score.
    expected = groups.images.flatten(2).mean(2)
    torch.testing.assert_close(groups.components["brightness"], expected)
    torch.testing.assert_close(groups.rewards, 2.0 * expected)


def test_prepare_model_lora_reference_is_the_base():
    model = prepare_model(ModelConfig(lora_r=4, lora_alpha=4.0), model=tiny_shapes_model())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([0.3, 0.7])
    cond = model.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        base = model.velocity(x, t, cond)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    errors = flow_matching_errors(model, x, cond, t, torch.randn_like(x))
    errors.sum().backward()
    optimizer.step()
    with torch.no_grad():
        policy = model.velocity(x, t, cond)
        with model.reference():
            reference = model.velocity(x, t, cond)
    assert (policy - base).abs().max() > 1e-4  # the adapters moved the policy
    torch.testing.assert_close(reference, base)  # ... but not the reference


def test_prepare_model_full_finetune_keeps_a_frozen_copy():
    model = prepare_model(ModelConfig(lora_r=0), model=tiny_shapes_model())
    assert model.reference_transformer is not None
    assert all(not p.requires_grad for p in model.reference_transformer.parameters())
    assert model.trainable_parameters()
