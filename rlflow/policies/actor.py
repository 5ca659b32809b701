"""The interface the rollout engine and PPO need from a policy (flow or Gaussian), SB3-style:
the policy acts and scores; the algorithm collects and updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class ActorOutput:
    """One exploratory decision per environment."""

    action: Tensor  # [N, horizon, act_dim]  the action chunk to execute (before any env-side clipping)
    record: Tensor  # [N, ...]  what evaluate_actions re-scores: a flow's chain [N, K+1, h, a], a Gaussian's action
    log_prob: Tensor  # [N]  log-density of the record, summed over all its stochastic elements


class Actor(Protocol):
    """What :func:`rlflow.rollout.collect_gym_rollout` and the PPO trainer call."""

    def explore(self, obs: Tensor, *, generator: torch.Generator | None = None) -> ActorOutput:
        """Sample an action chunk per observation ``[N, obs_dim]`` with its log-prob."""
        ...

    def evaluate_actions(self, obs: Tensor, record: Tensor) -> tuple[Tensor, Tensor]:
        """Re-score stored records under the current parameters: (log_prob ``[N]``, entropy ``[N]``)."""
        ...

    def deterministic_action(
        self, obs: Tensor, *, generator: torch.Generator | None = None, requires_grad: bool = False
    ) -> Tensor:
        """The evaluation action ``[N, horizon, act_dim]`` (flow: ODE, no injected noise; Gaussian: the mean)."""
        ...

    def stochastic_elements(self) -> int:
        """How many Gaussian elements one record's log-prob sums over (for per-element reductions)."""
        ...
