"""Sampling denoising chains and re-scoring them: the code every policy and trainer shares.

Any model with a ``velocity(x, t, cond) -> Tensor`` method (a :class:`VelocityModel`) plugs in: the
robot :class:`~rlflow.policies.FlowPolicy` and the diffusers adapters alike. Sampling and re-scoring take
the grid from the same :class:`Trajectory` (``traj.times``), so a chain is always re-scored on the grid
it was sampled on and the first PPO/GRPO ratio is exactly 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rlflow.flows.gaussian import gaussian_log_prob, standard_normal_log_prob
from rlflow.flows.kernels import EulerStep, StepKernel, StepOutput


class VelocityModel(Protocol):
    """Anything that predicts the flow velocity ``dx/dt`` (t: 0 = noise, 1 = data)."""

    def velocity(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """``x: [B, ...]``, ``t: [B]``, ``cond`` batch-aligned (tensor, mapping, tuple or dataclass)."""
        ...


@dataclass
class Trajectory:
    """A batch of denoising chains with their per-step log-probs."""

    chain: Tensor  # [B, K+1, ...]  x_0 (noise), ..., x_K (the sample)
    log_probs: Tensor  # [B, K]  log p(x_{k+1} | x_k), summed over event dims; 0 on deterministic steps
    times: Tensor  # [K+1]  the grid the chain was sampled on
    stochastic_steps: Tensor  # [K] bool  steps drawn by the stochastic kernel (others: Euler ODE)
    cond: Any = None  # the condition the chain was sampled under (batch-aligned)

    @property
    def sample(self) -> Tensor:
        """The final sample ``x_K``: ``[B, ...]``."""
        return self.chain[:, -1]

    @property
    def num_steps(self) -> int:
        return self.chain.shape[1] - 1

    def chain_log_prob(self) -> Tensor:
        """``log p(x_0, ..., x_K) = log N(x_0; 0, I) + sum_k log p(x_{k+1} | x_k)``: ``[B]``."""
        return standard_normal_log_prob(self.chain[:, 0]) + self.log_probs.sum(dim=1)


@dataclass
class ChainScores:
    """Re-scored transitions of a stored chain at a selection of S steps."""

    log_probs: Tensor  # [B, S]
    means: Tensor  # [B, S, ...]
    stds: Tensor  # [B, S, ...] (expanded to the event shape)
    steps: Tensor  # [S] long, the step indices scored


def repeat_batch(value: Any, repeats: int) -> Any:
    """Repeat every batch-aligned tensor inside ``value`` ``repeats`` times along dim 0 (interleaved).

    Supports tensors, ``None``, mappings, lists/tuples and dataclasses, so conditions of any structure
    (an observation tensor, a dict of prompt embeddings) follow the flattened ``[B * S]`` batch.
    """
    if value is None or repeats == 1:
        return value
    if isinstance(value, Tensor):
        return value.repeat_interleave(repeats, dim=0)
    if isinstance(value, dict):
        return {key: repeat_batch(item, repeats) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_batch(item, repeats) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: repeat_batch(getattr(value, f.name), repeats) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    raise TypeError(f"cannot repeat a condition of type {type(value).__name__} along the batch")


def _stochastic_mask(
    kernel: StepKernel, num_steps: int, stochastic_steps: Tensor | None, deterministic: bool
) -> Tensor:
    if deterministic or not kernel.stochastic:
        return torch.zeros(num_steps, dtype=torch.bool)
    if stochastic_steps is None:
        return torch.ones(num_steps, dtype=torch.bool)
    mask = torch.as_tensor(stochastic_steps, dtype=torch.bool).cpu()
    if mask.shape != (num_steps,):
        raise ValueError(f"stochastic_steps must have shape [{num_steps}], got {tuple(mask.shape)}")
    return mask


def _chain_velocity(
    model: VelocityModel, times: Tensor, cond: Any
) -> Callable[[Tensor, int, Tensor], Tensor]:
    """``(x, k, t) -> model.velocity(x, t, cond)`` at step ``k`` of a chain on ``times``.

    A model with a ``chain_velocity(times, cond)`` method (``(x, k) -> velocity``) prepares the work every
    step of the chain shares once (e.g. :class:`~rlflow.policies.FlowPolicy`'s time embeddings of the
    grid); it must return what ``velocity`` returns.
    """
    prepare = getattr(model, "chain_velocity", None)
    if prepare is None:
        return lambda x, k, t: model.velocity(x, t, cond)
    at_step = prepare(times, cond)
    return lambda x, k, t: at_step(x, k)


def sample_chain(
    model: VelocityModel,
    kernel: StepKernel,
    x_init: Tensor,
    times: Tensor,
    cond: Any = None,
    *,
    stochastic_steps: Tensor | None = None,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Run ``K = len(times) - 1`` steps from the noise ``x_init: [B, ...]``.

    ``stochastic_steps: [K] bool`` selects the steps that use ``kernel``; the others take the
    deterministic Euler step (Flow-GRPO-Fast / MixGRPO windows). ``deterministic=True`` makes every step
    Euler (evaluation). Gradients flow if the caller has them enabled.
    """
    num_steps = times.shape[0] - 1
    mask = _stochastic_mask(kernel, num_steps, stochastic_steps, deterministic)
    ode = EulerStep()
    batch = x_init.shape[0]
    velocity_at = _chain_velocity(model, times, cond)
    x = x_init
    states, log_probs = [x_init], []
    stds: tuple[Tensor, ...] | None = None
    deferred: list[tuple[int, StepOutput]] = []  # steps drawn with precomputed stds, scored after the loop
    # Per-step Python values and views made once (a 0-dim tensor's truth value costs a dispatch per test).
    stochastic = mask.tolist()
    step_times = times.unsqueeze(1).expand(-1, batch).unbind(0)  # [K+1] views times[k].expand(batch)
    for k in range(num_steps):
        t, t_next = step_times[k], step_times[k + 1]
        velocity = velocity_at(x, k, t)  # first: the model's input checks name bad shapes
        if stochastic[k] and stds is None:
            # State-independent stds (ReinFlow) of the whole chain in one call, not one call per step.
            chain_stds = kernel.chain_stds(cond, times, batch)
            stds = None if chain_stds is None else chain_stds.unbind(0)
        later = stochastic[k] and stds is not None
        out = (kernel if stochastic[k] else ode).step(
            x,
            velocity,
            t,
            t_next,
            cond,
            generator=generator,
            std=None if stds is None else stds[k],
            score=not later,
        )
        x = out.sample
        states.append(x)
        log_probs.append(out.log_prob)
        if later:
            deferred.append((k, out))
    if deferred:
        # One Gaussian log-prob over all those steps' rows instead of one per step: elementwise the same
        # arithmetic and the same per-row sums, so the same values (tested bit for bit).
        scored = gaussian_log_prob(
            torch.cat([out.sample for _, out in deferred]),
            torch.cat([out.mean for _, out in deferred]),
            torch.cat([out.std.expand_as(out.sample) for _, out in deferred]),
        )
        for (k, _), value in zip(deferred, scored.split(batch), strict=True):
            log_probs[k] = value
    return Trajectory(
        chain=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        times=times,
        stochastic_steps=mask,
        cond=cond,
    )


def select_batch(value: Any, index: Tensor) -> Any:
    """Rows ``index`` (a ``[M]`` long tensor) of every batch-aligned tensor inside ``value``.

    The gather counterpart of :func:`repeat_batch`, for the same kinds of conditions.
    """
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[index.to(value.device)]
    if isinstance(value, dict):
        return {key: select_batch(item, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_batch(item, index) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: select_batch(getattr(value, f.name), index) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    raise TypeError(f"cannot index a condition of type {type(value).__name__} along the batch")


@dataclass
class TransitionScores:
    """Re-scored transitions ``x_k -> x_{k+1}``, one per (sample, step) pair: ``[M]`` rows."""

    log_probs: Tensor  # [M]  summed over event dims; 0 for deterministic transitions
    means: Tensor  # [M, ...]
    stds: Tensor  # [M, ...] (expanded to the event shape; 0 for deterministic transitions)


def score_transitions(
    model: VelocityModel,
    kernel: StepKernel,
    traj: Trajectory,
    sample_index: Tensor,
    step_index: Tensor,
    *,
    stochastic: Tensor | None = None,
) -> TransitionScores:
    """Re-score the transitions ``(sample_index[m], step_index[m])`` of a stored chain in ONE batched
    velocity call (with gradients, if enabled), on the grid the chain was sampled on (``traj.times``).

    Each pair may sit at a different time (GRPO subsamples timesteps per sample; TempFlow-GRPO trains one
    branch step per sample). ``stochastic: [M] bool`` marks the pairs drawn by ``kernel`` (default: all);
    the others are Euler ODE steps and score 0.
    """
    device = traj.chain.device
    sample_index, step_index = sample_index.to(device), step_index.to(device)
    if sample_index.shape != step_index.shape or sample_index.dim() != 1:
        raise ValueError(
            f"sample_index and step_index must both be [M]; got {tuple(sample_index.shape)} and "
            f"{tuple(step_index.shape)}"
        )
    x = traj.chain[sample_index, step_index]
    x_next = traj.chain[sample_index, step_index + 1]
    times = traj.times.to(device)
    t, t_next = times[step_index], times[step_index + 1]
    cond = select_batch(traj.cond, sample_index)
    velocity = model.velocity(x, t, cond)
    mean, std = kernel.mean_and_std(x, velocity, t, t_next, cond)
    std = std.expand_as(x)
    if stochastic is not None:
        is_sde = stochastic.to(device).reshape(-1, *([1] * (x.dim() - 1)))
        mean_ode, _ = EulerStep().mean_and_std(x, velocity, t, t_next, cond)
        mean = torch.where(is_sde, mean, mean_ode)
        std = torch.where(is_sde, std, torch.zeros_like(std))
    return TransitionScores(log_probs=gaussian_log_prob(x_next, mean, std), means=mean, stds=std)


def score_chain(
    model: VelocityModel,
    kernel: StepKernel,
    traj: Trajectory,
    *,
    steps: Sequence[int] | Tensor | None = None,
) -> ChainScores:
    """Re-score stored transitions ``x_k -> x_{k+1}`` under ``model`` (with gradients, if enabled).

    All selected steps are evaluated in ONE batched velocity call of size ``B * S`` (no Python loop over
    steps). ``steps`` defaults to every step; deterministic steps score 0 (see ``gaussian_log_prob``).
    The grid is ``traj.times``: the one the chain was sampled on.
    """
    batch, num_steps = traj.chain.shape[0], traj.num_steps
    if steps is None:
        step_index = torch.arange(num_steps)
    else:
        step_index = torch.as_tensor(steps, dtype=torch.long).cpu().reshape(-1)
        if step_index.numel() == 0 or int(step_index.min()) < 0 or int(step_index.max()) >= num_steps:
            raise ValueError(f"steps must be indices in [0, {num_steps}), got {step_index.tolist()}")
    num_scored = step_index.shape[0]
    event_shape = traj.chain.shape[2:]
    # Batch-major pairs (sample 0's steps first), so the condition is a repeat_interleave.
    scores = score_transitions(
        model,
        kernel,
        traj,
        torch.arange(batch).repeat_interleave(num_scored),
        step_index.repeat(batch),
        stochastic=traj.stochastic_steps[step_index].repeat(batch),
    )
    return ChainScores(
        log_probs=scores.log_probs.reshape(batch, num_scored),
        means=scores.means.reshape(batch, num_scored, *event_shape),
        stds=scores.stds.reshape(batch, num_scored, *event_shape),
        steps=step_index,
    )
