"""What the online weighted-flow-matching trainers share: Flow-RWR (:mod:`rlflow.trainers.rwr`), the
actor-critic (:mod:`rlflow.trainers.actor_critic`) and DiffusionNFT (:mod:`rlflow.trainers.nft`), three siblings.

Every iteration :class:`OnlineWeightedTrainer` samples ``samples_per_prompt`` images for each of
``prompts_per_iteration`` prompts with the current policy (deterministic ODE), scores them with the reward
spec, lets the trainer :meth:`~OnlineWeightedTrainer.prepare` the batch (weights, a critic fit, an old-policy
copy), then takes ``num_epochs`` passes of minibatch flow-matching steps on the trainer's
:meth:`~OnlineWeightedTrainer.loss` at fresh noise and times. The shared config is :class:`OnlineConfig`;
the loop, checkpoints and ``train`` are :class:`~rlflow.trainers.iteration_loop.IterationLoopTrainer`'s. Every
online trainer stops with an error after ``max_flat_iterations`` iterations in a row whose groups all scored the
same (:class:`~rlflow.rollout.advantages.LearningSignalMonitor`), and before the optimizer step on a non-finite
loss.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.flows.gaussian import standard_normal
from rlflow.flows.solvers import OdeMethod, nfe_per_step
from rlflow.flows.time import sample_training_times
from rlflow.rollout.advantages import LearningSignalMonitor
from rlflow.trainers.flow_objectives import flow_matching_errors
from rlflow.trainers.iteration_loop import IterationLoopTrainer
from rlflow.trainers.policy_snapshot import PolicySnapshot
from rlflow.trainers.text_to_image import (
    TextToImageConfig,
    output_dir_option,
)

__all__ = [
    "OnlineBatch",
    "OnlineConfig",
    "OnlineWeightedTrainer",
    "normalized_exp_weights",
    "weight_metrics",
    "weighted_flow_matching_loss",
]


# ------------------------------------------------------------------------------------------------ math
def normalized_exp_weights(logits: Tensor, *, group_size: int | None = None) -> Tensor:
    """``n * softmax(logits)`` over the last ``n`` entries of each group (mean exactly 1 per group).

    ``logits: [B]``; ``group_size`` (dividing ``B``) normalises within consecutive groups of that size,
    ``None`` over the whole batch. Softmax is the numerically safe way to compute ``exp(l) / mean exp(l)``.
    """
    if logits.ndim != 1:
        raise ValueError(f"weights need a flat [B] vector of logits, got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if group_size is None:
        return torch.softmax(logits, dim=0) * batch
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide the batch size {batch}")
    grouped = logits.reshape(batch // group_size, group_size)
    return (torch.softmax(grouped, dim=1) * group_size).reshape(batch)


def weighted_flow_matching_loss(errors: Tensor, weights: Tensor) -> Tensor:
    """``mean_b(w_b * e_b)`` for per-sample flow-matching errors ``e: [B]`` and weights ``w: [B]``."""
    if errors.shape != weights.shape or errors.ndim != 1:
        raise ValueError(
            f"errors and weights must both be [B]; got {tuple(errors.shape)} and {tuple(weights.shape)}"
        )
    return (weights.to(errors) * errors).mean()


def weight_metrics(weights: Tensor, prefix: str = "train/weight") -> dict[str, float]:
    """Summary statistics of sample weights, incl. the effective sample size fraction ``(sum w)^2 / (B sum w^2)``."""
    w = weights.detach().float()
    return {
        f"{prefix}_mean": float(w.mean()),
        f"{prefix}_max": float(w.max()),
        f"{prefix}_min": float(w.min()),
        f"{prefix}_std": float(w.std(unbiased=False)),
        f"{prefix}_ess_fraction": float(w.sum() ** 2 / (w.numel() * w.square().sum()).clamp_min(1e-30)),
    }


# ------------------------------------------------------------------------------------------------ config
@dataclass
class OnlineConfig(TextToImageConfig):
    """Settings shared by the online forward-process trainers (RWR, actor-critic, DiffusionNFT)."""

    output_dir: str = output_dir_option("runs/rwr")

    prompts_per_iteration: int = option(16, help="Prompts sampled per iteration.")
    samples_per_prompt: int = option(8, help="Samples per prompt.")
    num_steps: int = option(10, help="ODE steps for the training samples.")
    ode_method: OdeMethod = option(
        "euler",
        help="ODE solver of the training samples: euler (1 velocity evaluation per step) or a second-order heun "
        "/ midpoint (2 per step). 10 Euler steps shrink the shapes base's samples towards the mean; 10 heun steps "
        "match an 80-step Euler sample. Self-training on heun samples still collapses, only more slowly "
        "(docs/alignment.md): see rollout_refresh_iterations.",
    )
    time_distribution: Literal["uniform", "logit_normal"] = option(
        "uniform", help="Distribution of the flow-matching training times t."
    )

    num_epochs: int = option(1, help="Passes over each iteration's samples.")
    minibatch_size: int = option(32, help="Samples per optimizer step (several steps per iteration).")
    max_flat_iterations: int = option(
        3,
        help="Stop with an error after this many consecutive iterations in which every prompt's samples "
        "scored the same (no learning signal); 0: never.",
    )

    def updates_per_iteration(self) -> int:
        batch = self.prompts_per_iteration * self.samples_per_prompt
        return self.num_epochs * -(-batch // self.minibatch_size)


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class OnlineBatch:
    """One iteration's samples, flattened prompt-major: ``[M = P * N]`` rows."""

    latents: Tensor  # [M, *latent_shape] on the model's device: the x1 of the regression
    prompts: list[str]  # [M]
    rewards: Tensor  # [M] float32, CPU
    group_ids: Tensor  # [M] the prompt index of each row
    group_size: int
    components: dict[str, Tensor] = field(default_factory=dict)  # reward component name -> [M]

    def __len__(self) -> int:
        return self.latents.shape[0]


class OnlineWeightedTrainer(IterationLoopTrainer):
    """Sample -> score -> weighted flow-matching regression; subclasses define :meth:`loss`."""

    name = "online"
    tracks_nfe = True

    def __init__(
        self,
        config: OnlineConfig,
        *,
        model: Any | None = None,
        reward: Any | None = None,
        prompts: Any | None = None,
    ):
        self.config = config  # needs_reference() reads it
        self.setup_text_to_image(
            config,
            model=model,
            prompts=prompts,
            reward=reward,
            micro_batch_size=config.minibatch_size,
            reference=self.needs_reference(),
        )

        self.setup_optimization(total_updates=config.iterations * config.updates_per_iteration())
        self.iteration = 0
        self.nfe = 0
        self.signal_monitor = LearningSignalMonitor(config.max_flat_iterations)

    def needs_reference(self) -> bool:
        """Whether the loss evaluates the reference model (full fine-tuning then keeps a frozen copy)."""
        return False

    def policy_snapshot(self, feature: str) -> PolicySnapshot:
        """A copy of the current trainable weights to swap in later (NFT's old policy, RWR's rollout policy);
        refused under ZeRO-3, where this rank holds only shards and the copy would not be one policy."""
        if self.runtime.zero_stage == 3:
            raise ConfigError(
                f"{feature} keeps an unsharded copy of the trainable weights, which ZeRO-3 does not support; "
                "use ZeRO-2 or DDP"
            )
        return PolicySnapshot(self.runtime.local_tensors(self.trainable))

    # ------------------------------------------------------------------------------------- samples
    def collect(self) -> OnlineBatch:
        config = self.config
        groups = self.sample_prompt_groups(config.ode_method)
        num_prompts, group_size = groups.rewards.shape
        latents = groups.latents.reshape(num_prompts * group_size, *groups.latents.shape[2:])
        self.nfe += num_prompts * group_size * config.num_steps * nfe_per_step(config.ode_method)
        return OnlineBatch(
            latents=latents.to(self.device),
            prompts=[p for p in groups.prompts for _ in range(group_size)],
            rewards=groups.rewards.reshape(-1).float().cpu(),
            group_ids=torch.arange(num_prompts).repeat_interleave(group_size),
            group_size=group_size,
            components={name: value.reshape(-1).float().cpu() for name, value in groups.components.items()},
        )

    # ------------------------------------------------------------------------------------- update
    def prepare(self, batch: OnlineBatch) -> dict[str, float]:
        """Per-iteration work before the minibatch loop (weights, critic fits); returns metrics."""
        return {}

    @abc.abstractmethod
    def loss(
        self, batch: OnlineBatch, rows: Tensor, t: Tensor, noise: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The minibatch loss on ``batch``'s samples ``rows`` at times ``t`` with noise ``noise``."""

    def actor_active(self) -> bool:
        """Whether this iteration updates the model (the actor-critic warm-up trains only its critic)."""
        return True

    def optimizer_steps(self, order: Tensor) -> list[list[Tensor]]:
        """One epoch's optimizer steps over the shuffled rows ``order``: each step is a list of minibatches
        whose gradients accumulate (weighted by their share of the step's rows). Default: one step per
        minibatch of ``minibatch_size`` rows."""
        return [[rows] for rows in order.split(self.config.minibatch_size)]

    def training_times(self, num: int) -> Tensor:
        """``[num]`` flow-matching training times for one minibatch (``time_distribution``)."""
        return sample_training_times(num, self.config.time_distribution, generator=self.generator)

    def forwards_per_sample(self) -> int:
        """Velocity evaluations per sample per minibatch of the loss (counted in ``rollout/nfe_total``)."""
        return 2 if self.needs_reference() else 1

    def update(self, batch: OnlineBatch) -> dict[str, float]:
        config = self.config
        out = self.prepare(batch)
        if not self.actor_active():
            return out
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        for _ in range(config.num_epochs):
            order = torch.randperm(len(batch), generator=self.generator)
            for minibatches in self.optimizer_steps(order):
                step_rows = sum(len(rows) for rows in minibatches)
                self.runtime.zero_grad(self.optimizer)
                for index, rows in enumerate(minibatches):
                    # Fresh noise and times every minibatch: the target is x1 - x0 on a new path point.
                    t = self.training_times(len(rows)).to(self.device)
                    noise = standard_normal(
                        (len(rows), *batch.latents.shape[1:]), generator=self.generator, device=self.device
                    )
                    loss, metrics = self.loss(batch, rows, t, noise)
                    if not torch.isfinite(loss):  # before any weight is touched
                        raise FloatingPointError(
                            f"{self.name} loss is {loss.item()} at iteration {self.iteration + 1}; lower "
                            "learning_rate or check the reward and the model for NaN/inf"
                        )
                    share = len(rows) / step_rows
                    self.runtime.backward(
                        loss if share == 1.0 else loss * share, boundary=index == len(minibatches) - 1
                    )
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * len(rows)
                    count += len(rows)
                    self.nfe += len(rows) * self.forwards_per_sample()
                grad_norms.append(self.runtime.step(self.optimizer, self.trainable))
                self.scheduler.step()
                self.update_ema()
        out.update({key: value / count for key, value in sums.items()})
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        out["train/updates"] = float(len(grad_norms))
        return out

    def errors(self, batch: OnlineBatch, rows: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample flow-matching errors ``[len(rows)]`` of the trained model on the rows' samples."""
        cond = self.model.encode_prompts([batch.prompts[i] for i in rows.tolist()])
        return flow_matching_errors(self.model, batch.latents[rows.to(self.device)], cond, t, noise)

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Deterministic (ODE) samples for the fixed evaluation prompts, scored by every reward."""
        prompts, images = self.evaluation_images()
        return self.image_metrics(images, prompts, grid_path)

    # ------------------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict[str, Any]:
        """Subclass state for checkpoints (e.g. the critic and its optimizer)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {"extra": self.extra_state(), "flat_iterations": self.signal_monitor.streak}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.signal_monitor.streak = int(state.get("flat_iterations", 0))
        self.load_extra_state(state.get("extra", {}))

    # ------------------------------------------------------------------------------------- loop hooks
    @property
    def progress_name(self) -> str:
        return self.name

    def learn(self, batch: OnlineBatch) -> dict[str, float]:
        # Raises after max_flat_iterations batches in a row without any within-group reward difference.
        flat = self.signal_monitor.update(batch.rewards, batch.group_ids)
        metrics = self.update(batch)
        metrics.update(_rollout_metrics(batch))
        metrics["rollout/zero_std_group_fraction"] = flat
        return metrics

    def summary_fields(
        self, final: dict[str, float], wall: float, base: dict[str, Any] | None, model_dir: Path
    ) -> dict[str, Any]:
        return {"trainer": self.name, **super().summary_fields(final, wall, base, model_dir)}


def _rollout_metrics(batch: OnlineBatch) -> dict[str, float]:
    rewards = batch.rewards
    grouped = rewards.reshape(-1, batch.group_size)
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std(unbiased=False)),
        "rollout/reward_max": float(rewards.max()),
        "rollout/group_reward_std_mean": float(grouped.std(dim=1, unbiased=False).mean()),
        "rollout/samples": float(len(batch)),
    }
    for name, value in batch.components.items():
        metrics[f"rewards/{name}/mean"] = float(value.mean())
    return metrics
