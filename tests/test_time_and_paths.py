"""Time grids, training-time distributions (against closed forms / scipy), the linear path and the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from rlflow.flows import flow_matching_loss, linear_path, sample_training_times, shift_times, time_grid
from rlflow.flows.time import _sample_gamma, u_shaped_inverse_cdf

N = 50_000


def test_uniform_grid_is_k_over_K():
    for K in (1, 2, 4, 10):
        grid = time_grid(K)
        assert grid.shape == (K + 1,)
        torch.testing.assert_close(grid, torch.arange(K + 1, dtype=torch.float32) / K)


def test_grid_is_bit_identical_across_calls():
    assert torch.equal(time_grid(10, shift=3.0), time_grid(10, shift=3.0))


def test_sd3_shift_hand_values():
    # sigma = 1 - t = 0.5, shift 3: sigma' = 3 * 0.5 / (1 + 2 * 0.5) = 0.75, so t' = 0.25.
    assert shift_times(torch.tensor(0.5), 3.0).item() == pytest.approx(0.25)
    grid = time_grid(4, shift=3.0)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    assert bool((grid[1:] > grid[:-1]).all())
    # shift > 1 spends more of the grid at high noise (small t) than the uniform grid does.
    assert bool((grid[1:-1] < time_grid(4)[1:-1]).all())
    torch.testing.assert_close(shift_times(time_grid(4), 1.0), time_grid(4))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 10, 40])
def test_sd3_grid_is_the_diffusers_scheduler_grid(shift, num_steps):
    """kind="sd3" reproduces FlowMatchEulerDiscreteScheduler.set_timesteps(K) (what StableDiffusion3Pipeline
    samples on): noise levels sigma = 1 - t, including the final 0, to float32 precision."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    grid = time_grid(num_steps, shift=shift, kind="sd3", dtype=torch.float64)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and bool((grid[1:] > grid[:-1]).all())
    np.testing.assert_allclose((1 - grid).numpy(), scheduler.sigmas.double().numpy(), atol=1e-7)
    # The pipeline's timesteps (sigma * 1000, passed to the transformer) follow from it.
    np.testing.assert_allclose(1000 * (1 - grid[:-1]).numpy(), scheduler.timesteps.double().numpy(), atol=1e-4)


def test_sd3_grid_hand_values():
    # K = 2, shift 1: sigmas linspace(1, 1/1000, 2) = [1, 0.001], then 0 -> t = [0, 0.999, 1].
    np.testing.assert_allclose(time_grid(2, kind="sd3", dtype=torch.float64).numpy(), [0.0, 0.999, 1.0])
    # Shift 3: sigma_min = 3 * 0.001 / (1 + 2 * 0.001) = 0.0029940; shifted again: 0.0089463.
    sigma_min = 0.003 / 1.002
    expected = 1 - 3 * sigma_min / (1 + 2 * sigma_min)
    assert float(time_grid(2, shift=3.0, kind="sd3", dtype=torch.float64)[1]) == pytest.approx(expected, abs=1e-12)


def test_time_grid_setting_auto_follows_the_model():
    from rlflow.flows import resolve_time_grid

    class Pipeline:
        native_time_grid = "sd3"

    assert resolve_time_grid("auto", Pipeline()) == "sd3"
    assert resolve_time_grid("auto", object()) == "uniform"  # rlflow's own models
    assert resolve_time_grid("uniform", Pipeline()) == "uniform"
    with pytest.raises(ValueError, match="unknown time grid"):
        resolve_time_grid("karras", Pipeline())
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(4, kind="karras")


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="shift"):
        time_grid(4, shift=0.0)


def _draw(distribution, **kwargs):
    return (
        sample_training_times(N, distribution, generator=torch.Generator().manual_seed(0), **kwargs)
        .double()
        .numpy()
    )


def test_uniform_times():
    assert stats.kstest(_draw("uniform"), stats.uniform.cdf).pvalue > 1e-3


def test_logit_normal_times():
    # t = sigmoid(m + s z)  <=>  logit(t) ~ N(m, s)
    t = _draw("logit_normal", logit_mean=0.5, logit_std=0.8)
    assert stats.kstest(special.logit(t), stats.norm(0.5, 0.8).cdf).pvalue > 1e-3


def test_beta_times_follow_pi0():
    # t = 0.999 * (1 - u), u ~ Beta(1.5, 1): mean 0.999 * (1 - 1.5 / 2.5) = 0.3996
    t = _draw("beta")
    assert t.max() <= 0.999 and t.min() >= 0.0
    assert stats.kstest(1.0 - t / 0.999, stats.beta(1.5, 1.0).cdf).pvalue > 1e-3
    assert t.mean() == pytest.approx(0.3996, abs=0.005)


def test_u_shaped_times_match_their_density():
    a = 4.0
    t = _draw("u_shaped", u_shape_a=a)

    def cdf(x):
        return (np.sinh(a * (np.asarray(x) - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))

    assert stats.kstest(t, cdf).pvalue > 1e-3
    # More mass at the ends than in the middle.
    ends, middle = ((t < 0.1) | (t > 0.9)).mean(), ((t > 0.4) & (t < 0.6)).mean()
    assert ends > 2 * middle
    torch.testing.assert_close(
        u_shaped_inverse_cdf(torch.tensor([0.0, 0.5, 1.0]), a), torch.tensor([0.0, 0.5, 1.0])
    )


@pytest.mark.parametrize("concentration", [0.5, 1.5, 4.0])
def test_gamma_sampler(concentration):
    draws = _sample_gamma(concentration, N, torch.Generator().manual_seed(1), None).double().numpy()
    assert stats.kstest(draws, stats.gamma(concentration).cdf).pvalue > 1e-3


def test_times_are_reproducible_with_a_generator():
    for name in ("uniform", "logit_normal", "beta", "u_shaped"):
        assert (_draw(name) == _draw(name)).all(), name
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_training_times(4, "cosine")


def test_linear_path_endpoints_and_velocity():
    x0, x1 = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    t = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.75])
    path = linear_path(x0, x1, t)
    torch.testing.assert_close(path.x_t[0], x0[0])
    torch.testing.assert_close(path.x_t[1], x1[1])
    torch.testing.assert_close(path.x_t[2], 0.75 * x0[2] + 0.25 * x1[2])
    torch.testing.assert_close(path.velocity, x1 - x0)
    with pytest.raises(ValueError, match="shapes differ"):
        linear_path(x0, x1[:, :1], t)


def test_flow_matching_loss_hand_values():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # per-sample mean squared error: (1 + 4) / 2 = 2.5 and (1 + 1) / 2 = 1
    assert flow_matching_loss(pred, target).item() == pytest.approx(1.75)
    assert flow_matching_loss(pred, target, weights=torch.tensor([2.0, 0.0])).item() == pytest.approx(2.5)
