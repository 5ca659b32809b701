"""Flow-DPO: direct preference optimisation of a flow-matching model (``rlflow dpo``).

Diffusion-DPO (Wallace et al. 2023) and its flow form (VideoAlign, arXiv 2501.13918, Eq. 6) train on pairs
``(x_w, x_l)`` of a winner and a loser sample for the same prompt. With the per-sample flow-matching error
``e(x) = ||(x - x0) - v(x_t, t, c)||^2`` at ``x_t = (1 - t) x0 + t x`` (our convention: ``t = 1`` is
data, the velocity target is ``x1 - x0``), the loss of a pair is::

    bracket = (e_theta(x_w) - e_ref(x_w)) - (e_theta(x_l) - e_ref(x_l))
    L       = -log sigmoid(-(beta_t / 2) * bracket)

with the SAME ``t`` and the SAME noise ``x0`` for winner and loser (the two errors are then compared on
equal footing; different noise would add variance that has nothing to do with the preference). Lowering
the policy's error on the winner (relative to the reference) and raising it on the loser makes the bracket
negative and the loss fall below ``log 2``, its value while the policy equals the reference. The DPO
"implicit reward" of a sample is ``-(beta_t / 2) * (e_theta - e_ref)``; the *implicit accuracy* is the
fraction of pairs whose bracket is negative (winner's implicit reward above the loser's), exact ties
(the untrained policy) counting 1/2.

``beta_t`` (``beta_schedule``):

- ``constant``: ``beta_t = beta`` (VideoAlign's choice; the Diffusion-DPO weighting caused reward hacking
  in their experiments).
- ``diffusion_dpo``: Diffusion-DPO's epsilon-error loss mapped to velocity errors. With ``x_t = x0 + t v``
  (``v = x1 - x0``) the noise estimate of a velocity estimate is ``eps_hat = x_t - t v_hat``, so
  ``eps - eps_hat = -t (v - v_hat)`` and ``||eps - eps_hat||^2 = t^2 ||v - v_hat||^2``: the epsilon
  errors are the velocity errors times ``t^2`` (= ``(1 - sigma)^2`` with diffusers' ``sigma = 1 - t``),
  i.e. ``beta_t = beta * t^2``. It puts no weight on the noisy end.

``beta`` and the error reduction (``error_reduction``) go together: the errors are a per-element mean
(``mean``) or a squared norm (``sum`` = mean x number of latent elements). Published values (all ``mean``):
Diffusion-DPO SD1.5/SDXL 5000 (epsilon errors), flow_grpo's SD3 DPO 100, VideoAlign 500 (reduction
unclear). With ``sum``, divide beta by the number of latent elements to get the same objective.

Data (``mode``):

- ``offline``: a :class:`~rlflow.data.preferences.PreferenceSet` directory; trains on its model-space
  samples (``latents_a`` / ``latents_b``) and the labels of one ``dimension``; ties are dropped (counted in
  ``summary.json``). An optional held-out split reports the implicit accuracy on unseen pairs.
- ``online``: every iteration samples ``samples_per_prompt`` ODE samples per prompt from the current policy,
  scores them with ``rewards`` and pairs the best with the worst sample of each prompt (groups whose best
  and worst rewards are equal carry no preference and are skipped).

Reference model: the base with the LoRA adapters disabled, or a frozen copy for full fine-tuning
(``model.lora_r: 0``). Reading order: :class:`DPOConfig` -> :func:`dpo_beta` -> :func:`dpo_loss` ->
:class:`PreferencePairs` / :func:`offline_pairs` / :func:`best_worst_pairs` -> :class:`DPOTrainer`.

Run directory (``output_dir``): ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``tensorboard/``
and/or ``wandb/`` (``report_to``), ``plots/`` (curves), ``images/eval_XXXXX.png`` (evaluation grids),
``checkpoints/`` (resumable), ``model/`` (the final model: EMA weights if enabled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.flows.gaussian import standard_normal
from rlflow.flows.time import (
    TimeDistribution,
    sample_training_times,
)
from rlflow.trainers.flow_objectives import (
    ErrorReduction,
    OnlineGroups,
    flow_matching_errors,
)
from rlflow.trainers.iteration_loop import IterationLoopTrainer, final_and_base
from rlflow.trainers.text_to_image import (
    TextToImageConfig,
    output_dir_option,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DPOConfig",
    "DPOLoss",
    "DPOTrainer",
    "PreferencePairs",
    "best_worst_pairs",
    "dpo_beta",
    "dpo_loss",
    "offline_pairs",
    "pair_errors",
    "train",
]

BetaSchedule = Literal["constant", "diffusion_dpo"]


@dataclass
class DPOConfig(TextToImageConfig):
    """Flow-DPO (offline preference pairs or online best-vs-worst pairs). See the module docs."""

    output_dir: str = output_dir_option("runs/dpo")
    learning_rate: float = option(1e-5, help="AdamW learning rate.")
    rewards: dict[str, Any] = option(
        default_factory=lambda: {"shapes_verifier": 1.0},
        help="Reward components and weights (GRPO's format): online pairing and evaluation. Offline mode "
        "may set {} (evaluation then reports held-out preference metrics only).",
    )

    plots: bool = option(True, help="Draw the metric curves (plots/*.png) when the run ends.")

    mode: Literal["online", "offline"] = option(
        "online", help="Pairs from a preference set or sampled online."
    )
    preferences: str | None = option(
        None, help="offline: preference-set directory (rlflow.data.preferences format, with latents)."
    )
    dimension: str | None = option(
        None, help="offline: the label dimension to train on (null: the set's first dimension)."
    )
    heldout_fraction: float = option(
        0.1, help="offline: fraction of pairs held out for evaluation (0: none)."
    )
    prompts_per_iteration: int = option(16, help="online: prompts sampled per iteration and process.")
    samples_per_prompt: int = option(
        8, bounds="[2, inf)", help="online: ODE samples per prompt; best vs worst make one pair (at least 2)."
    )
    num_steps: int = option(10, help="online: ODE steps of the training samples.")
    pairs_per_iteration: int = option(64, help="offline: pairs drawn (without replacement) per iteration.")

    updates_per_iteration: int = option(
        1, help="Optimizer steps per iteration on its pairs (fresh t and noise each step)."
    )
    timesteps_per_pair: int = option(
        1, help="Independent (t, noise) draws per pair and update (variance reduction; costs compute)."
    )
    time_distribution: TimeDistribution = option(
        "uniform", help="Training-time distribution for t (uniform, logit_normal, beta, u_shaped)."
    )
    beta: float = option(
        100.0,
        help="DPO inverse temperature; goes with error_reduction (mean: Diffusion-DPO 5000, flow_grpo SD3 "
        "100; sum: the mean value / number of latent elements).",
    )
    beta_schedule: BetaSchedule = option(
        "constant",
        help="constant (VideoAlign) or diffusion_dpo (beta_t = beta * t^2: epsilon errors as velocity errors).",
    )
    error_reduction: ErrorReduction = option(
        "mean", help="Per-sample velocity error: per-element mean or sum of squares (set beta to match)."
    )

    minibatch_size: int = option(32, help="Pairs per forward/backward (gradients accumulate).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "offline" and not self.preferences:
            raise ConfigError(
                "mode offline needs preferences: <directory of a preference set> (e.g. runs/preferences/shapes)"
            )
        if self.mode == "online" and not self.rewards:
            raise ConfigError("mode online needs rewards (e.g. {shapes_verifier: 1.0}) to rank its samples")


# ------------------------------------------------------------------------------------------------ the loss
def dpo_beta(t: Tensor, beta: float, schedule: BetaSchedule = "constant") -> Tensor:
    """``beta_t`` per pair ``[B]``: ``beta`` (constant) or ``beta * t^2`` (diffusion_dpo, module docs)."""
    if schedule == "constant":
        return torch.full_like(t, float(beta))
    if schedule == "diffusion_dpo":
        return float(beta) * t.square()
    raise ValueError(f"unknown beta_schedule {schedule!r}; choose constant or diffusion_dpo")


@dataclass
class DPOLoss:
    """Per-pair DPO quantities, ``[B]`` each."""

    loss: Tensor  # -log sigmoid(logits)
    logits: Tensor  # -(beta_t / 2) * bracket: the implicit reward margin (winner minus loser)
    bracket: Tensor  # (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)); < 0 = the pair is "right"


def dpo_loss(
    policy_winner: Tensor, policy_loser: Tensor, ref_winner: Tensor, ref_loser: Tensor, beta_t: Tensor
) -> DPOLoss:
    """Flow-DPO loss of pairs from their flow-matching errors (all ``[B]``); see the module docs."""
    bracket = (policy_winner - ref_winner) - (policy_loser - ref_loser)
    logits = -0.5 * beta_t * bracket
    # -log sigmoid(z) = softplus(-z), stable for large |z|.
    return DPOLoss(loss=F.softplus(-logits), logits=logits, bracket=bracket)


def pair_errors(
    model: Any,
    prompts: list[str],
    winners: Tensor,
    losers: Tensor,
    t: Tensor,
    noise: Tensor,
    reduction: ErrorReduction = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(policy_w, policy_l, ref_w, ref_l)`` errors ``[B]`` at the SAME ``t [B]`` and ``noise`` per pair.

    Winners and losers go through one batched forward (``[w; l]``), so batch-dependent numerics are the
    same for both; the reference forward runs without gradients inside ``model.reference()``.
    """
    x1 = torch.cat([winners, losers])
    tt = torch.cat([t, t])
    x0 = torch.cat([noise, noise])
    cond = model.encode_prompts(list(prompts) + list(prompts))
    policy = flow_matching_errors(model, x1, cond, tt, x0, reduction)
    with torch.no_grad(), model.reference():
        ref = flow_matching_errors(model, x1, cond, tt, x0, reduction)
    b = winners.shape[0]
    return policy[:b], policy[b:], ref[:b], ref[b:]


# ------------------------------------------------------------------------------------------------ pairs
@dataclass
class PreferencePairs:
    """Winner/loser model-space samples for ``B`` prompts (``[B, *latent_shape]`` each)."""

    prompts: list[str]
    winners: Tensor
    losers: Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Tensor) -> PreferencePairs:
        rows = index.tolist()
        return PreferencePairs([self.prompts[i] for i in rows], self.winners[index], self.losers[index])


def offline_pairs(preferences: Any, dimension: str | None = None) -> tuple[PreferencePairs, int]:
    """Winner/loser pairs of a :class:`~rlflow.data.preferences.PreferenceSet` on one label dimension.

    Returns the pairs and the number of tied comparisons dropped (a tie prefers neither sample).
    """
    from rlflow.data.preferences import LABEL_A, LABEL_TIE

    if preferences.kind != "image":
        raise ConfigError(f"DPO trains on image preference sets, got kind {preferences.kind!r}")
    if preferences.latents_a is None or preferences.latents_b is None:
        raise ConfigError(
            "the preference set has no latents (model-space samples) to train on; regenerate it with latents "
            "(rlflow.data.preferences: latents_a / latents_b)"
        )
    dimension = dimension if dimension is not None else preferences.dimensions[0]
    try:
        labels = preferences.labels[:, preferences.label_index(dimension)]
    except ValueError as exc:
        raise ConfigError(f"dimension: {exc}") from exc
    keep = labels != LABEL_TIE
    a_wins = (labels == LABEL_A)[keep].reshape(-1, *([1] * (preferences.latents_a.ndim - 1)))
    latents_a, latents_b = preferences.latents_a[keep].float(), preferences.latents_b[keep].float()
    prompts = [p for p, k in zip(preferences.prompts, keep.tolist(), strict=True) if k]
    pairs = PreferencePairs(
        prompts, torch.where(a_wins, latents_a, latents_b), torch.where(a_wins, latents_b, latents_a)
    )
    return pairs, int((~keep).sum())


def best_worst_pairs(groups: OnlineGroups) -> tuple[PreferencePairs, Tensor]:
    """Pair the highest- with the lowest-reward sample of each prompt; skip groups where they are equal.

    Returns the pairs and the kept-group mask ``[P]``. Ties in the maximum / minimum go to the first sample.
    """
    best = groups.rewards.argmax(dim=1)
    worst = groups.rewards.argmin(dim=1)
    rows = torch.arange(groups.rewards.shape[0])
    keep = groups.rewards[rows, best] > groups.rewards[rows, worst]
    kept = rows[keep]
    pairs = PreferencePairs(
        [groups.prompts[i] for i in kept.tolist()],
        groups.latents[kept, best[keep]],
        groups.latents[kept, worst[keep]],
    )
    return pairs, keep


# ------------------------------------------------------------------------------------------------ trainer
class DPOTrainer(IterationLoopTrainer):
    # A finished run's summary is returned on a rerun rather than evaluated again.
    skip_finished_run = True

    def __init__(
        self,
        config: DPOConfig,
        *,
        model: Any | None = None,
        reward: Any | None = None,
        prompts: Any | None = None,
        preferences: Any | None = None,
    ):
        self.setup_text_to_image(
            config,
            model=model,
            prompts=prompts,
            reward=reward,
            micro_batch_size=config.minibatch_size,
            reference=True,
            reward_required=False,  # offline DPO may train without one (no accuracy evaluation then)
        )
        if config.mode == "online" and self.reward is None:
            raise ConfigError("mode online needs a reward to rank its samples")

        self.train_pairs: PreferencePairs | None = None
        self.heldout_pairs: PreferencePairs | None = None
        self.ties_dropped = 0
        if config.mode == "offline":
            self._load_offline(preferences)

        self.setup_optimization(total_updates=config.iterations * config.updates_per_iteration)
        self.iteration = 0

    def _load_offline(self, preferences: Any | None) -> None:
        config = self.config
        if preferences is None:
            from rlflow.data.preferences import PreferenceDataError, load_preferences

            try:
                preferences = load_preferences(config.preferences)
            except (FileNotFoundError, PreferenceDataError) as exc:
                raise ConfigError(f"preferences: {exc}") from exc
        pairs, self.ties_dropped = offline_pairs(preferences, config.dimension)
        if len(pairs) < 1:
            raise ConfigError(
                f"preferences {config.preferences}: no non-tied pairs on dimension "
                f"{config.dimension or preferences.dimensions[0]!r}; choose another dimension"
            )
        logger.info("offline DPO: %d pairs, %d ties dropped", len(pairs), self.ties_dropped)
        if config.heldout_fraction > 0 and len(pairs) >= 2:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed))
            num_heldout = min(max(1, round(config.heldout_fraction * len(pairs))), len(pairs) - 1)
            self.heldout_pairs = pairs.select(order[:num_heldout].sort().values)
            pairs = pairs.select(order[num_heldout:].sort().values)
        self.train_pairs = pairs

    # ------------------------------------------------------------------------------------- pairs
    def collect(self) -> tuple[PreferencePairs, dict[str, float]]:
        """This iteration's pairs: drawn from the offline set, or sampled and ranked online."""
        config = self.config
        if config.mode == "offline":
            assert self.train_pairs is not None
            count = min(config.pairs_per_iteration, len(self.train_pairs))
            index = torch.randperm(len(self.train_pairs), generator=self.generator)[:count]
            return self.train_pairs.select(index), {"train/pairs": float(count)}
        groups = self.sample_prompt_groups()
        pairs, keep = best_worst_pairs(groups)
        rewards = groups.rewards
        metrics = {
            "rollout/reward_mean": float(rewards.mean()),
            "rollout/reward_std": float(rewards.std(unbiased=False)),
            "rollout/pairs": float(len(pairs)),
            "rollout/skipped_groups": float((~keep).sum()),
            "rollout/winner_reward_mean": float(rewards.max(dim=1).values[keep].mean())
            if keep.any()
            else 0.0,
            "rollout/loser_reward_mean": float(rewards.min(dim=1).values[keep].mean()) if keep.any() else 0.0,
            "train/pairs": float(len(pairs)),
        }
        for name, value in groups.components.items():
            metrics[f"rewards/{name}/mean"] = float(value.mean())
        return pairs, metrics

    # ------------------------------------------------------------------------------------- loss
    def loss(self, pairs: PreferencePairs, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean DPO loss of ``pairs`` (each repeated ``timesteps_per_pair`` times) and its metrics."""
        config = self.config
        repeats = config.timesteps_per_pair
        winners = pairs.winners.repeat_interleave(repeats, dim=0).to(self.device)
        losers = pairs.losers.repeat_interleave(repeats, dim=0).to(self.device)
        prompts = [p for p in pairs.prompts for _ in range(repeats)]
        t = sample_training_times(len(prompts), config.time_distribution, generator=generator).to(self.device)
        noise = standard_normal(tuple(winners.shape), generator=generator, device=self.device)
        pw, pl, rw, rl = pair_errors(self.model, prompts, winners, losers, t, noise, config.error_reduction)
        beta_t = dpo_beta(t, config.beta, config.beta_schedule)
        out = dpo_loss(pw, pl, rw, rl, beta_t)
        loss = out.loss.mean()
        metrics = {
            "train/loss": loss.detach(),
            # An exact tie (bracket 0: the policy still equals the reference) counts 1/2, so the base is 0.5.
            "train/implicit_accuracy": ((out.bracket < 0).float() + 0.5 * (out.bracket == 0).float()).mean(),
            "train/reward_margin": out.logits.detach().mean(),
            "train/bracket": out.bracket.detach().mean(),
            "train/policy_error_winner": pw.detach().mean(),
            "train/policy_error_loser": pl.detach().mean(),
            "train/ref_error_winner": rw.mean(),
            "train/ref_error_loser": rl.mean(),
            "train/beta_t_mean": beta_t.mean(),
        }
        return loss, metrics

    def update(self, pairs: PreferencePairs) -> dict[str, float]:
        config = self.config
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        for _ in range(config.updates_per_iteration):
            self.runtime.zero_grad(self.optimizer)
            minibatches = torch.arange(len(pairs)).split(config.minibatch_size)
            for index, rows in enumerate(minibatches):
                loss, metrics = self.loss(pairs.select(rows), self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"DPO loss is {loss.item()} at iteration {self.iteration}; lower beta or learning_rate"
                    )
                self.runtime.backward(loss * (len(rows) / len(pairs)), boundary=index == len(minibatches) - 1)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(rows)
                count += len(rows)
            grad_norms.append(self.runtime.step(self.optimizer, self.trainable))
            self.scheduler.step()
            self.update_ema()
        out = {key: value / count for key, value in sums.items()}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """ODE samples of the fixed evaluation prompts scored by the rewards; held-out DPO metrics offline."""
        metrics: dict[str, float] = {}
        if self.heldout_pairs is not None:
            backup = self._swap_in_ema()
            try:
                metrics.update(self._heldout_metrics())
            finally:
                self._restore(backup)
        prompts, images = self.evaluation_images()
        metrics.update(self.image_metrics(images, prompts, grid_path))
        return metrics

    def _heldout_metrics(self) -> dict[str, float]:
        """DPO loss / implicit accuracy on the held-out pairs, with the same (t, noise) every evaluation."""
        assert self.heldout_pairs is not None
        generator = torch.Generator().manual_seed(self.config.seed + 54321)
        sums: dict[str, float] = {}
        pairs = self.heldout_pairs
        for rows in torch.arange(len(pairs)).split(self.config.minibatch_size):
            _, metrics = self.loss(pairs.select(rows), generator)
            for key in ("train/loss", "train/implicit_accuracy", "train/reward_margin"):
                name = "eval/heldout_" + key.removeprefix("train/")
                sums[name] = sums.get(name, 0.0) + float(metrics[key]) * len(rows)
        return {key: value / len(pairs) for key, value in sums.items()}

    # ------------------------------------------------------------------------------------- loop hooks
    @property
    def progress_name(self) -> str:
        return f"dpo {self.config.mode}"

    @property
    def write_plots(self) -> bool:
        return self.config.plots

    def learn(self, collected: tuple[PreferencePairs, dict[str, float]]) -> dict[str, float]:
        pairs, metrics = collected
        if len(pairs) > 0:
            metrics.update(self.update(pairs))
        else:
            # Every group tied: no preference this iteration (the lr schedule still advances so that
            # iteration counts and schedules stay aligned on resume).
            for _ in range(self.config.updates_per_iteration):
                self.scheduler.step()
        return metrics

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        if "train/loss" not in metrics:  # no pairs this iteration: keep the last postfix
            return {}
        return {"loss": f"{metrics['train/loss']:.4f}", "acc": f"{metrics['train/implicit_accuracy']:.2f}"}

    def summary_fields(
        self, final: dict[str, float], wall: float, base: dict[str, Any] | None, model_dir: Path
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "mode": self.config.mode,
            "iterations": self.iteration,
            "wall_seconds": wall,
            "final": final,
            "model_dir": str(model_dir),
            "weights": "ema" if self.ema is not None else "raw",
        }
        if self.config.mode == "offline":
            summary["train_pairs"] = len(self.train_pairs) if self.train_pairs is not None else 0
            summary["heldout_pairs"] = len(self.heldout_pairs) if self.heldout_pairs is not None else 0
            summary["ties_dropped"] = self.ties_dropped
        summary.update(
            final_and_base(
                final, base, ["eval/reward_mean", "eval/accuracy", "eval/heldout_implicit_accuracy"]
            )
        )
        return summary


def train(config: DPOConfig) -> dict[str, Any]:
    """Entry point of ``rlflow dpo``."""
    return DPOTrainer(config).train()
