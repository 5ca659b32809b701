"""Generalised advantage estimation with terminations and truncations kept apart, reward scaling, GRPO group
advantages, and the check that a batch of grouped rewards carries any learning signal."""

from __future__ import annotations

import math

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


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    epsilon: float = 1e-4,
    clip: float | None = 5.0,
    global_rewards: Tensor | None = None,
) -> Tensor:
    """GRPO advantages ``(r - mean_group) / (std + epsilon)``, clipped to ``[-clip, clip]``: ``[N]``.

    ``group_ids: [N]`` (long) says which group each reward belongs to (the samples of one prompt, or the
    siblings of one TempFlow branch point); groups may have different sizes. ``std_mode``:
    ``"group"`` divides by each group's std (Flow-GRPO's per-prompt stat tracking), ``"global"`` by the
    std of the whole batch (Flow-GRPO's ``global_std``; steadier when groups are small). Stds are the
    population std (``unbiased=False``), as in the reference. Vectorised with scatter-adds.
    ``global_rewards`` (``"global"`` mode only): the rewards the std is taken over, e.g. gathered from
    every process of a distributed run (groups stay within a process, so their means are local).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten()[:5].tolist()
        raise ValueError(f"rewards contain NaN/inf at batch indices {bad}; fix the reward function")
    if std_mode not in ("group", "global"):
        raise ValueError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    rewards = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards) / counts
    centred = rewards - means[inverse]
    if std_mode == "group":
        variances = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centred**2) / counts
        std = variances.sqrt()[inverse]
    else:
        pool = rewards if global_rewards is None else global_rewards.to(torch.float64)
        std = pool.std(unbiased=False).expand_as(rewards)
    advantages = centred / (std + epsilon)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.to(torch.float32)


def flat_group_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """The fraction of groups whose rewards are all equal (zero std): they carry no group-relative signal.

    ``rewards, group_ids: [N]``; groups may have different sizes. The same quantity GRPO logs as
    ``rollout/zero_std_group_fraction``.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    size = int(inverse.max()) + 1
    values = rewards.detach().to(torch.float64).cpu()
    inverse = inverse.cpu()
    high = torch.full((size,), -math.inf, dtype=torch.float64).scatter_reduce(0, inverse, values, "amax")
    low = torch.full((size,), math.inf, dtype=torch.float64).scatter_reduce(0, inverse, values, "amin")
    return float(((high - low) == 0).double().mean())


class LearningSignalMonitor:
    """Stops a run whose rewards carry no learning signal: every group scored the same (zero within-group
    std everywhere) for ``patience`` consecutive iterations raises a :class:`~rlflow.config.ConfigError`.

    Group-relative trainers (GRPO, DiffusionNFT) get exactly zero advantages then, and reward-weighted ones
    only learn which prompts are easy; more iterations cannot help. ``patience = 0`` disables the check.
    ``streak`` (the current count of flat iterations) is what a checkpoint must keep.
    """

    def __init__(self, patience: int):
        if patience < 0:
            raise ValueError(f"patience must be >= 0 (0 disables the check), got {patience}")
        self.patience = int(patience)
        self.streak = 0

    def update(self, rewards: Tensor, group_ids: Tensor, *, hint: str = "samples_per_prompt") -> float:
        """Count this iteration's batch; returns its flat-group fraction (raises at the ``patience``-th flat
        iteration in a row). ``hint`` names the config field that sets the group size."""
        fraction = flat_group_fraction(rewards, group_ids)
        self.streak = self.streak + 1 if fraction == 1.0 else 0
        if self.patience and self.streak >= self.patience:
            from rlflow.config import ConfigError

            values = rewards.detach().double()
            raise ConfigError(
                f"no learning signal: every group scored the same for {self.streak} iterations (reward mean "
                f"{float(values.mean()):.4g}, min {float(values.min()):.4g}, max {float(values.max()):.4g} in "
                f"the last batch); check the reward or increase {hint}"
            )
        return fraction
