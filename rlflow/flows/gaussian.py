"""Diagonal-Gaussian densities used by every stochastic step kernel.

All log-probs are true densities: the sum over the event dimensions (every dimension but the first,
the batch). Normalisations such as a per-element mean are a trainer's explicit choice, never made here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def sum_event_dims(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``: sum over all dimensions but the first."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """``log N(x; mean, diag(std^2))`` summed over event dims: ``[B, ...] -> [B]``.

    ``std`` broadcasts against ``x``. Coordinates with ``std == 0`` are deterministic (a point mass
    reached by the same map under any policy): they contribute 0 instead of ``+inf``/``nan``, so chains
    that mix ODE and SDE steps can store one ``[B, K]`` log-prob tensor. Trainers must not optimise a
    likelihood ratio on such steps (it carries no gradient signal about the noise).
    """
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    z = (x - mean) / safe_std
    per_element = -0.5 * z.square() - torch.log(safe_std) - _LOG_SQRT_2PI
    return sum_event_dims(torch.where(stochastic, per_element, torch.zeros_like(per_element)))


def gaussian_entropy(std: Tensor, event_shape: torch.Size | tuple[int, ...] | None = None) -> Tensor:
    """Entropy of ``N(., diag(std^2))`` summed over event dims: ``[B, ...] -> [B]``.

    ``std`` may be smaller than the event (e.g. one std per action dimension); pass ``event_shape`` to
    broadcast it to the full event before summing. Zero-std coordinates contribute 0.
    """
    if event_shape is not None:
        std = std.expand(std.shape[0], *event_shape)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    per_element = torch.log(safe_std) + 0.5 + _LOG_SQRT_2PI
    return sum_event_dims(torch.where(stochastic, per_element, torch.zeros_like(per_element)))


def standard_normal(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``N(0, I)`` draws of ``shape`` on ``device``, taken from ``generator`` wherever that lives.

    Drawing on the generator's own device and then moving keeps a CPU generator (the trainers' seeded,
    checkpointable one) usable with CUDA models, and keeps draws identical across devices.
    """
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device=device, dtype=dtype)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over event dims (the initial-noise term of a chain): ``[B] ``."""
    return sum_event_dims(-0.5 * x.square() - _LOG_SQRT_2PI)
