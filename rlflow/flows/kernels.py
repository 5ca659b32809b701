"""Step kernels: one denoising transition ``x_t -> x_{t'}`` (``t < t'``) given the velocity at ``x_t``.

Every kernel is a Gaussian transition ``x_{t'} ~ N(mean(x_t, v, t, t'), diag(std^2))`` and shares one
interface, so the same sampling and re-scoring code (``rlflow.flows.sampling``) serves robot policies and
diffusers image models alike:

- :class:`EulerStep` — the deterministic ODE step (``std = 0``).
- :class:`ReinFlowStep` — ReinFlow's Euler mean plus learned, bounded noise ``sigma_phi(cond, t)``.
- :class:`FlowSDEStep` — Flow-GRPO's marginal-preserving SDE step.
- :class:`CPSStep` — the coefficients-preserving step (Flow-CPS).

Formulas, in our convention (t: 0 = noise, 1 = data; ``v`` predicts ``x1 - x0``), are in ``docs/flows.md``
with their sources. The kernels compute in the dtype of ``x``; callers that sample in bf16 should pass
fp32 tensors here (log-probs in bf16 are a known source of NaNs).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlflow.flows.gaussian import gaussian_log_prob, standard_normal
from rlflow.flows.paths import expand_time

KernelName = Literal["euler", "reinflow", "flow_sde", "cps"]


@dataclass
class StepOutput:
    """The result of one transition of a batch of chains."""

    sample: Tensor  # [B, ...]  x_{t'}
    mean: Tensor  # [B, ...]  Gaussian mean of the transition
    std: Tensor  # broadcastable to sample; 0 where the transition is deterministic
    # [B]  log N(sample; mean, std^2), summed over event dims (0 for deterministic steps); None when the
    # caller asked step(score=False) to score it later (sample_chain scores a chain's steps together).
    log_prob: Tensor | None


class StepKernel(abc.ABC):
    """Base class: subclasses define :meth:`mean_and_std`; sampling and scoring are shared.

    Kernels hold no parameters of their own (the ReinFlow kernel only *references* its noise network,
    which the policy owns and saves), so a kernel can be swapped without changing a checkpoint.

    ``t`` and ``t_next`` are ``[B]`` tensors (or 0-dim) so a batch may mix time points (TempFlow
    branching, per-sample windows).
    """

    #: Whether :meth:`step` injects noise (and so has a non-trivial log-prob).
    stochastic: bool = True

    @abc.abstractmethod
    def mean_and_std(
        self, x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor, cond: Any = None
    ) -> tuple[Tensor, Tensor]:
        """Gaussian mean ``[B, ...]`` and std (broadcastable to ``x``) of ``x_{t'} | x_t``."""

    def chain_stds(self, cond: Any, times: Tensor, batch: int) -> Tensor | None:
        """Every step's std ``[K, B, ...]`` of a chain on ``times``, computed at once, for kernels whose std
        does not depend on the state (ReinFlow's ``sigma_phi(cond, t_k)``); ``None`` for the others.
        Sampling then makes one batched noise-network call instead of one per step."""
        return None

    def step(
        self,
        x: Tensor,
        velocity: Tensor,
        t: Tensor,
        t_next: Tensor,
        cond: Any = None,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        std: Tensor | None = None,
        score: bool = True,
    ) -> StepOutput:
        """Draw ``x_{t'}``; ``noise`` (standard normal, shape of ``x``) overrides the internal draw; ``std``
        is this step's row of :meth:`chain_stds` (kernels that have one). ``score=False`` leaves
        ``log_prob`` ``None`` for the caller to compute (``gaussian_log_prob(sample, mean, std)``)."""
        if std is None:
            mean, std = self.mean_and_std(x, velocity, t, t_next, cond)
        else:
            mean = self.mean_given_std(x, velocity, t, t_next)
        if noise is None:
            noise = standard_normal(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sample = mean + std * noise
        log_prob = gaussian_log_prob(sample, mean, std) if score else None
        return StepOutput(sample=sample, mean=mean, std=std, log_prob=log_prob)

    def mean_given_std(self, x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """The transition's mean alone, when :meth:`chain_stds` already gave the std (kernels with
        precomputed stds override it to skip the std's computation)."""
        return self.mean_and_std(x, velocity, t, t_next)[0]

    def log_prob(
        self, x_next: Tensor, x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor, cond: Any = None
    ) -> Tensor:
        """Re-score a stored transition: ``log p(x_next | x) -> [B]``."""
        mean, std = self.mean_and_std(x, velocity, t, t_next, cond)
        return gaussian_log_prob(x_next, mean, std)


def _step_size(x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    dt = t_next - t
    if bool((dt <= 0).any()):
        raise ValueError("steps must go forward in time (t_next > t; t = 0 is noise, t = 1 is data)")
    return expand_time(dt, x)


class EulerStep(StepKernel):
    """Deterministic Euler ODE step: ``x' = x + v dt``."""

    stochastic = False

    def mean_and_std(self, x, velocity, t, t_next, cond=None):
        dt = _step_size(x, t, t_next)
        return x + velocity * dt, torch.zeros((), dtype=x.dtype, device=x.device)

    def step(self, x, velocity, t, t_next, cond=None, *, noise=None, generator=None, std=None, score=True):
        # No noise is drawn, so a deterministic step never advances the caller's generator; its log-prob
        # is always the (free) zero, whatever ``score`` says.
        mean, std = self.mean_and_std(x, velocity, t, t_next, cond)
        return StepOutput(sample=mean, mean=mean, std=std, log_prob=x.new_zeros(x.shape[0]))


class ReinFlowStep(StepKernel):
    """ReinFlow's step: ``x' = x + v dt + sigma_phi(cond, t) * eps`` (arXiv 2505.22094).

    ``noise_std`` is a module ``(cond, t) -> std`` whose output broadcasts to the event shape, e.g.
    :class:`rlflow.policies.noise.BoundedNoiseStd` (std bounded in ``[min_std, max_std]``). The noise
    is not scaled by ``dt``: as in ReinFlow, ``sigma`` is the per-step exploration std directly.
    """

    def __init__(self, noise_std: nn.Module):
        self.noise_std = noise_std

    def mean_and_std(self, x, velocity, t, t_next, cond=None):
        # The std depends on the step's START time t_k (ReinFlow); t may be 0-dim, the network wants [B].
        std = self.noise_std(cond, t.expand(x.shape[0]))
        return self.mean_given_std(x, velocity, t, t_next), std

    def mean_given_std(self, x, velocity, t, t_next):
        return x + velocity * _step_size(x, t, t_next)

    def chain_stds(self, cond, times, batch):
        # sigma_phi(cond, t_k) for all K start times in one call on [K * B] rows (step-major).
        num_steps = times.shape[0] - 1
        step_times = times[:-1].repeat_interleave(batch)
        rows = None if cond is None else cond.repeat(num_steps, *([1] * (cond.dim() - 1)))
        std = self.noise_std(rows, step_times)
        return std.reshape(num_steps, batch, *std.shape[1:])


class FlowSDEStep(StepKernel):
    """Flow-GRPO's SDE step (arXiv 2505.05470), whose marginals match the ODE's.

    With ``sigma_t = a * sqrt((1 - t) / t)`` and the predicted noise ``eps_hat = x - t v``
    (so the score is ``-eps_hat / (1 - t)``)::

        mean = x + (v - a^2 / (2 t) * eps_hat) * dt,   std = sigma_t * sqrt(dt)

    ``sigma_t`` is infinite at ``t = 0``; like the reference we evaluate it with ``t`` replaced by the
    next grid point there (``t_next``), which keeps the first step finite.
    """

    def __init__(self, noise_level: float = 0.7):
        if noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic step, got {noise_level}")
        self.noise_level = noise_level

    def mean_and_std(self, x, velocity, t, t_next, cond=None):
        dt = _step_size(x, t, t_next)
        t_b = expand_time(t, x)
        t_eff = expand_time(torch.where(t > 0, t, t_next), x)
        a2 = self.noise_level**2
        predicted_noise = x - t_b * velocity
        # (sigma_t^2 / 2) * score = -(a^2 / (2 t)) * eps_hat: written without 1 / (1 - t) so it stays
        # finite as t -> 1.
        mean = x + (velocity - (a2 / (2.0 * t_eff)) * predicted_noise) * dt
        std = self.noise_level * torch.sqrt((1.0 - t_b) / t_eff) * torch.sqrt(dt)
        return mean, std


class CPSStep(StepKernel):
    """Coefficients-preserving step (Flow-CPS, as used in Flow-GRPO's ``cps`` sampler).

    With predicted data ``x1_hat = x + (1 - t) v`` and noise ``x0_hat = x - t v``::

        std = (1 - t') sin(a pi / 2)
        mean = t' x1_hat + sqrt((1 - t')^2 - std^2) x0_hat = t' x1_hat + (1 - t') cos(a pi / 2) x0_hat

    The noise coefficient stays exactly ``1 - t'`` (fresh and predicted noise mixed on a circle). The last
    step (``t' = 1``) is deterministic.
    """

    def __init__(self, noise_level: float = 0.7):
        if not 0.0 < noise_level <= 1.0:
            raise ValueError(f"noise_level must be in (0, 1] for the CPS step, got {noise_level}")
        self.noise_level = noise_level

    def mean_and_std(self, x, velocity, t, t_next, cond=None):
        _step_size(x, t, t_next)
        t_b, t_next_b = expand_time(t, x), expand_time(t_next, x)
        angle = self.noise_level * math.pi / 2.0
        predicted_data = x + (1.0 - t_b) * velocity
        predicted_noise = x - t_b * velocity
        mean = t_next_b * predicted_data + (1.0 - t_next_b) * math.cos(angle) * predicted_noise
        std = (1.0 - t_next_b) * math.sin(angle)
        return mean, std


def make_kernel(
    name: KernelName, *, noise_level: float = 0.7, noise_std: nn.Module | None = None
) -> StepKernel:
    """Build a kernel by name (the config-facing factory)."""
    if name == "euler":
        return EulerStep()
    if name == "reinflow":
        if noise_std is None:
            raise ValueError("the 'reinflow' kernel needs a noise_std module (e.g. BoundedNoiseStd)")
        return ReinFlowStep(noise_std)
    if name == "flow_sde":
        return FlowSDEStep(noise_level)
    if name == "cps":
        return CPSStep(noise_level)
    raise ValueError(f"unknown kernel {name!r}; choose one of euler, reinflow, flow_sde, cps")
