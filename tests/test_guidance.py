"""Flow-NRG reward guidance: closed forms on a Gaussian, weights, t_min, no_grad, and `rlflow sample`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlflow.flows.kernels import EulerStep
from rlflow.flows.sampling import sample_chain
from rlflow.flows.solvers import integrate_ode
from rlflow.flows.time import time_grid
from rlflow.guidance import (
    GuidanceSchedule,
    GuidanceSpec,
    GuidedCondition,
    GuidedVelocity,
    RewardHeadObjective,
    WeightedObjective,
)
from tests.gaussian_target import GaussianTargetVelocity

MEAN = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
DIRECTION = torch.tensor([1.0, -0.5], dtype=torch.float64)  # the linear reward r(x) = a . x


def posterior_mean_reward(a: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    """The exact noise-aware reward of ``r(x1) = a . x1`` for ``x1 ~ N(mean, cov)``, up to a constant:

    ``(1 / w) log E[exp(w a . x1) | x_t] = a . E[x1 | x_t] + (w / 2) a' Cov[x1 | x_t] a``, and the
    conditional covariance does not depend on ``x_t``; ``E[x1 | x_t = x] = m + t S C_t^{-1} (x - t m)``
    with ``C_t = t^2 S + (1 - t)^2 I``.
    """

    def objective(x: torch.Tensor, t: torch.Tensor, context=None) -> torch.Tensor:
        t64 = t.to(torch.float64).reshape(-1, 1, 1)
        eye = torch.eye(mean.shape[0], dtype=torch.float64)
        c_t = t64**2 * cov + (1 - t64) ** 2 * eye
        gain = t64 * cov @ torch.linalg.inv(c_t)  # [B, D, D]
        posterior = mean + (gain @ (x.to(torch.float64) - t64[:, :, 0] * mean).unsqueeze(-1)).squeeze(-1)
        return (posterior @ a).to(x.dtype)

    return objective


def guided_gaussian(weight: float, t_min: float) -> GuidedVelocity:
    base = GaussianTargetVelocity(MEAN, COV)
    reward = WeightedObjective("linear", posterior_mean_reward(DIRECTION, MEAN, COV), weight)
    return GuidedVelocity(base, [reward], t_min=t_min)


def test_guided_velocity_is_the_exact_tilted_velocity():
    """With the exact r_t, v + w (1-t)/t grad r_t is the flow velocity of N(m + w S a, S), pointwise."""
    weight = 1.5
    guided = guided_gaussian(weight, t_min=1e-3)
    tilted = GaussianTargetVelocity(MEAN + weight * COV @ DIRECTION, COV)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.99 + 0.005
    torch.testing.assert_close(guided.velocity(x, t, None), tilted.velocity(x, t), atol=1e-10, rtol=0)


@pytest.mark.parametrize("t_min", [0.01, 0.05])
def test_guided_ode_lands_on_the_tilted_mean(t_min, one_thread):
    """p_ref = N(m, S), r = a.x, weight w: the guided ODE's samples have mean ~ m + w S a.

    Both flows are affine maps of the noise and differ by an x-independent velocity term, so the paired
    shift (same noise) is the same for every sample: it measures the guidance without Monte-Carlo noise.
    Skipping t < t_min loses O(t_min) of the shift (the flow starts from the untilted marginal at t_min).
    """
    weight = 1.0
    guided = guided_gaussian(weight, t_min=t_min)
    base = guided.model
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = time_grid(50, dtype=torch.float64)
    x_base = integrate_ode(base, noise, times, method="midpoint")
    x_guided = integrate_ode(guided, noise, times, method="midpoint")
    target_shift = weight * COV @ DIRECTION
    shift = (x_guided - x_base).mean(dim=0)
    assert torch.cosine_similarity(shift, target_shift, dim=0) > 0.999  # moves along S a
    lost = (target_shift - shift).norm() / target_shift.norm()
    assert 0.0 <= lost < 2.0 * t_min  # the part of the tilt that t_min gives up
    # Absolute check of the tilted mean; tolerance: 4 standard errors + the t_min loss.
    tolerance = 4 * (COV.diagonal() / 4000).sqrt() + 2.0 * t_min * target_shift.abs()
    assert ((x_guided.mean(dim=0) - (MEAN + target_shift)).abs() < tolerance).all()
    torch.testing.assert_close(x_guided.T.cov(), x_base.T.cov(), atol=1e-6, rtol=0)  # same shape, shifted


def quadratic(x, t, context=None):
    return -(x.flatten(1) ** 2).sum(dim=1) * (1 + t)


def wavy(x, t, context=None):
    return torch.sin(3 * x.flatten(1)).sum(dim=1) * t


class LinearBase:
    def velocity(self, x, t, cond):
        return -x + t.reshape(-1, *([1] * (x.dim() - 1)))


def test_weights_of_several_objectives_combine_linearly():
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(2))
    t = torch.full((5,), 0.4)
    two = GuidedVelocity(
        LinearBase(), [WeightedObjective("q", quadratic, 0.7), WeightedObjective("w", wavy, -2.0)]
    )
    one = GuidedVelocity(
        LinearBase(),
        [WeightedObjective("sum", lambda x, t, c: 0.7 * quadratic(x, t) - 2.0 * wavy(x, t), 1.0)],
    )
    torch.testing.assert_close(two.reward_gradient(x, t, None), one.reward_gradient(x, t, None))
    torch.testing.assert_close(two.velocity(x, t, None), one.velocity(x, t, None))
    # Hand value: grad of -0.7 (1+t) |x|^2 - 2 t sum sin(3x) = -1.4 (1+t) x - 6 t cos(3x).
    expected = -1.4 * 1.4 * x - 6 * 0.4 * torch.cos(3 * x)
    torch.testing.assert_close(two.reward_gradient(x, t, None), expected)
    # And the velocity adds (1 - t) / t = 1.5 times it.
    torch.testing.assert_close(two.velocity(x, t, None), LinearBase().velocity(x, t, None) + 1.5 * expected)


def test_zero_weight_is_exactly_unguided():
    def broken(x, t, context=None):
        return (x.flatten(1) / 0.0).sum(dim=1)  # inf/nan gradients: must never be evaluated

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    times = time_grid(8)
    base = LinearBase()
    guided = GuidedVelocity(base, [WeightedObjective("broken", broken, 0.0)])
    plain = sample_chain(base, EulerStep(), x, times, deterministic=True).sample
    assert torch.equal(sample_chain(guided, EulerStep(), x, times, deterministic=True).sample, plain)
    assert torch.equal(sample_chain(GuidedVelocity(base, []), EulerStep(), x, times).sample, plain)


def test_schedule_t_min_and_cap():
    schedule = GuidanceSchedule(t_min=0.1)
    t = torch.tensor([0.0, 0.05, 0.0999, 0.1, 0.25, 0.5, 1.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 9.0, 3.0, 1.0, 0.0])
    torch.testing.assert_close(schedule(t), expected)
    capped = GuidanceSchedule(t_min=0.01, max_coefficient=2.0)
    torch.testing.assert_close(capped(t), torch.tensor([0.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0]))
    assert schedule.max_coefficient == pytest.approx(9.0)  # default cap: the value at t_min
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="t_min"):
            GuidanceSchedule(t_min=bad)
    with pytest.raises(ValueError, match="max_coefficient"):
        GuidanceSchedule(max_coefficient=0.0)
    # The first Euler step sits at t = 0: guidance must be finite (off) there, not inf * 0 = nan.
    guided = GuidedVelocity(LinearBase(), [WeightedObjective("q", quadratic, 1.0)], t_min=0.1)
    x = torch.randn(3, 2)
    torch.testing.assert_close(
        guided.velocity(x, torch.zeros(3), None), LinearBase().velocity(x, torch.zeros(3), None)
    )


def test_matches_the_diffusers_form():
    """v_d' = v_d - w (sigma / (1 - sigma)) grad r with sigma = 1 - t and v_d = -v (ANCHORS Flow-NRG)."""
    weight, x, t = 0.8, torch.randn(6, 2, generator=torch.Generator().manual_seed(4)), torch.full((6,), 0.3)
    guided = GuidedVelocity(LinearBase(), [WeightedObjective("w", wavy, weight)])
    sigma = 1 - t
    grad = 3 * t[:, None] * torch.cos(3 * x)  # grad of t * sum sin(3x), by hand
    v_d = -LinearBase().velocity(x, t, None)
    v_d_guided = v_d - weight * (sigma / (1 - sigma))[:, None] * grad
    torch.testing.assert_close(guided.velocity(x, t, None), -v_d_guided)


def test_guidance_inside_no_grad_and_detached():
    layer = torch.nn.Linear(3, 1)
    seen = {}

    def learned(x, t, context):
        seen["context"] = context
        return layer(x).squeeze(-1) * t

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def velocity(self, x, t, cond):
            seen["cond"] = cond
            return self.scale * x

    base = Base()
    guided = GuidedVelocity(base, [WeightedObjective("lin", learned, 2.0)])
    x, t = torch.randn(4, 3), torch.full((4,), 0.5)
    expected = 0.5 * x + 2.0 * 1.0 * 0.5 * layer.weight.detach()  # c(0.5) = 1, grad = t * W
    with torch.no_grad():
        out = guided.velocity(x, t, GuidedCondition("embeddings", ["p"] * 4))
    assert not out.requires_grad
    torch.testing.assert_close(out, expected.expand_as(out))
    assert seen == {"cond": "embeddings", "context": ["p"] * 4}
    assert layer.weight.grad is None and base.scale.grad is None  # nothing flowed into the models


def test_objective_shape_is_checked():
    guided = GuidedVelocity(LinearBase(), [WeightedObjective("bad", lambda x, t, c: x, 1.0)])
    with pytest.raises(ValueError, match="one value per sample"):
        guided.velocity(torch.randn(2, 3), torch.full((2,), 0.5), None)


# ------------------------------------------------------------------------------- reward models + CLI
learned = pytest.importorskip("rlflow.reward_models.learned")


def tiny_reward_model(noise_aware: bool = True, image_size: int = 8):
    config = learned.RewardModelConfig(
        kind="image",
        dimensions=["alignment", "quality"],
        noise_aware=noise_aware,
        image_size=image_size,
        conv_channels=[4, 8],
        text_dim=8,
        text_buckets=64,
        time_dim=8,
        hidden_dim=16,
    )
    torch.manual_seed(0)
    return learned.ImageRewardModel(config)


def test_reward_head_objective():
    model = tiny_reward_model()
    objective = RewardHeadObjective(model, "quality")
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    prompts = ["a red circle"] * 3
    torch.testing.assert_close(objective(x, t, prompts), model(x, prompts, t)[:, 1])
    with pytest.raises(ValueError, match="not one of the model's heads"):
        RewardHeadObjective(model, "style")
    with pytest.raises(ValueError, match="noise-aware"):
        RewardHeadObjective(tiny_reward_model(noise_aware=False), "quality")


@pytest.mark.filterwarnings("ignore")
def test_rlflow_sample_with_guidance(tmp_path: Path):
    pytest.importorskip("diffusers")
    from rlflow.config import ConfigError, config_from_dict
    from rlflow.sample import SampleConfig, sample
    from rlflow.testing import tiny_shapes_config
    from rlflow.utils.checkpoint import load_state_dict
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model

    torch.manual_seed(0)
    shapes = tiny_shapes_config(image_size=8)
    save_shapes_model(build_shapes_model(shapes), tmp_path / "base")
    learned.save_reward_model(tiny_reward_model(), tmp_path / "rm")
    config = config_from_dict(
        SampleConfig,
        {
            "output_dir": str(tmp_path / "out"),
            "device": "cpu",
            "model": str(tmp_path / "base"),
            "num_prompts": 3,
            "samples_per_prompt": 2,
            "num_steps": 4,
            "guidance": [
                {"path": str(tmp_path / "rm"), "head": "quality", "weight": 1000.0},
                {"path": str(tmp_path / "rm"), "head": "alignment", "weight": 1.0},
            ],
            "t_min": 0.2,
            "rewards": {"brightness": 1.0},
            "chunk_size": 4,
            "grid_size": 2,
        },
    )
    assert isinstance(config.guidance[0], GuidanceSpec)
    summary = sample(config)
    out = tmp_path / "out"
    written = json.loads((out / "summary.json").read_text())
    assert written["guided"] == pytest.approx(summary["guided"]) and written["num_samples"] == 6
    assert (out / "grid.png").stat().st_size > 0
    tensors = load_state_dict(out / "samples.safetensors")
    assert tensors["guided/images"].shape == (6, 3, 8, 8) and tensors["noise"].shape == (6, 3, 8, 8)
    assert not torch.equal(tensors["guided/latents"], tensors["unguided/latents"])
    for run in ("guided", "unguided"):
        assert set(summary[run]) == {
            "objective/quality",
            "objective/alignment",
            "reward",
            "reward/brightness",
        }
    assert set(summary["win_rate"]) == set(summary["improvement"]) == set(summary["guided"])
    # Strong guidance on a random reward model still raises its own score on the final samples.
    assert summary["improvement"]["objective/quality"] > 0
    with pytest.raises(ConfigError, match="t_min"):
        config_from_dict(SampleConfig, {"t_min": 0.0})


def test_build_objectives_names_and_errors(tmp_path: Path):
    from rlflow.errors import CheckpointError
    from rlflow.guidance import build_objectives

    learned.save_reward_model(tiny_reward_model(), tmp_path / "rm")
    objectives = build_objectives(
        [
            GuidanceSpec(str(tmp_path / "rm"), "alignment", 2.0),
            GuidanceSpec(str(tmp_path / "rm"), "quality", 0.5),
        ]
    )
    assert [(o.name, o.weight) for o in objectives] == [("alignment", 2.0), ("quality", 0.5)]
    assert objectives[0].objective.model is objectives[1].objective.model  # one load per directory
    with pytest.raises(ValueError, match="twice"):
        build_objectives([GuidanceSpec(str(tmp_path / "rm"), "quality", 1.0)] * 2)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_objectives([GuidanceSpec(str(tmp_path / "missing"), "quality", 1.0)])
