"""Step kernels: log-probs against torch.distributions, formulas against the papers' own conventions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from rlflow.flows import CPSStep, EulerStep, FlowSDEStep, ReinFlowStep, gaussian_entropy, gaussian_log_prob
from rlflow.policies.noise import BoundedNoiseStd

EVENT = (4, 3)


def _inputs(batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *EVENT, generator=g)
    v = torch.randn(batch, *EVENT, generator=g)
    t = torch.rand(batch, generator=g) * 0.8
    t_next = t + 0.05 + torch.rand(batch, generator=g) * 0.15
    cond = torch.randn(batch, 5, generator=g)
    return x, v, t, t_next, cond


def _stochastic_kernels():
    noise = BoundedNoiseStd(5, EVENT, min_std=0.05, max_std=0.3)
    torch.nn.init.normal_(noise.net.output.weight, std=1.0)  # non-trivial stds
    return {
        "reinflow": ReinFlowStep(noise),
        "flow_sde": FlowSDEStep(0.7),
        "cps": CPSStep(0.7),
    }


@pytest.mark.parametrize("name", ["reinflow", "flow_sde", "cps"])
def test_step_log_prob_matches_torch_distributions(name):
    kernel = _stochastic_kernels()[name]
    x, v, t, t_next, cond = _inputs()
    out = kernel.step(x, v, t, t_next, cond, generator=torch.Generator().manual_seed(1))
    reference = Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.sample).sum(dim=(1, 2))
    torch.testing.assert_close(out.log_prob, reference, atol=1e-5, rtol=0)
    # Re-scoring the same transition gives the same number.
    torch.testing.assert_close(
        kernel.log_prob(out.sample, x, v, t, t_next, cond), out.log_prob, atol=0, rtol=0
    )
    # Entropy against torch.distributions too.
    entropy = gaussian_entropy(out.std.expand_as(out.mean))
    torch.testing.assert_close(
        entropy, Normal(out.mean, out.std.expand_as(out.mean)).entropy().sum(dim=(1, 2))
    )


def test_euler_step_is_deterministic_with_zero_log_prob():
    x, v, t, t_next, _ = _inputs()
    out = EulerStep().step(x, v, t, t_next)
    torch.testing.assert_close(out.sample, x + v * (t_next - t).reshape(-1, 1, 1))
    assert torch.equal(out.log_prob, torch.zeros(x.shape[0]))


def test_gaussian_log_prob_treats_zero_std_as_point_mass():
    x = torch.randn(3, 2)
    std = torch.tensor([[0.0, 0.5]]).expand(3, 2)
    expected = Normal(torch.zeros(3), 0.5).log_prob(x[:, 1])
    torch.testing.assert_close(gaussian_log_prob(x, torch.zeros(3, 2), std), expected)


def test_flow_sde_matches_flow_grpo_formula_in_diffusers_convention():
    """Flow-GRPO writes the step with sigma = 1 - t and v_d = noise - data = -v (ANCHORS.md)."""
    a = 0.7
    x, v, t, t_next, _ = _inputs()
    sigma, sigma_next, v_d = 1 - t, 1 - t_next, -v
    dsig = (sigma_next - sigma).reshape(-1, 1, 1)
    s = sigma.reshape(-1, 1, 1)
    std_t = a * torch.sqrt(s / (1 - s))
    mean_ref = x + v_d * dsig + (std_t**2 / (2 * s)) * (x + (1 - s) * v_d) * dsig
    std_ref = std_t * torch.sqrt(-dsig)
    mean, std = FlowSDEStep(a).mean_and_std(x, v, t, t_next)
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.expand_as(mean), std_ref.expand_as(mean), atol=1e-6, rtol=1e-5)


def test_flow_sde_first_step_uses_next_grid_point():
    """At t = 0 sigma_t = a sqrt((1-t)/t) is infinite; the reference evaluates it at the next point."""
    x, v = torch.randn(2, *EVENT), torch.randn(2, *EVENT)
    t, t_next = torch.zeros(2), torch.full((2,), 0.25)
    mean, std = FlowSDEStep(0.5).mean_and_std(x, v, t, t_next)
    expected_std = 0.5 * math.sqrt(1.0 / 0.25) * math.sqrt(0.25)
    torch.testing.assert_close(std.expand_as(x), torch.full_like(x, expected_std))
    assert torch.isfinite(mean).all()


def test_cps_matches_formula_in_diffusers_convention():
    a = 0.7
    x, v, t, t_next, _ = _inputs()
    s, s_next = (1 - t).reshape(-1, 1, 1), (1 - t_next).reshape(-1, 1, 1)
    v_d = -v
    std_ref = s_next * math.sin(a * math.pi / 2)
    x0_hat = x - s * v_d  # predicted data (diffusers calls data x0)
    x1_hat = x + (1 - s) * v_d  # predicted noise
    mean_ref = (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - std_ref**2) * x1_hat
    mean, std = CPSStep(a).mean_and_std(x, v, t, t_next)
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.expand_as(mean), std_ref.expand_as(mean))


def test_cps_last_step_is_deterministic():
    x, v = torch.randn(4, *EVENT), torch.randn(4, *EVENT)
    out = CPSStep(0.7).step(x, v, torch.full((4,), 0.9), torch.ones(4))
    assert torch.equal(out.log_prob, torch.zeros(4))
    torch.testing.assert_close(out.sample, x + 0.1 * v)  # the predicted data x + (1 - t) v


def test_kernels_reject_backward_steps():
    x, v = torch.randn(2, *EVENT), torch.randn(2, *EVENT)
    with pytest.raises(ValueError, match="forward in time"):
        EulerStep().step(x, v, torch.full((2,), 0.5), torch.full((2,), 0.4))


@pytest.mark.parametrize("bias,expected", [(1e6, 0.16), (-1e6, 0.08), (0.0, math.sqrt(0.08 * 0.16))])
def test_noise_std_saturates_at_its_bounds(bias, expected):
    noise = BoundedNoiseStd(5, EVENT, min_std=0.08, max_std=0.16)
    with torch.no_grad():
        noise.net.output.bias.fill_(bias)  # the output weight starts at zero
    std = noise(torch.randn(32, 5) * 100.0, torch.rand(32))
    assert std.shape == (32, *EVENT)
    torch.testing.assert_close(std, torch.full_like(std, expected))


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e30])
def test_noise_std_stays_inside_bounds_for_extreme_outputs(scale):
    noise = BoundedNoiseStd(5, EVENT, min_std=0.08, max_std=0.16)
    with torch.no_grad():
        for p in noise.parameters():
            p.copy_(torch.randn_like(p) * scale)
    std = noise(torch.randn(256, 5) * 100.0, torch.rand(256))
    assert torch.isfinite(std).all()
    assert bool((std >= 0.08).all()) and bool((std <= 0.16).all())
    # Both bounds are actually reached: the outputs really were extreme.
    assert std.min().item() == pytest.approx(0.08) and std.max().item() == pytest.approx(0.16)


def test_noise_std_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_std"):
        BoundedNoiseStd(2, (1, 2), min_std=0.3, max_std=0.1)


def test_reinflow_chain_stds_equal_the_per_step_stds_and_sampling_is_unchanged():
    """ReinFlow's std depends on (cond, t_k) only, so sampling computes all K steps' stds in one call: the
    same values as K per-step calls, and the same chain (same draws) as stepping without them."""
    from rlflow.flows.sampling import sample_chain
    from rlflow.flows.time import time_grid

    kernel = _stochastic_kernels()["reinflow"]
    x, v, _, _, cond = _inputs(batch=6)
    times = time_grid(4)
    stds = kernel.chain_stds(cond, times, batch=6)
    assert stds.shape == (4, 6, *EVENT)
    for k in range(4):
        _, per_step = kernel.mean_and_std(x, v, times[k].expand(6), times[k + 1].expand(6), cond)
        torch.testing.assert_close(stds[k], per_step)
    assert FlowSDEStep(0.7).chain_stds(cond, times, 6) is None  # depends on the state: per step

    class Velocity:
        def velocity(self, x, t, cond):
            return -x + cond[:, :1, None]

    class PerStep(ReinFlowStep):
        def chain_stds(self, cond, times, batch):
            return None

    x0 = torch.randn(6, *EVENT, generator=torch.Generator().manual_seed(1))
    fast = sample_chain(Velocity(), kernel, x0, times, cond, generator=torch.Generator().manual_seed(2))
    slow = sample_chain(
        Velocity(), PerStep(kernel.noise_std), x0, times, cond, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(fast.chain, slow.chain)
    torch.testing.assert_close(fast.log_probs, slow.log_probs)
