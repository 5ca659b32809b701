"""Generalised advantage estimation with terminations and truncations kept apart, and reward scaling."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    episode_ends: Tensor,
    *,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """GAE over a ``[T, N]`` rollout; returns ``(advantages, returns)``, both ``[T, N]``.

    ``next_values[t]`` must be the value of the TRUE next state of step ``t``: 0 if the episode
    terminated there, ``V(final_obs)`` if it was truncated (time limit / end of rollout), otherwise
    ``V(obs_{t+1})``. ``episode_ends[t]`` (terminated or truncated) stops the recursion from reaching
    across episodes::

        delta_t = r_t + gamma * next_values_t - values_t
        A_t = delta_t + gamma * lambda * (1 - episode_ends_t) * A_{t+1}

    Keeping the two apart is what the ReinFlow reference gets wrong: masking only terminations makes a
    truncated episode bootstrap from the *reset* observation of the next episode.
    """
    if not (rewards.shape == values.shape == next_values.shape == episode_ends.shape):
        raise ValueError(
            "rewards, values, next_values and episode_ends must share the shape [T, N]; got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(next_values.shape)}, {tuple(episode_ends.shape)}"
        )
    deltas = rewards + gamma * next_values - values
    continues = 1.0 - episode_ends.to(rewards.dtype)
    advantages = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[0])
    # The recursion runs backwards in time; it is vectorised over environments.
    for t in range(rewards.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * gae_lambda * continues[t] * running
        advantages[t] = running
    return advantages, advantages + values


class ReturnScaler:
    """Divide rewards by a running std of the discounted return (SB3's VecNormalize reward scaling,
    as ReinFlow does). Rewards are not shifted, so the sign of every reward is kept."""

    def __init__(self, num_envs: int, gamma: float, epsilon: float = 1e-8):
        self.gamma, self.epsilon = gamma, epsilon
        self.discounted_return = torch.zeros(num_envs, dtype=torch.float64)
        self.count = torch.tensor(0.0, dtype=torch.float64)
        self.mean = torch.tensor(0.0, dtype=torch.float64)
        self.var = torch.tensor(1.0, dtype=torch.float64)

    def _update(self, batch: Tensor) -> None:
        # Chan et al.'s parallel update of mean/variance (numerically stable).
        batch_mean, batch_var, n = batch.mean(), batch.var(unbiased=False), batch.numel()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def __call__(self, rewards: Tensor, episode_ends: Tensor) -> Tensor:
        """Scale a ``[T, N]`` reward block (episode_ends resets each env's running return)."""
        for t in range(rewards.shape[0]):
            self.discounted_return = self.discounted_return * self.gamma + rewards[t].double()
            self._update(self.discounted_return)
            self.discounted_return = torch.where(episode_ends[t], 0.0, self.discounted_return)
        return (rewards.double() / torch.sqrt(self.var + self.epsilon)).to(rewards.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "discounted_return": self.discounted_return,
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.discounted_return = state["discounted_return"].clone()
        self.count, self.mean, self.var = state["count"].clone(), state["mean"].clone(), state["var"].clone()
