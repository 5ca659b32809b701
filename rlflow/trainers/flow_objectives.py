"""Pieces shared by the preference / reward-weighted trainers (Flow-DPO, Flow-RWR, actor-critic).

- :func:`flow_matching_errors`: the per-sample squared velocity error at a given time and noise, the
  quantity Flow-DPO compares between policy and reference and Flow-RWR weights by rewards.
- :func:`ode_sample`: deterministic Euler samples from seeded noise (evaluation, online sampling).
- :func:`sample_groups` / :class:`OnlineGroups`: ``N`` samples per prompt from the current policy,
  decoded and scored (online DPO pairs best vs worst of a group).

Model loading with adapters or a frozen reference copy is :func:`rlflow.trainers.text_to_image.prepare_model`.

Convention (DESIGN.md): ``t = 0`` is noise, ``t = 1`` is data, ``x_t = (1 - t) x0 + t x1`` and the
velocity target is ``x1 - x0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlflow.flows.gaussian import standard_normal
from rlflow.flows.kernels import EulerStep
from rlflow.flows.paths import linear_path
from rlflow.flows.sampling import sample_chain
from rlflow.flows.solvers import OdeMethod, integrate_ode
from rlflow.flows.time import TimeGridKind, time_grid
from rlflow.rollout.prompts import evaluate_reward

__all__ = [
    "ErrorReduction",
    "OnlineGroups",
    "flow_matching_errors",
    "model_device",
    "ode_sample",
    "sample_groups",
]

ErrorReduction = Literal["mean", "sum"]


def flow_matching_errors(
    model: Any,
    x1: Tensor,
    cond: Any,
    t: Tensor,
    noise: Tensor,
    reduction: ErrorReduction = "mean",
) -> Tensor:
    """Per-sample ``||(x1 - noise) - v(x_t, t, cond)||^2`` with ``x_t = (1 - t) noise + t x1``: ``[B]``.

    Args:
        model: anything with ``velocity(x, t, cond)``.
        x1: data (model-space latents) ``[B, ...]``.
        cond: the model's prompt conditioning for the ``B`` rows.
        t: times ``[B]`` in ``[0, 1]``.
        noise: ``x0`` ``[B, ...]`` (same shape as ``x1``).
        reduction: ``"mean"`` divides the squared error by the number of elements per sample (the usual
            flow-matching loss scale, Diffusion-DPO's and flow_grpo's); ``"sum"`` is the squared norm.

    Gradients flow through ``model`` if enabled by the caller.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if t.ndim != 1 or t.shape[0] != x1.shape[0]:
        raise ValueError(f"t must have shape [B={x1.shape[0]}], got {tuple(t.shape)}")
    path = linear_path(noise, x1, t)
    predicted = model.velocity(path.x_t, t, cond)
    squared = (path.velocity - predicted).float().square().reshape(x1.shape[0], -1)
    return squared.mean(dim=1) if reduction == "mean" else squared.sum(dim=1)


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (CPU for parameter-free test models)."""
    if isinstance(model, nn.Module):
        for param in model.parameters():
            return param.device
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


@torch.no_grad()
def decode_in_chunks(
    model: Any, latents: Tensor, *, chunk_size: int, device: torch.device | str | None = None
) -> Tensor:
    """Images ``[N, 3, H, W]`` (float32, on the CPU) of CPU ``latents``, decoded ``chunk_size`` at a time on
    the model's device (a VAE decode of a whole evaluation set at once would not fit a GPU)."""
    target = device or model_device(model)
    return torch.cat(
        [
            model.decode(latents[i : i + chunk_size].to(target)).float().cpu()
            for i in range(0, len(latents), chunk_size)
        ]
    )


def ode_sample(
    model: Any,
    prompts: Sequence[str],
    *,
    num_steps: int,
    time_shift: float,
    generator: torch.Generator,
    chunk_size: int = 64,
    device: torch.device | str | None = None,
    grid: TimeGridKind = "uniform",
    method: OdeMethod = "euler",
) -> Tensor:
    """Deterministic ODE samples (model-space latents ``[len(prompts), *latent_shape]``, on CPU).

    ``method``: ``euler`` (1 velocity evaluation per step) or a second-order ``heun`` / ``midpoint`` (2 per
    step). The noise is drawn from ``generator`` in prompt order, chunk by chunk, so the same seed gives the
    same samples for any ``chunk_size`` (the memory knob).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = torch.device(device) if device is not None else model_device(model)
    times = time_grid(num_steps, shift=time_shift, kind=grid, device=device)
    prompts = list(prompts)
    noise = standard_normal((len(prompts), *model.latent_shape), generator=generator)
    latents = []
    for start in range(0, len(prompts), chunk_size):
        part = prompts[start : start + chunk_size]
        cond = model.encode_prompts(part)
        x0 = noise[start : start + chunk_size].to(device)
        if method == "euler":
            sample = sample_chain(model, EulerStep(), x0, times, cond, deterministic=True).sample
        else:
            with torch.no_grad():
                sample = integrate_ode(model, x0, times, cond, method=method)
        latents.append(sample.float().cpu())
    return torch.cat(latents)


@dataclass
class OnlineGroups:
    """``N`` policy samples for each of ``P`` prompts with their decoded images and rewards."""

    prompts: list[str]  # [P]
    latents: Tensor  # [P, N, *latent_shape] model space (what the flow objectives train on)
    images: Tensor  # [P, N, 3, H, W] in [0, 1]
    rewards: Tensor  # [P, N] total (weighted) reward
    components: dict[str, Tensor] = field(default_factory=dict)  # reward component name -> [P, N]

    @property
    def samples_per_prompt(self) -> int:
        return self.rewards.shape[1]

    def flat_prompts(self) -> list[str]:
        """The prompt of every sample, prompt-major (row ``p * N + n``)."""
        return [p for p in self.prompts for _ in range(self.samples_per_prompt)]


@torch.no_grad()
def sample_groups(
    model: Any,
    prompts: Sequence[str],
    samples_per_prompt: int,
    reward: Callable[..., Any],
    *,
    num_steps: int,
    time_shift: float,
    generator: torch.Generator,
    chunk_size: int = 64,
    device: torch.device | str | None = None,
    grid: TimeGridKind = "uniform",
    method: OdeMethod = "euler",
) -> OnlineGroups:
    """Sample ``samples_per_prompt`` ODE samples per prompt from ``model`` and score them with ``reward``.

    Samples of a prompt differ by their initial noise only (the ODE is deterministic). The reward gets
    decoded images and is normalised by :func:`~rlflow.rollout.prompts.evaluate_reward`, so a
    ``RewardOutput``'s components are kept (``OnlineGroups.components``).
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    prompts = list(prompts)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    latents = ode_sample(
        model,
        flat,
        num_steps=num_steps,
        time_shift=time_shift,
        generator=generator,
        chunk_size=chunk_size,
        device=device,
        grid=grid,
        method=method,
    )
    images = decode_in_chunks(model, latents, chunk_size=chunk_size, device=device)
    result = evaluate_reward(reward, images, flat)
    shape = (len(prompts), samples_per_prompt)
    return OnlineGroups(
        prompts=prompts,
        latents=latents.reshape(*shape, *latents.shape[1:]),
        images=images.reshape(*shape, *images.shape[1:]),
        rewards=result.total.reshape(shape),
        components={name: value.reshape(shape) for name, value in result.components.items()},
    )
