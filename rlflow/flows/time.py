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
#: ``uniform``: ``K + 1`` evenly spaced times, then shifted (ReinFlow; rlflow's own models). ``sd3``: the grid a
#: ``StableDiffusion3Pipeline`` samples on (diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``), as
#: Flow-GRPO trains SD3.5: see :func:`time_grid`.
TimeGridKind = Literal["uniform", "sd3"]


def _shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shift_times(t: Tensor, shift: float) -> Tensor:
    """Apply SD3's timestep shift to times ``t`` in our convention.

    SD3 shifts the noise level as ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` with
    ``sigma = 1 - t``; ``shift > 1`` spends more steps at high noise. Endpoints 0 and 1 are fixed.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return 1.0 - _shift_sigma(1.0 - t, shift)


def time_grid(
    num_steps: int,
    *,
    shift: float = 1.0,
    kind: TimeGridKind = "uniform",
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``[num_steps + 1]`` increasing grid ``0 = t_0 < t_1 < ... < t_K = 1``.

    Step ``k`` of a chain goes from ``t_k`` to ``t_{k+1}``.

    - ``kind="uniform"``: ``t_k = k / K`` shifted; ``shift = 1`` is ReinFlow's grid, ``shift = 3`` SD3's
      shift on an evenly spaced grid.
    - ``kind="sd3"``: diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)`` with a static shift, the
      grid ``StableDiffusion3Pipeline`` and Flow-GRPO sample SD3 / SD3.5 on: noise levels ``linspace(1,
      sigma_min, K)`` shifted, then a final 0, where ``sigma_min`` is the training schedule's smallest noise
      level ``shift(1 / num_train_timesteps)`` (so the low end is shifted twice, as in diffusers). Its last
      step jumps from about ``shift^2 / 1000`` to 0, so ``K`` of these steps do ``K - 1`` steps' work of the
      uniform grid. A model fine-tuned on this grid is fine-tuned on the grid its users sample with.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if kind == "uniform":
        grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
        if shift != 1.0:
            grid = shift_times(grid, shift)
    elif kind == "sd3":
        sigma_min = _shift_sigma(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
        sigmas = _shift_sigma(torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64), shift)
        grid = 1.0 - torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    else:
        raise ValueError(f"unknown time grid {kind!r}; choose uniform or sd3")
    # Computed in float64 then cast once, so the same call always returns bit-identical grids.
    return grid.to(device=device, dtype=dtype)


TimeGridSetting = Literal["auto", "uniform", "sd3"]
#: The help text of every command's ``time_grid`` field.
TIME_GRID_HELP = (
    "Sampling grid: sd3 = the grid StableDiffusion3Pipeline samples on (diffusers' scheduler: noise levels "
    "linspace(1, sigma_min, K) shifted, then 0; as Flow-GRPO trains SD3.5); uniform = K even steps, shifted; "
    "auto = sd3 for SD3 pipelines, uniform for rlflow's own models."
)


def resolve_time_grid(setting: TimeGridSetting, model: object) -> TimeGridKind:
    """A config's ``time_grid`` for ``model``: ``auto`` is the grid the model's own pipeline samples on
    (``model.native_time_grid``: ``sd3`` for SD3 pipelines) and ``uniform`` for models without one."""
    if setting == "auto":
        return getattr(model, "native_time_grid", "uniform")
    if setting not in ("uniform", "sd3"):
        raise ValueError(f"unknown time grid {setting!r}; choose auto, uniform or sd3")
    return setting


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
