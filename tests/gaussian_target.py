"""The exact flow-matching velocity for a Gaussian data distribution (used by statistical tests).

For x1 ~ N(m, S), x0 ~ N(0, I) and x_t = (1 - t) x0 + t x1, the pair (x1 - x0, x_t) is jointly Gaussian,
so the optimal velocity E[x1 - x0 | x_t = x] is affine in x:

    C_t = (1 - t)^2 I + t^2 S,   v(x, t) = m + (t S - (1 - t) I) C_t^{-1} (x - t m).
"""

from __future__ import annotations

import torch
from torch import Tensor


class GaussianTargetVelocity:
    def __init__(self, mean: Tensor, cov: Tensor):
        self.mean = mean.double()
        self.cov = cov.double()
        self.dim = mean.shape[0]

    def velocity(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        x64, t64 = x.double(), t.double().reshape(-1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        c_t = (1 - t64) ** 2 * eye + t64**2 * self.cov  # [B, D, D]
        gain = (t64 * self.cov - (1 - t64) * eye) @ torch.linalg.inv(c_t)
        centred = x64.reshape(x.shape[0], self.dim, 1) - t64 * self.mean.reshape(1, -1, 1)
        v = self.mean.reshape(1, -1) + (gain @ centred).squeeze(-1)
        return v.reshape(x.shape).to(x.dtype)
