"""ReinFlow's learned exploration noise: a small network with a std bounded in ``[min_std, max_std]``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rlflow.policies.networks import MLP, SinusoidalTimeEmbedding


class BoundedNoiseStd(nn.Module):
    """``sigma_phi(cond, t)`` with one std per event element, always inside ``[min_std, max_std]``.

    As in ReinFlow (arXiv 2505.22094) the bound is applied to the log-variance::

        logvar = logvar_min + (logvar_max - logvar_min) * (tanh(h) + 1) / 2,   std = exp(logvar / 2)

    so extreme network outputs saturate at the bounds instead of escaping them. The bounds are plain
    attributes: a trainer may anneal them (:meth:`set_bounds`). The output layer starts at zero, so the
    initial std is the geometric mean of the bounds.
    """

    def __init__(
        self,
        cond_dim: int,
        event_shape: Sequence[int],
        *,
        hidden_dims: Sequence[int] = (64, 64),
        min_std: float = 0.1,
        max_std: float = 0.24,
        time_embed_dim: int = 16,
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.cond_dim = cond_dim
        self.set_bounds(min_std, max_std)
        self.time_embedding = SinusoidalTimeEmbedding(time_embed_dim)
        self.net = MLP(
            cond_dim + time_embed_dim,
            math.prod(self.event_shape),
            hidden_dims,
            activation="tanh",
            zero_init_output=True,
        )

    def set_bounds(self, min_std: float, max_std: float) -> None:
        if not 0.0 < min_std <= max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got min_std={min_std}, max_std={max_std}")
        self.min_std, self.max_std = float(min_std), float(max_std)

    def forward(self, cond: Tensor | None, t: Tensor) -> Tensor:
        """``cond: [B, cond_dim]`` (or None when ``cond_dim == 0``), ``t: [B]`` -> std ``[B, *event]``."""
        features = self.time_embedding(t)
        if self.cond_dim:
            features = torch.cat([cond, features], dim=-1)
        raw = self.net(features)
        logvar_min, logvar_max = 2.0 * math.log(self.min_std), 2.0 * math.log(self.max_std)
        logvar = logvar_min + (logvar_max - logvar_min) * 0.5 * (torch.tanh(raw) + 1.0)
        # exp can round a hair outside the bounds; clamp keeps the documented guarantee exact.
        std = torch.exp(0.5 * logvar).clamp(self.min_std, self.max_std)
        return std.reshape(-1, *self.event_shape)
