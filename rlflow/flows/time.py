"""Time grids for sampling and time distributions for training.

Convention (fixed across rlflow): ``t = 0`` is pure noise, ``t = 1`` is data. diffusers schedulers use
``sigma = 1 - t``; the conversion lives in the diffusers adapter only.

Sampling, re-scoring log-probs and evaluation must all call :func:`time_grid` so the grid a chain was
sampled on is exactly the grid it is re-scored on (the ReinFlow reference code used two different grids,
which made its first PPO ratio differ from 1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

TimeDistribution = Literal["uniform", "logit_normal", "beta", "u_shaped"]


def shift_times(t: Tensor, shift: float) -> Tensor:
    """Apply SD3's timestep shift to times ``t`` in our convention.

    SD3 shifts the noise level as ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` with
    ``sigma = 1 - t``; ``shift > 1`` spends more steps at high noise. Endpoints 0 and 1 are fixed.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = 1.0 - t
    shifted_sigma = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return 1.0 - shifted_sigma


def time_grid(
    num_steps: int,
    *,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``[num_steps + 1]`` increasing grid ``0 = t_0 < t_1 < ... < t_K = 1``.

    Step ``k`` of a chain goes from ``t_k`` to ``t_{k+1}``. ``shift = 1`` gives the uniform grid
    ``t_k = k / K`` (ReinFlow); ``shift = 3`` is SD3's default for image models.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if shift != 1.0:
        grid = shift_times(grid, shift)
    # Computed in float64 then cast once, so the same call always returns bit-identical grids.
    return grid.to(device=device, dtype=dtype)


def u_shaped_inverse_cdf(u: Tensor, a: float) -> Tensor:
    """Inverse CDF of the density ``p(t) ∝ cosh(a (t - 1/2))`` on [0, 1].

    The CDF is ``F(t) = (sinh(a (t - 1/2)) + sinh(a / 2)) / (2 sinh(a / 2))``, so sampling is exact.
    """
    if a <= 0:
        raise ValueError(f"the U-shape parameter a must be > 0, got {a}")
    half = math.sinh(a / 2.0)
    return 0.5 + torch.asinh((2.0 * u - 1.0) * half) / a


def sample_training_times(
    batch_size: int,
    distribution: TimeDistribution = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    beta_alpha: float = 1.5,
    beta_beta: float = 1.0,
    beta_cutoff: float = 0.999,
    u_shape_a: float = 4.0,
) -> Tensor:
    """Draw ``[batch_size]`` training times in [0, 1] for the flow-matching loss.

    - ``uniform``: U(0, 1) (rectified flow, ReinFlow pretraining).
    - ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))`` (SD3); in our convention a positive
      ``logit_mean`` favours the data end.
    - ``beta``: pi0's ``t = cutoff * (1 - Beta(alpha, beta))``; with the defaults (1.5, 1) it puts more
      mass near t = 0, i.e. on the noisy end, where flow matching is hardest.
    - ``u_shaped``: ``p(t) ∝ cosh(a (t - 1/2))``, more mass at both ends (in the spirit of Lee et al.
      2024, "Improving the Training of Rectified Flows"; this parameterisation is ours).
    """
    if distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if distribution == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(logit_mean + logit_std * normal)
    if distribution == "beta":
        # Beta(a, b) from two Gammas keeps the draw on our generator (torch.distributions.Beta has no
        # generator argument, which would break seeded resumption).
        x = _sample_gamma(beta_alpha, batch_size, generator, device)
        y = _sample_gamma(beta_beta, batch_size, generator, device)
        return beta_cutoff * (1.0 - x / (x + y))
    if distribution == "u_shaped":
        u = torch.rand(batch_size, generator=generator, device=device)
        return u_shaped_inverse_cdf(u, u_shape_a)
    raise ValueError(
        f"unknown time distribution {distribution!r}; choose one of uniform, logit_normal, beta, u_shaped"
    )


def _sample_gamma(
    concentration: float, size: int, generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    """Gamma(concentration, 1) draws with an explicit generator (Marsaglia-Tsang with boosting)."""
    if concentration <= 0:
        raise ValueError(f"Gamma concentration must be > 0, got {concentration}")
    boost = concentration < 1.0
    alpha = concentration + 1.0 if boost else concentration
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, device=device)
    filled = torch.zeros(size, dtype=torch.bool, device=device)
    # Rejection sampling: acceptance is > 95% per round, so a handful of vectorised rounds suffice.
    while not bool(filled.all()):
        z = torch.randn(size, generator=generator, device=device)
        u = torch.rand(size, generator=generator, device=device)
        v = (1.0 + c * z) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = accept & ~filled
        out = torch.where(take, d * v, out)
        filled |= take
    if boost:
        u = torch.rand(size, generator=generator, device=device)
        out = out * u ** (1.0 / concentration)
    return out
