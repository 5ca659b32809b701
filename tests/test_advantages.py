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


def test_group_advantages_by_hand():
    from rlflow.rollout import group_advantages

    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0, 9.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    adv = group_advantages(rewards, groups, epsilon=0.0, clip=None)
    # group 0: mean 2, std 1; group 1: all equal -> 0/0 guarded by epsilon below; group 2: mean 5
    std2 = ((9 + 1 + 16) / 3) ** 0.5
    torch.testing.assert_close(adv[[0, 1]], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(adv[4:], torch.tensor([-3 / std2, -1 / std2, 4 / std2]))
    eps = group_advantages(rewards, groups)  # default epsilon 1e-4: equal rewards give exactly 0
    assert torch.equal(eps[2:4], torch.zeros(2))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), clip=1.5)
    assert clipped.max() == 1.5 and clipped.min() > -1.5


def test_group_advantages_global_std_and_errors():
    from rlflow.rollout import group_advantages

    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(rewards, groups, std_mode="global", epsilon=0.0, clip=None)
    std = rewards.std(unbiased=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / std)
    pooled = torch.tensor([0.0, 2.0, 10.0, 14.0, 100.0])  # e.g. gathered from other processes
    adv_pooled = group_advantages(
        rewards, groups, std_mode="global", epsilon=0.0, clip=None, global_rewards=pooled
    )
    torch.testing.assert_close(adv_pooled, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / pooled.std(unbiased=False))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(rewards, groups, std_mode="batch")
