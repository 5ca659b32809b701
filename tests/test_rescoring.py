"""Re-scoring a sampled chain reproduces its log-probs exactly: the first PPO/GRPO ratio is 1.

The ReinFlow reference sampled on linspace(0, 1, K) but re-scored on linspace(0, 1 - 1/K, K); its ratio
at K > 1 was off by up to 4.6e-3 in log space. Here both paths take ``traj.times``.
"""

from __future__ import annotations

import pytest
import torch

from rlflow.flows import time_grid
from rlflow.policies import FlowPolicy, FlowPolicyConfig

KERNELS = ["reinflow", "flow_sde", "cps"]


def _policy(kernel: str, **overrides) -> FlowPolicy:
    torch.manual_seed(0)
    config = FlowPolicyConfig(
        act_dim=3,
        horizon=4,
        obs_dim=11,
        hidden_dims=[64, 64],
        kernel=kernel,
        min_std=0.05,
        max_std=0.2,
        **overrides,
    )
    policy = FlowPolicy(config)
    # Randomise the noise network so the std varies with (obs, t): a stricter test than a constant std.
    torch.nn.init.normal_(policy.noise_std.net.output.weight, std=0.5)
    return policy


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_steps", [1, 2, 4, 10])
def test_rescored_log_probs_equal_sampled(kernel, num_steps):
    policy = _policy(kernel)
    obs = torch.randn(256, 11, generator=torch.Generator().manual_seed(1))
    traj = policy.sample(obs, num_steps=num_steps, generator=torch.Generator().manual_seed(2))
    assert traj.chain.shape == (256, num_steps + 1, 4, 3)
    assert traj.log_probs.shape == (256, num_steps)
    rescored = policy.log_prob(traj)
    if kernel == "cps" and num_steps == 1:
        # CPS's last step (to t = 1) is deterministic, so a one-step CPS chain has nothing to score.
        assert torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))
    else:
        assert traj.log_probs[:, : num_steps - 1 if kernel == "cps" else num_steps].abs().min() > 0
    ratio = torch.exp(rescored.sum(1) - traj.log_probs.sum(1))
    assert (ratio - 1).abs().max().item() < 1e-6
    assert (rescored - traj.log_probs).abs().max().item() < 1e-6


@pytest.mark.parametrize("kernel", KERNELS)
def test_rescoring_with_gradients_and_a_shifted_grid(kernel):
    policy = _policy(kernel, time_shift=3.0)
    obs = torch.randn(64, 11)
    traj = policy.sample(obs, num_steps=4)
    torch.testing.assert_close(traj.times, time_grid(4, shift=3.0))
    scores = policy.score(traj)
    assert (scores.log_probs - traj.log_probs).abs().max().item() < 1e-6
    scores.log_probs.sum().backward()
    assert policy.velocity_net.output.weight.grad.abs().sum() > 0
    if kernel == "reinflow":  # the noise network is trained through the log-prob too
        assert policy.noise_std.net.output.weight.grad.abs().sum() > 0


def test_subset_of_steps_and_sde_window():
    """Flow-GRPO-Fast: SDE inside a window, ODE elsewhere; scoring a subset returns those columns."""
    policy = _policy("flow_sde")
    obs = torch.randn(32, 11)
    window = torch.tensor([False, True, True, False, False])
    traj = policy.sample(obs, num_steps=5, stochastic_steps=window)
    assert torch.equal(traj.stochastic_steps, window)
    assert torch.equal(traj.log_probs[:, ~window], torch.zeros(32, 3))
    # Outside the window the chain is exactly the Euler step.
    x0, x1 = traj.chain[:, 0], traj.chain[:, 1]
    t = traj.times[0].expand(32)
    torch.testing.assert_close(x1, x0 + policy.velocity(x0, t, obs) * (traj.times[1] - traj.times[0]))
    scores = policy.score(traj, steps=[1, 2])
    assert scores.log_probs.shape == (32, 2)
    assert (scores.log_probs - traj.log_probs[:, 1:3]).abs().max().item() < 1e-6


def test_deterministic_mode_is_the_ode():
    policy = _policy("reinflow")
    obs = torch.randn(16, 11)
    g = torch.Generator().manual_seed(3)
    traj = policy.sample(obs, num_steps=4, deterministic=True, generator=g)
    assert not traj.stochastic_steps.any()
    assert torch.equal(traj.log_probs, torch.zeros(16, 4))
    actions = policy.act(obs, num_steps=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(traj.sample, actions)


def test_chain_log_prob_adds_the_initial_noise_term():
    policy = _policy("reinflow")
    traj = policy.sample(torch.randn(8, 11), num_steps=2)
    initial = torch.distributions.Normal(0.0, 1.0).log_prob(traj.chain[:, 0]).sum(dim=(1, 2))
    torch.testing.assert_close(traj.chain_log_prob(), initial + traj.log_probs.sum(1))


def test_shape_errors_name_the_mismatch():
    policy = _policy("reinflow")
    with pytest.raises(ValueError, match="obs_dim=11"):
        policy.sample(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"\[horizon, act_dim\]"):
        policy.velocity(torch.randn(4, 2, 3), torch.zeros(4), torch.randn(4, 11))
    with pytest.raises(ValueError, match="batch_size"):
        FlowPolicy(FlowPolicyConfig(act_dim=2)).sample()


def test_reinflow_std_is_evaluated_at_the_step_start_time():
    """ReinFlow's sigma_phi(s, t_k) uses the START of step k; using t_{k+1} would still make sampling and
    re-scoring agree, so pin it against the noise network directly."""
    policy = _policy("reinflow")
    obs = torch.randn(8, 11)
    traj = policy.sample(obs, num_steps=4)
    scores = policy.score(traj)
    for k in range(4):
        expected = policy.noise_std(obs, traj.times[k].expand(8))
        torch.testing.assert_close(scores.stds[:, k], expected)
        assert not torch.allclose(expected, policy.noise_std(obs, traj.times[k + 1].expand(8)))
