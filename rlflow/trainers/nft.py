"""DiffusionNFT: online RL on the forward process for text-to-image flow models (``rlflow nft``).

DiffusionNFT (Zheng et al., arXiv 2509.16117) needs no denoising chains and no log-probs: the *old* policy
samples ``samples_per_prompt`` images per prompt with any solver (here the shared Euler ODE,
``num_steps`` steps on the ``time_shift`` grid, no CFG), only the final latents ``x1`` and their rewards are
kept, and the model is trained by flow matching on forward-noised ``x_t = (1 - t) x0 + t x1`` (t = 0 noise,
t = 1 data, target ``v = x1 - x0``). Every iteration:

1. **Sample** with the old parameters (swapped into the model under ``no_grad``), **score** with
   ``rewards`` (the same mapping as ``rlflow grpo``).
2. **Optimality probability** per sample (:func:`optimality_probabilities`):
   ``A = clip((r - mean_group) / (std + 1e-4), -c, c)``, ``p = 1/2 + A / (2 c)`` with ``c = advantage_clip``,
   i.e. ``p = 1/2 + 1/2 clip((r - mean_group) / (c std), -1, 1)``. ``std`` is the batch's (``global``) or
   the prompt's (``group``).
3. **Loss** (:func:`nft_loss`) with ``v_old`` the old parameters' velocity (no grad) and ``v_theta`` the
   trained one, at the same ``x_t``: the implicit policies ``v+ = (1 - beta) v_old + beta v_theta`` and
   ``v- = (1 + beta) v_old - beta v_theta``, per sample
   ``L = (p E(v+) + (1 - p) E(v-)) / beta`` and the minibatch loss ``c * mean_b L_b`` (+ ``kl_beta`` times
   the per-element ``||v_theta - v_ref||^2`` to the base model). ``E(v) = mean_elements (v - (x1 - x0))^2``
   (``loss_weighting: velocity``) or, ``adaptive``, the error of the implied data prediction
   ``x1_hat = x_t + (1 - t) v``, i.e. ``e = x1_hat - x1 = (1 - t)(v - (x1 - x0))``:
   ``E = mean_elements(e^2) / sg(mean_elements |e|)``. For a fixed ``v_old`` the per-sample quadratic (velocity
   weighting) is minimised by ``v_theta = v_old + (2 / beta)(p - 1/2)(v - v_old)``: above-average samples
   pull the model towards their flow, below-average ones push it away, ``p = 1/2`` keeps ``v_old``.
4. **Update the old policy** once, after the iteration's ``gradient_steps_per_iteration`` optimizer steps:
   ``old <- d old + (1 - d) theta`` (only the *trainable* parameters: LoRA adapters, or the whole
   transformer) with ``d = min(old_policy_decay_max, old_policy_decay_ramp * (n - old_policy_decay_start))``
   (0 before the start) after ``n`` optimizer steps in all (:func:`old_policy_decay`).

Choices and their sources (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and ``config/{base,nft}.py``;
X-GenGroup/Flow-Factory ``trainers/rl/nft.py`` and ``hparams/training_args/nft.py``):

- Old-policy decay: NVlabs ``return_decay(global_step, decay_type)``, applied once per epoch after its
  gradient steps; type 1 (the default config) is ramp 0.001, max 0.5, start 0; type 2 (their OCR config)
  0.0075 / 0.999 / 75; type 0 is a hard copy (decay 0). Sampling and ``v_old`` both use the old
  parameters (their second LoRA adapter "old"; here a soft copy of the trainable tensors).
- ``beta = 1`` (NVlabs' default config; 0.1 in their OCR and multi-reward configs; Flow-Factory's
  ``nft_beta = 1``). ``advantage_clip = 5`` (``adv_clip_max``) and the loss factor ``c / beta``: NVlabs.
- ``std_mode: global``: NVlabs ``sample.global_std = True`` (per-prompt means, the batch's std, + 1e-4),
  Flow-Factory ``global_std = True``.
- Adaptive weighting in data-prediction space with a detached per-sample mean ``|error|`` (clamped at
  1e-5): NVlabs and Flow-Factory (their ``x0`` is our ``x1``; computed here from the velocity error, the same
  number exactly for the linear path).
- Times (``time_distribution: grid``): NVlabs trains each sample at ``K - 1`` of the ``K`` step-start
  times of the sampler's shifted grid (``timestep_fraction 0.99``), all in one gradient step; here each
  minibatch draws one of the ``K`` step-start times ``t_0 = 0 .. t_{K-1}`` per sample (the same times, the
  same distribution in expectation; ``uniform`` / ``logit_normal`` are the alternatives).
- Gradient steps per sampling round: one (NVlabs ``gradient_step_per_epoch = 1``; 2 in their OCR config),
  with the round's samples accumulated in minibatches of ``minibatch_size``. ``times_per_sample`` trains each
  sample at that many independent times within the step (NVlabs: ``K - 1`` grid times; default 1 here).
- KL: NVlabs adds ``1e-4 * mean (v_theta - v_ref)^2`` (LoRA disabled as the reference); Flow-Factory's
  default is 0. Default here 0 (no reference forward); the SD3.5 recipe sets 1e-4.
- Sampler: NVlabs samples with a deterministic second-order ``dpm2`` solver; rlflow's shared Euler ODE here.

Logged: ``train/loss``, ``train/positive_error``, ``train/negative_error`` (the ``E`` terms),
``train/old_deviation`` (``mean (v_theta - v_old)^2``), ``train/kl`` (with ``kl_beta > 0``),
``train/optimality_mean``/``_std``, ``train/old_policy_decay``, plus the rollout and evaluation metrics of
:mod:`rlflow.trainers.rwr`.

Reading order: :func:`optimality_probabilities` -> :func:`nft_loss` -> :func:`old_policy_decay` /
:func:`soft_update_` -> :class:`NFTConfig` -> :class:`NFTTrainer` (``collect`` -> ``prepare`` -> ``loss`` ->
``learn``; the loop is :class:`~rlflow.trainers.online_weighted.OnlineWeightedTrainer`'s).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.flows.paths import linear_path
from rlflow.flows.time import time_grid
from rlflow.rollout.advantages import group_advantages
from rlflow.trainers.online_weighted import OnlineBatch, OnlineConfig, OnlineWeightedTrainer
from rlflow.trainers.policy_snapshot import soft_update_

__all__ = [
    "NFTConfig",
    "NFTLoss",
    "NFTTrainer",
    "implicit_velocities",
    "nft_loss",
    "old_policy_decay",
    "optimality_probabilities",
    "soft_update_",
    "train",
]

LossWeighting = Literal["adaptive", "velocity"]


# ------------------------------------------------------------------------------------------------ math
def optimality_probabilities(
    rewards: Tensor,
    group_size: int,
    *,
    std_mode: Literal["group", "global"] = "global",
    clip: float = 5.0,
    epsilon: float = 1e-4,
    global_rewards: Tensor | None = None,
) -> Tensor:
    """``p = 1/2 + A / (2 clip)`` with ``A = clip((r - mean_group) / (std + epsilon), -clip, clip)``: ``[B]``.

    ``rewards: [B]`` prompt-major, consecutive groups of ``group_size`` (one prompt's samples). ``std`` is the
    group's (``group``) or the batch's (``global``; ``global_rewards``: the rewards of every process).
    ``p`` lies in ``[0, 1]``; a flat group gives ``1/2`` everywhere.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"need [B] rewards in groups of group_size {group_size}; got {tuple(rewards.shape)}")
    group_ids = torch.arange(rewards.numel() // group_size).repeat_interleave(group_size)
    advantages = group_advantages(
        rewards.cpu(),
        group_ids,
        std_mode=std_mode,
        epsilon=epsilon,
        clip=clip,
        global_rewards=None if global_rewards is None else global_rewards.cpu(),
    )
    return (advantages / clip / 2.0 + 0.5).clamp(0.0, 1.0)


def implicit_velocities(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit positive and negative policies ``((1 - b) v_old + b v_theta, (1 + b) v_old - b v_theta)``."""
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


@dataclass
class NFTLoss:
    """Per-sample terms of :func:`nft_loss`, each ``[B]``."""

    loss: Tensor  # (p * positive + (1 - p) * negative) / beta
    positive: Tensor  # E(v+)
    negative: Tensor  # E(v-)


def _errors(velocity: Tensor, target: Tensor, t: Tensor | None, weighting: LossWeighting) -> Tensor:
    diff = (velocity.float() - target.float()).reshape(velocity.shape[0], -1)
    if weighting == "velocity":
        return diff.square().mean(dim=1)
    # Data-prediction error x1_hat - x1 = x_t + (1 - t) v - x1 = (1 - t)(v - (x1 - x0)) on the linear path.
    error = (1.0 - t.float())[:, None] * diff
    with torch.no_grad():
        scale = error.abs().mean(dim=1, keepdim=True).clamp_min(1e-5)
    return (error.square() / scale).mean(dim=1)


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    target_velocity: Tensor,
    optimality: Tensor,
    beta: float,
    *,
    t: Tensor | None = None,
    weighting: LossWeighting = "velocity",
) -> NFTLoss:
    """DiffusionNFT's per-sample loss ``(p E(v+) + (1 - p) E(v-)) / beta``.

    Args:
        v_theta: the trained velocity ``[B, ...]`` (gradients flow through it).
        v_old: the old policy's velocity at the same ``x_t`` (treated as a constant).
        target_velocity: ``x1 - x0``.
        optimality: ``p: [B]`` in ``[0, 1]``.
        beta: ``> 0``, the implicit policies' step (small: strong guidance).
        t: times ``[B]`` (needed by ``weighting="adaptive"``).
        weighting: ``velocity``: ``E = mean_elements (v - target)^2``; ``adaptive``: the data-prediction
            error ``e = (1 - t)(v - target)`` as ``mean(e^2) / sg(mean |e|)`` (NVlabs' adaptive weighting).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if weighting not in ("velocity", "adaptive"):
        raise ValueError(f"weighting must be 'velocity' or 'adaptive', got {weighting!r}")
    if weighting == "adaptive" and (t is None or t.shape != (v_theta.shape[0],)):
        raise ValueError("adaptive weighting needs the times t: [B]")
    if v_theta.shape != v_old.shape or v_theta.shape != target_velocity.shape:
        raise ValueError(
            f"velocities must share a shape; got {tuple(v_theta.shape)}, {tuple(v_old.shape)}, "
            f"{tuple(target_velocity.shape)}"
        )
    positive_v, negative_v = implicit_velocities(v_theta.float(), v_old.detach().float(), beta)
    positive = _errors(positive_v, target_velocity, t, weighting)
    negative = _errors(negative_v, target_velocity, t, weighting)
    p = optimality.to(positive)
    return NFTLoss(loss=(p * positive + (1.0 - p) * negative) / beta, positive=positive, negative=negative)


def old_policy_decay(step: int, *, ramp: float, maximum: float, start: int = 0) -> float:
    """NVlabs' ``return_decay``: 0 before ``start`` optimizer steps, then ``min(maximum, ramp * (step - start))``."""
    if step < start:
        return 0.0
    return min(maximum, ramp * (step - start))


# ------------------------------------------------------------------------------------------------ config
@dataclass
class NFTConfig(OnlineConfig):
    """DiffusionNFT (arXiv 2509.16117). Defaults follow NVlabs/DiffusionNFT's SD3.5 configs where they
    transfer (see the module docs for each source)."""

    output_dir: str = option(
        "runs/nft", help="Run directory (metrics, plots, image grids, checkpoints, model)."
    )
    time_distribution: Literal["grid", "uniform", "logit_normal"] = option(  # type: ignore[assignment]
        "grid",
        help="Training times: grid (the sampler's num_steps step-start times on the time_shift grid, as the "
        "reference code), uniform or logit_normal.",
    )
    learning_rate: float = option(3e-4, help="AdamW learning rate (NVlabs: 3e-4 with LoRA).")
    weight_decay: float = option(1e-4, help="AdamW weight decay (NVlabs: 1e-4).")
    beta: float = option(
        1.0, help="Implicit-policy step beta > 0: v+ = (1-beta) v_old + beta v, v- = (1+beta) v_old - beta v."
    )
    advantage_clip: float = option(
        5.0, help="c: A is clipped to [-c, c], p = 1/2 + A / (2c); the loss is also scaled by c / beta."
    )
    std_mode: Literal["global", "group"] = option(
        "global", help="Advantage std: the batch's (global, as the reference) or each prompt group's."
    )
    loss_weighting: LossWeighting = option(
        "adaptive",
        help="adaptive: data-prediction error divided by its detached mean |error| (reference code); "
        "velocity: plain squared velocity error.",
    )
    kl_beta: float = option(
        0.0, help="Weight of the per-element ||v - v_ref||^2 to the base model (NVlabs: 1e-4; 0: off)."
    )
    gradient_steps_per_iteration: int = option(
        1, help="Optimizer steps per sampling round (the round's samples split evenly; gradients accumulate)."
    )
    times_per_sample: int = option(
        1,
        help="Training times per sample and optimizer step (each copy its own time and noise; gradients "
        "accumulate). NVlabs trains every sample at K - 1 of the K grid times in one step.",
    )
    old_policy_decay_ramp: float = option(
        0.001, help="Old-policy decay grows by this per optimizer step: d = min(max, ramp * (steps - start))."
    )
    old_policy_decay_max: float = option(
        0.5, help="Largest old-policy decay (0: the old policy is a hard copy)."
    )
    old_policy_decay_start: int = option(
        0, help="Optimizer steps with decay 0 (a hard copy) before the ramp."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "time_distribution": ("grid", "uniform", "logit_normal"),
            "std_mode": ("global", "group"),
            "loss_weighting": ("adaptive", "velocity"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(
                f"beta must be > 0 (1: the reference default, 0.1: stronger guidance), got {self.beta}"
            )
        if not self.advantage_clip > 0:
            raise ConfigError(f"advantage_clip must be > 0, got {self.advantage_clip}")
        if self.kl_beta < 0:
            raise ConfigError(f"kl_beta must be >= 0 (0: no KL term), got {self.kl_beta}")
        batch = self.prompts_per_iteration * self.samples_per_prompt
        if not 1 <= self.gradient_steps_per_iteration <= batch:
            raise ConfigError(
                f"gradient_steps_per_iteration must be in [1, {batch}] (prompts_per_iteration * "
                f"samples_per_prompt), got {self.gradient_steps_per_iteration}"
            )
        if self.times_per_sample < 1:
            raise ConfigError(f"times_per_sample must be >= 1, got {self.times_per_sample}")
        if self.old_policy_decay_ramp < 0 or self.old_policy_decay_start < 0:
            raise ConfigError(
                "old_policy_decay_ramp and old_policy_decay_start must be >= 0, got "
                f"{self.old_policy_decay_ramp} and {self.old_policy_decay_start}"
            )
        if not 0.0 <= self.old_policy_decay_max < 1.0:
            raise ConfigError(
                f"old_policy_decay_max must be in [0, 1) (1 would freeze the old policy), got {self.old_policy_decay_max}"
            )

    def updates_per_iteration(self) -> int:
        return self.num_epochs * self.gradient_steps_per_iteration


# ------------------------------------------------------------------------------------------------ trainer
class NFTTrainer(OnlineWeightedTrainer):
    """DiffusionNFT: old-policy ODE samples, optimality probabilities, the implicit-policy loss."""

    name = "nft"
    config: NFTConfig

    def __init__(self, config: NFTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        # The old policy starts as the initial weights.
        self.old_snapshot = self.policy_snapshot("rlflow nft (its old policy)")
        self.optimality = torch.empty(0)

    @property
    def old_params(self) -> list[Tensor]:
        """The old policy's values of the trainable tensors."""
        return self.old_snapshot.values

    def needs_reference(self) -> bool:
        return self.config.kl_beta > 0

    def forwards_per_sample(self) -> int:
        return 2 + int(self.needs_reference())  # v_old, v_theta (and v_ref)

    def old_policy(self) -> contextlib.AbstractContextManager[None]:
        """Within the block the trained parameters hold the old policy's values (restored bit for bit)."""
        return self.old_snapshot.swapped_in()

    # ------------------------------------------------------------------------------------- samples
    def collect(self) -> OnlineBatch:
        with self.old_policy():
            return super().collect()

    # ------------------------------------------------------------------------------------- update
    def prepare(self, batch: OnlineBatch) -> dict[str, float]:
        config = self.config
        pooled = None
        if config.std_mode == "global" and self.accelerator.num_processes > 1:
            pooled = self.accelerator.gather(batch.rewards.to(self.device)).cpu()  # the std of every process
        optimality = optimality_probabilities(
            batch.rewards,
            batch.group_size,
            std_mode=config.std_mode,
            clip=config.advantage_clip,
            global_rewards=pooled,
        )
        self.optimality = optimality.to(self.device)
        return {
            "train/optimality_mean": float(optimality.mean()),
            "train/optimality_std": float(optimality.std(unbiased=False)),
        }

    def optimizer_steps(self, order: Tensor) -> list[list[Tensor]]:
        config = self.config
        parts = order.tensor_split(config.gradient_steps_per_iteration)
        # Each sample times_per_sample times in its step: every copy draws its own time and noise.
        return [list(part.repeat(config.times_per_sample).split(config.minibatch_size)) for part in parts]

    def training_times(self, num: int) -> Tensor:
        config = self.config
        if config.time_distribution != "grid":
            return super().training_times(num)
        # t_0 = 0 .. t_{K-1}: the step starts of the grid the samples were drawn on
        starts = time_grid(config.num_steps, shift=config.time_shift, kind=self.time_grid_kind)[:-1]
        return starts[torch.randint(len(starts), (num,), generator=self.generator)]

    def loss(
        self, batch: OnlineBatch, rows: Tensor, t: Tensor, noise: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        device_rows = rows.to(self.device)
        cond = self.model.encode_prompts([batch.prompts[i] for i in rows.tolist()])
        path = linear_path(noise, batch.latents[device_rows], t)
        with torch.no_grad(), self.old_policy():  # before the graph of v_theta exists: the swap is safe
            v_old = self.model.velocity(path.x_t, t, cond).float()
        v_theta = self.model.velocity(path.x_t, t, cond).float()
        terms = nft_loss(
            v_theta,
            v_old,
            path.velocity,
            self.optimality[device_rows],
            config.beta,
            t=t,
            weighting=config.loss_weighting,
        )
        loss = config.advantage_clip * terms.loss.mean()
        metrics = {
            "train/positive_error": terms.positive.detach().mean(),
            "train/negative_error": terms.negative.detach().mean(),
            "train/old_deviation": (v_theta.detach() - v_old).square().mean(),
        }
        if config.kl_beta > 0:
            with torch.no_grad(), self.model.reference():
                v_ref = self.model.velocity(path.x_t, t, cond).float()
            kl = (v_theta - v_ref).square().reshape(len(rows), -1).mean(dim=1).mean()
            loss = loss + config.kl_beta * kl
            metrics["train/kl"] = kl.detach()
        metrics["train/loss"] = loss.detach()
        return loss, metrics

    def learn(self, batch: OnlineBatch) -> dict[str, float]:
        metrics = super().learn(batch)
        config = self.config
        steps = (
            self.iteration + 1
        ) * config.updates_per_iteration()  # optimizer steps so far, incl. this round's
        decay = old_policy_decay(
            steps,
            ramp=config.old_policy_decay_ramp,
            maximum=config.old_policy_decay_max,
            start=config.old_policy_decay_start,
        )
        self.old_snapshot.update(decay)
        metrics["train/old_policy_decay"] = decay
        return metrics

    # ------------------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"old_policy": self.old_snapshot.state(self.trainable_name_list())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not self.old_snapshot.load_state(state.get("old_policy") or {}, self.trainable_name_list()):
            raise ConfigError(
                "the checkpoint has no matching old policy (not an nft run?); use a new output_dir"
            )


def train(config: NFTConfig) -> dict[str, Any]:
    """Entry point of ``rlflow nft``."""
    return NFTTrainer(config).train()
