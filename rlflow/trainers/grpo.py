"""GRPO for text-to-image flow models: Flow-GRPO, Flow-GRPO-Fast and TempFlow-GRPO (``rlflow grpo``).

Flow-GRPO (arXiv 2505.05470) turns the deterministic sampler into an SDE with the same marginals, so every
denoising step is a Gaussian policy with an exact log-density; it samples a *group* of images per prompt,
normalises rewards within the group (no critic), and optimises a clipped-ratio objective on the SDE
transitions with a KL penalty towards the reference model (the same network with its LoRA adapters
disabled). Variants (``variant``):

- ``flow_grpo``: SDE on every step; train on a ``timestep_fraction`` of them (random per sample, as in
  the reference, or the first ones).
- ``fast``: SDE only inside a window of ``window_size`` steps, ODE elsewhere; train only the window. The
  window starts at a random step (Flow-GRPO-Fast) or slides forward during training (MixGRPO).
- ``tempflow``: TempFlow-GRPO (arXiv 2508.04324): an ODE main chain per prompt; at each branch step,
  ``group_size`` one-step SDE explorations finished by the ODE; each explores's final reward is the
  process reward of its branch step; groups are (prompt, branch step); noise-aware loss weights.

Reading order: :class:`GRPOConfig` -> :class:`GRPOTrainer` (``__init__`` -> ``collect`` -> ``transitions``
-> ``loss`` -> ``update`` -> ``evaluate`` -> the loop hooks; checkpoints and ``train`` are
:class:`~rlflow.trainers.iteration_loop.IterationLoopTrainer`'s). Runs under ``accelerate launch`` (DDP):
each process samples whole groups, so group advantages never cross processes.

Log-prob reduction (``logprob_reduction``): ``sum`` is the true log-density of a transition (sum over
latent elements); ``mean`` divides it by the number of elements, as the Flow-GRPO reference does. The
clip range is on the ratio of those quantities, so it must match: ``mean`` with ``clip_range 1e-4``
(the reference's value) is about the same trust region as ``sum`` with ``clip_range ~ 1e-4 * D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.flows.kernels import EulerStep, make_kernel
from rlflow.flows.sampling import sample_chain, score_transitions
from rlflow.flows.time import time_grid
from rlflow.rollout.advantages import LearningSignalMonitor, group_advantages
from rlflow.rollout.prompts import (
    PromptRolloutBatch,
    collect_branched_groups,
    collect_prompt_groups,
)
from rlflow.trainers.iteration_loop import IterationLoopTrainer
from rlflow.trainers.text_to_image import (
    TextToImageConfig,
    output_dir_option,
)

#: Max |log ratio| per latent element tolerated at the first minibatch of an iteration. Re-scoring in a
#: different batch composition than sampling can change float32 results in the last bits.
FIRST_RATIO_TOLERANCE = 1e-4


@dataclass
class GRPOConfig(TextToImageConfig):
    """Flow-GRPO and its variants. Defaults follow Flow-GRPO's SD3.5 GenEval settings where they transfer."""

    output_dir: str = output_dir_option("runs/grpo")
    learning_rate: float = option(3e-4, help="AdamW learning rate (Flow-GRPO: 3e-4 with LoRA).")
    weight_decay: float = option(1e-4, help="AdamW weight decay.")
    ema_decay: float = option(0.0, help="EMA of the trained weights for evaluation (0: off; Flow-GRPO: 0.9).")
    eval_num_steps: int = option(20, help="ODE steps for evaluation (Flow-GRPO: 40).")
    sample_chunk_size: int = option(32, help="Samples per sampling call (memory knob).")

    variant: Literal["flow_grpo", "fast", "tempflow"] = option("flow_grpo", help="Which GRPO variant.")
    prompts_per_iteration: int = option(8, help="Prompts sampled per iteration and process.")
    group_size: int = option(
        8,
        bounds="[2, inf)",  # advantages compare the samples of a group
        help="Samples per prompt (TempFlow: explorations per branch step); at least 2.",
    )
    num_steps: int = option(10, help="Denoising steps for training rollouts (Flow-GRPO: 10).")
    kernel: Literal["flow_sde", "cps"] = option("flow_sde", help="Stochastic step: Flow-GRPO's SDE or CPS.")
    noise_level: float = option(0.7, help="SDE noise level a (Flow-GRPO: 0.7).")
    shared_noise: bool = option(False, help="Share the initial noise within a group (DanceGRPO).")
    timestep_fraction: float = option(
        0.9, help="flow_grpo: fraction of SDE steps each sample trains on (Flow-GRPO: 0.99 of 10 -> 9)."
    )
    timestep_selection: Literal["random", "first"] = option(
        "random",
        help="flow_grpo: train a random subset per sample (reference, DanceGRPO) or the first steps.",
    )
    window_size: int = option(2, help="fast: SDE window length in steps.")
    window_schedule: Literal["random", "sliding"] = option(
        "random",
        help="fast: random window start per iteration (Flow-GRPO-Fast) or a sliding window (MixGRPO).",
    )
    window_max_start: int | None = option(
        None, help="fast: the window starts in [0, window_max_start] (null: num_steps // 2)."
    )
    window_shift_every: int = option(10, help="fast + sliding: iterations between window advances.")
    branch_steps: list[int] | None = option(
        None, help="tempflow: steps to branch at (null: 4 steps evenly from 0 to 3/4 of the grid)."
    )
    noise_aware_weighting: bool = option(
        True, help="tempflow: weight step losses by sigma_t * sqrt(dt), normalised to mean 1."
    )

    std_mode: Literal["group", "global"] = option("group", help="Advantage std per group or over the batch.")
    advantage_clip: float = option(5.0, help="Clip advantages to [-c, c] (Flow-GRPO: 5).")
    clip_range: float = option(1e-4, help="PPO ratio clip epsilon (Flow-GRPO: 1e-4 with mean reduction).")
    logprob_reduction: Literal["mean", "sum"] = option(
        "mean", help="Per-element mean (Flow-GRPO) or the true summed log-density; see the module docs."
    )
    kl_beta: float = option(0.04, help="KL coefficient towards the reference (GenEval: 0.04; 0: no KL).")

    num_epochs: int = option(1, help="Passes over each iteration's transitions.")
    updates_per_epoch: int = option(1, help="Optimizer updates per pass (transitions split evenly).")
    minibatch_size: int = option(32, help="Transitions per forward/backward (gradients accumulate).")
    asynchronous_rewards: bool = option(True, help="Compute rewards in a background thread during sampling.")

    max_flat_iterations: int = option(
        3,
        help="Stop with an error after this many consecutive iterations in which every group's samples "
        "scored the same (zero advantages everywhere: no learning signal); 0: never.",
    )
    nfe_budget: int | None = option(
        None,
        help="Stop once this many velocity evaluations (sampling + training, per process) are spent "
        "(null: run all iterations). Used to compare variants at equal compute.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant == "fast" and not 1 <= self.window_size <= self.num_steps:
            raise ConfigError(
                f"window_size must be in [1, num_steps={self.num_steps}], got {self.window_size}"
            )
        if self.variant == "tempflow" and self.shared_noise:
            raise ConfigError(
                "shared_noise does not apply to variant tempflow (the branches of a group already share their "
                "chain up to the branch step); remove it"
            )
        if self.branch_steps is not None and any(not 0 <= b < self.num_steps for b in self.branch_steps):
            raise ConfigError(f"branch_steps must be in [0, {self.num_steps}), got {self.branch_steps}")

    # -- derived schedules ---------------------------------------------------------------------------
    def resolved_branch_steps(self) -> list[int]:
        if self.branch_steps is not None:
            return sorted(set(self.branch_steps))
        last = max(1, (3 * self.num_steps) // 4)
        return sorted({round(i * last / 3) for i in range(4)})

    def window_start(self, iteration: int, generator: torch.Generator) -> int:
        max_start = self.window_max_start if self.window_max_start is not None else self.num_steps // 2
        max_start = min(max_start, self.num_steps - self.window_size)
        if self.window_schedule == "sliding":
            return (iteration // self.window_shift_every) % (max_start + 1)
        return int(torch.randint(max_start + 1, (1,), generator=generator))


@dataclass
class Transitions:
    """The (sample, step) pairs an iteration trains on, with everything the loss needs: ``[M]`` each."""

    sample_index: Tensor
    step_index: Tensor
    old_log_probs: Tensor  # as sampled (summed over elements)
    advantages: Tensor
    weights: Tensor  # noise-aware weights (1 unless TempFlow's weighting is on)

    def __len__(self) -> int:
        return self.sample_index.shape[0]

    def select(self, index: Tensor) -> Transitions:
        return Transitions(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


class GRPOTrainer(IterationLoopTrainer):
    tracks_nfe = True

    def __init__(
        self,
        config: GRPOConfig,
        *,
        model: Any | None = None,
        reward: Any | None = None,
        prompts: Any | None = None,
    ):
        # Model, adapters (or the frozen reference copy when kl_beta > 0), prompts and reward first: the
        # optimizer and the DDP wrapping below need the trainable parameters to exist.
        self.setup_text_to_image(
            config,
            model=model,
            prompts=prompts,
            reward=reward,
            micro_batch_size=config.minibatch_size,
            reference=config.kl_beta > 0,
        )
        self.kernel = make_kernel(config.kernel, noise_level=config.noise_level)
        grid = self.time_grid_kind
        self.times = time_grid(config.num_steps, shift=config.time_shift, kind=grid, device=self.device)
        self.eval_times = time_grid(
            config.eval_num_steps, shift=config.time_shift, kind=grid, device=self.device
        )

        self.setup_optimization(
            total_updates=config.iterations * config.num_epochs * config.updates_per_epoch
        )
        self.iteration = 0
        self.signal_monitor = LearningSignalMonitor(config.max_flat_iterations)
        self.nfe = 0

    # ------------------------------------------------------------------------------------- rollouts
    def collect(self) -> PromptRolloutBatch:
        config = self.config
        prompts = self.prompts.sample(config.prompts_per_iteration, self.generator)
        common = dict(
            group_size=config.group_size,
            times=self.times,
            generator=self.generator,
            chunk_size=config.sample_chunk_size,
            asynchronous_rewards=config.asynchronous_rewards,
            device=self.device,
        )
        self.model.eval()
        if config.variant == "tempflow":
            return collect_branched_groups(
                self.model,
                self.kernel,
                self.reward,
                prompts,
                branch_steps=config.resolved_branch_steps(),
                **common,
            )
        stochastic, train_steps = self._sde_steps(len(prompts) * config.group_size)
        return collect_prompt_groups(
            self.model,
            self.kernel,
            self.reward,
            prompts,
            stochastic_steps=stochastic,
            train_steps=train_steps,
            shared_noise=config.shared_noise,
            **common,
        )

    def _sde_steps(self, num_samples: int) -> tuple[Tensor, Tensor]:
        """The SDE mask ``[K]`` and each sample's trained steps ``[N, S]`` for flow_grpo / fast."""
        config, num_steps = self.config, self.config.num_steps
        stochastic = torch.zeros(num_steps, dtype=torch.bool)
        if config.variant == "fast":
            start = config.window_start(self.iteration, self.generator)
            stochastic[start : start + config.window_size] = True
            window = torch.arange(start, start + config.window_size)
            return stochastic, window.expand(num_samples, -1).clone()
        stochastic[:] = True
        num_train = max(1, int(round(num_steps * config.timestep_fraction)))
        if config.timestep_selection == "first":
            return stochastic, torch.arange(num_train).expand(num_samples, -1).clone()
        # A random subset per sample (argsort of uniform noise = one permutation per row, vectorised).
        order = torch.rand(num_samples, num_steps, generator=self.generator).argsort(dim=1)
        return stochastic, order[:, :num_train].sort(dim=1).values

    # ------------------------------------------------------------------------------------- advantages
    def transitions(self, batch: PromptRolloutBatch) -> Transitions:
        config = self.config
        advantages = self._advantages(batch)
        num_samples, per_sample = batch.train_steps.shape
        sample_index = torch.arange(num_samples).repeat_interleave(per_sample)
        step_index = batch.train_steps.reshape(-1).cpu()
        old = batch.trajectory.log_probs.cpu()[sample_index, step_index]
        weights = torch.ones(sample_index.shape[0])
        if config.variant == "tempflow" and config.noise_aware_weighting:
            weights = self._noise_aware_weights(step_index)
        return Transitions(sample_index, step_index, old, advantages[sample_index], weights)

    def _advantages(self, batch: PromptRolloutBatch) -> Tensor:
        config = self.config
        pooled = None
        if config.std_mode == "global" and self.accelerator.num_processes > 1:
            # Groups stay within a process; only the global std needs every process's rewards.
            pooled = self.accelerator.gather(batch.rewards.to(self.device)).cpu()
        return group_advantages(
            batch.rewards,
            batch.group_ids,
            std_mode=config.std_mode,
            clip=config.advantage_clip,
            global_rewards=pooled,
        )

    def _noise_aware_weights(self, step_index: Tensor) -> Tensor:
        """TempFlow-GRPO: the loss at step k is weighted by the transition std ``sigma_{t_k} sqrt(dt_k)``,
        normalised to mean 1 over the trained steps (the reference uses a hand-set constant instead)."""
        times = self.times.cpu().double()
        probe = torch.zeros(len(times) - 1, 1)
        _, std = self.kernel.mean_and_std(
            probe, torch.zeros_like(probe), times[:-1].float(), times[1:].float()
        )
        per_step = std.reshape(len(times) - 1, -1)[:, 0].double()
        weights = per_step[step_index]
        return (weights / weights.mean()).float()

    # ------------------------------------------------------------------------------------- loss
    def loss(self, batch: PromptRolloutBatch, chunk: Transitions) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        traj = batch.trajectory
        scores = score_transitions(self.model, self.kernel, traj, chunk.sample_index, chunk.step_index)
        elements = math.prod(traj.chain.shape[2:])
        scale = 1.0 / elements if config.logprob_reduction == "mean" else 1.0
        new = scores.log_probs.float() * scale
        old = chunk.old_log_probs.to(new.device) * scale
        log_ratio = new - old
        ratio = torch.exp(log_ratio)
        advantages = chunk.advantages.to(new.device)
        weights = chunk.weights.to(new.device)
        clipped = torch.clamp(ratio, 1.0 - config.clip_range, 1.0 + config.clip_range)
        policy_loss = (torch.maximum(-advantages * ratio, -advantages * clipped) * weights).mean()
        loss = policy_loss
        metrics = {
            "train/policy_loss": policy_loss.detach(),
            "train/clip_fraction": ((ratio - 1.0).abs() > config.clip_range).float().mean().detach(),
            "train/approx_kl": (0.5 * log_ratio.detach() ** 2).mean(),
            "train/ratio_mean": ratio.detach().mean(),
            "train/log_ratio_per_element_max": (log_ratio.detach().abs() / (scale * elements)).max(),
        }
        if config.kl_beta > 0:
            with torch.no_grad(), self.model.reference():
                ref = score_transitions(self.model, self.kernel, traj, chunk.sample_index, chunk.step_index)
            # KL(N(mu, s^2) || N(mu_ref, s^2)) = |mu - mu_ref|^2 / (2 s^2), reduced like the log-probs.
            # Deterministic coordinates (std 0, e.g. CPS's last step) carry no KL.
            variance = scores.stds**2
            per_element = torch.where(
                variance > 0, (scores.means - ref.means) ** 2 / (2.0 * variance.clamp_min(1e-30)), 0.0
            )
            kl = per_element.flatten(1).sum(dim=1) * scale
            kl = kl.mean()
            loss = loss + config.kl_beta * kl
            metrics["train/kl"] = kl.detach()
        metrics["train/loss"] = loss.detach()
        return loss, metrics

    def update(self, batch: PromptRolloutBatch) -> dict[str, float]:
        config = self.config
        transitions = self.transitions(batch)
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        first = True
        grad_norms = []
        for _ in range(config.num_epochs):
            order = torch.randperm(len(transitions), generator=self.generator)
            for update_rows in order.chunk(config.updates_per_epoch):
                self.runtime.zero_grad(self.optimizer)
                minibatches = update_rows.split(config.minibatch_size)
                for index, rows in enumerate(minibatches):
                    chunk = transitions.select(rows)
                    loss, metrics = self.loss(batch, chunk)
                    if not torch.isfinite(loss):  # before any weight (or checkpoint) is touched
                        raise FloatingPointError(
                            f"GRPO loss is {loss.item()} at iteration {self.iteration + 1}; lower learning_rate "
                            "or kl_beta, or check the reward and the model for NaN/inf"
                        )
                    if first:
                        self._check_first_ratio(metrics)
                        first = False
                    self.runtime.backward(
                        loss * (len(rows) / len(update_rows)), boundary=index == len(minibatches) - 1
                    )
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * len(rows)
                    count += len(rows)
                grad_norms.append(self.runtime.step(self.optimizer, self.trainable))
                self.scheduler.step()
                self.update_ema()
        out = {key: value / count for key, value in sums.items()}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        out["train/transitions"] = float(len(transitions))
        # Velocity evaluations spent on training: one per transition and epoch, plus the reference's.
        out["train/nfe"] = float(len(transitions) * config.num_epochs * (2 if config.kl_beta > 0 else 1))
        return out

    def _check_first_ratio(self, metrics: dict[str, Tensor]) -> None:
        """Before the first optimizer step of an iteration the policy IS the sampling policy: ratio 1."""
        worst = float(metrics["train/log_ratio_per_element_max"])
        self._first_ratio = worst
        if worst > FIRST_RATIO_TOLERANCE:
            raise RuntimeError(
                f"the first-update ratio is not 1 (max |log ratio| per element {worst:.2e} > "
                f"{FIRST_RATIO_TOLERANCE:.0e}): sampling and re-scoring disagree; check that the model is "
                "deterministic (no dropout) and that the same time grid and kernel are used"
            )

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Deterministic (ODE) samples for the fixed evaluation prompts, scored by every reward."""
        config = self.config
        prompts = self.prompts.eval_prompts()
        generator = torch.Generator().manual_seed(config.seed + 12345)  # the same noise every evaluation
        backup = self._swap_in_ema()
        self.model.eval()
        try:
            images = []
            for start in range(0, len(prompts), config.sample_chunk_size):
                part = prompts[start : start + config.sample_chunk_size]
                cond = self.model.encode_prompts(part)
                from rlflow.flows.gaussian import standard_normal

                x0 = standard_normal((len(part), *self.model.latent_shape), generator=generator).to(
                    self.device
                )
                traj = sample_chain(self.model, EulerStep(), x0, self.eval_times, cond, deterministic=True)
                images.append(self.model.decode(traj.sample).float().cpu())
        finally:
            self._restore(backup)
        return self.image_metrics(torch.cat(images), prompts, grid_path)

    # ------------------------------------------------------------------------------------- loop hooks
    @property
    def progress_name(self) -> str:
        return f"grpo {self.config.variant}"

    def finished(self) -> bool:
        # The NFE budget ends a run early so that variants can be compared at equal compute.
        return super().finished() or (
            self.config.nfe_budget is not None and self.nfe >= self.config.nfe_budget
        )

    def learn(self, batch: PromptRolloutBatch) -> dict[str, float]:
        # Before the update: a run whose groups keep scoring the same stops instead of making no-op updates.
        flat = self.signal_monitor.update(batch.rewards, batch.group_ids, hint="group_size")
        metrics = self.update(batch)
        self.nfe += batch.nfe + int(metrics["train/nfe"])
        metrics.update(_rollout_metrics(batch))
        metrics["rollout/zero_std_group_fraction"] = flat
        metrics["train/first_log_ratio_per_element"] = self._first_ratio
        return metrics

    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {"flat_iterations": self.signal_monitor.streak}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.signal_monitor.streak = int(state.get("flat_iterations", 0))

    def summary_fields(
        self, final: dict[str, float], wall: float, base: dict[str, Any] | None, model_dir: Path
    ) -> dict[str, Any]:
        return {"variant": self.config.variant, **super().summary_fields(final, wall, base, model_dir)}


# ------------------------------------------------------------------------------------------------ helpers
def _rollout_metrics(batch: PromptRolloutBatch) -> dict[str, float]:
    rewards = batch.rewards
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std(unbiased=False)),
        "rollout/samples": float(len(batch)),
    }
    # The spread of rewards within a group is all a group-relative advantage can use.
    _, inverse = torch.unique(batch.group_ids, return_inverse=True)
    size = int(inverse.max()) + 1
    count = torch.zeros(size).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(size).index_add_(0, inverse, rewards) / count
    variance = torch.zeros(size).index_add_(0, inverse, (rewards - mean[inverse]).square()) / count
    metrics["rollout/group_reward_std_mean"] = float(variance.sqrt().mean())
    for name, value in batch.reward_components.items():
        metrics[f"rewards/{name}/mean"] = float(value.mean())
    return metrics


def train(config: GRPOConfig) -> dict[str, Any]:
    """Entry point of ``rlflow grpo``."""
    return GRPOTrainer(config).train()


__all__ = ["GRPOConfig", "GRPOTrainer", "Transitions", "train"]
