"""GAE against hand computations (with a truncation), and the return-based reward scaler."""

from __future__ import annotations

import pytest
import torch

from rlflow.rollout import ReturnScaler, compute_gae


def test_gae_hand_computed_single_env():
    # Three steps, no episode end: gamma 0.5, lambda 0.5.
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    nv = torch.tensor([[1.0], [1.5], [2.0]])  # V of each true next state
    ends = torch.zeros(3, 1, dtype=torch.bool)
    adv, ret = compute_gae(r, v, nv, ends, gamma=0.5, gae_lambda=0.5)
    d2 = 3 + 0.5 * 2.0 - 1.5  # 2.5
    d1 = 2 + 0.5 * 1.5 - 1.0  # 1.75
    d0 = 1 + 0.5 * 1.0 - 0.5  # 1.0
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret, adv + v)


def test_gae_termination_truncation_and_reset():
    """Env 0 terminates at t=1 (no bootstrap); env 1 is truncated at t=1 and bootstraps from the value of
    its TRUE final observation (3.0), not the reset observation's value; neither recursion crosses t=1."""
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[2.0, 2.0], [2.0, 2.0], [5.0, 5.0]])  # t=2 is a new episode after reset
    nv = torch.tensor([[2.0, 2.0], [0.0, 3.0], [4.0, 4.0]])  # terminated -> 0, truncated -> V(final_obs)=3
    ends = torch.tensor([[False, False], [True, True], [False, False]])
    adv, _ = compute_gae(r, v, nv, ends, gamma=gamma, gae_lambda=lam)
    a2 = 1 + gamma * 4.0 - 5.0
    a1_term = 1 + gamma * 0.0 - 2.0
    a1_trunc = 1 + gamma * 3.0 - 2.0
    torch.testing.assert_close(adv[2], torch.tensor([a2, a2]))
    torch.testing.assert_close(adv[1], torch.tensor([a1_term, a1_trunc]))  # no a2 leaks back across the end
    torch.testing.assert_close(
        adv[0],
        torch.tensor([1 + gamma * 2 - 2 + gamma * lam * a1_term, 1 + gamma * 2 - 2 + gamma * lam * a1_trunc]),
    )


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    torch.manual_seed(0)
    r, v = torch.randn(6, 3), torch.randn(6, 3)
    nv = torch.cat([v[1:], torch.zeros(1, 3)])  # the episode terminates after the last step
    ends = torch.zeros(6, 3, dtype=torch.bool)
    ends[-1] = True
    adv, ret = compute_gae(r, v, nv, ends, gamma=0.9, gae_lambda=1.0)
    discounted = torch.zeros(3)
    expected = torch.zeros(6, 3)
    for t in range(5, -1, -1):
        discounted = r[t] + 0.9 * discounted
        expected[t] = discounted
    torch.testing.assert_close(ret, expected)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        compute_gae(
            torch.zeros(3, 2),
            torch.zeros(3, 2),
            torch.zeros(3, 1),
            torch.zeros(3, 2, dtype=torch.bool),
            gamma=0.9,
            gae_lambda=0.9,
        )


def test_return_scaler_uses_the_running_std_of_discounted_returns():
    scaler = ReturnScaler(num_envs=1, gamma=0.5)
    rewards = torch.tensor([[2.0], [2.0], [2.0]])
    ends = torch.tensor([[False], [True], [False]])
    scaled = scaler(rewards, ends)
    # discounted returns seen: 2, 3 (then reset), 2 -> population variance of {2, 3, 2}
    returns = torch.tensor([2.0, 3.0, 2.0], dtype=torch.float64)
    expected_std = returns.var(unbiased=False).sqrt()
    torch.testing.assert_close(scaled, (rewards.double() / expected_std).float(), rtol=1e-6, atol=1e-6)
    state = scaler.state_dict()
    other = ReturnScaler(num_envs=1, gamma=0.5)
    other.load_state_dict(state)
    torch.testing.assert_close(other(rewards, ends), scaler(rewards, ends))
