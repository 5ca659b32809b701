"""Flow-RWR: online reward-weighted regression for text-to-image flow models (``rlflow rwr``).

Reward-weighted regression (VideoAlign, Eq. 9) fine-tunes a flow model by flow matching on its own
samples, each weighted by a function of its reward. Every iteration:

1. **Sample** ``samples_per_prompt`` images for each of ``prompts_per_iteration`` prompts with the
   *current* policy (deterministic ODE, ``num_steps`` Euler steps): the "samples from the previous
   policy" of the paper, i.e. the policy as it is before this iteration's updates.
2. **Score** them with the reward spec (``rewards``: the same ``{name: weight}`` mapping as ``rlflow grpo``).
3. **Weight** them: ``w = B * softmax(r / temperature)`` over the batch of ``B`` samples (or over each
   prompt's group with ``weight_normalization: group``). The normalisation makes the mean weight exactly 1,
   so the loss scale (and the learning rate's meaning) does not depend on the reward's offset or scale of
   ``exp``; ``temperature -> inf`` gives plain self-distillation (all weights 1), ``temperature -> 0`` puts
   all the weight (``B``) on the best sample. ``weight_clip: c`` caps each weight at ``c`` (after the
   normalisation, without renormalising: clipping bounds one sample's pull on the model at ``c`` times the
   average one and lowers the mean weight slightly).
4. **Regress**: ``num_epochs`` passes over the batch in minibatches of ``minibatch_size``, one optimizer
   step each, on ``loss = mean_b(w_b * ||(x1_b - x0_b) - v_theta(x_t, t)||^2)`` with the sample's latent as
   ``x1``, *fresh* noise ``x0`` and ``t ~ time_distribution`` (the per-sample error is a mean over latent
   elements: :func:`rlflow.trainers.flow_objectives.flow_matching_errors`).

LoRA or full fine-tuning as in GRPO (``model.lora_r``; the model loading is GRPO's
:class:`~rlflow.trainers.text_to_image.ModelConfig`). Outputs as GRPO: ``metrics.jsonl``, ``summary.json``,
TensorBoard, ``plots/``, evaluation grids in ``images/``, checkpoints (resumable), and the final model in
``model/``.

Reading order: :func:`rwr_weights` -> :class:`RWRConfig` -> :class:`RWRTrainer` (``prepare`` -> ``loss``).
Sampling, the minibatch loop, evaluation and checkpoints are
:class:`~rlflow.trainers.online_weighted.OnlineWeightedTrainer`'s, which the actor-critic
(:mod:`rlflow.trainers.actor_critic`) and DiffusionNFT (:mod:`rlflow.trainers.nft`) share with another
``loss`` (NFT also with its own ``optimizer_steps``: gradients accumulated over minibatches, and
``training_times``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.trainers.online_weighted import (
    OnlineBatch,
    OnlineConfig,
    OnlineWeightedTrainer,
    normalized_exp_weights,
    weight_metrics,
    weighted_flow_matching_loss,
)
from rlflow.trainers.policy_snapshot import PolicySnapshot

__all__ = ["RWRConfig", "RWRTrainer", "rwr_weights", "train"]


# ------------------------------------------------------------------------------------------------ math
def rwr_weights(
    rewards: Tensor,
    temperature: float,
    *,
    clip: float | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Flow-RWR sample weights ``w = B * softmax(r / temperature)`` (mean 1), optionally capped at ``clip``.

    Args:
        rewards: ``[B]`` rewards (any scale; only differences matter after the normalisation).
        temperature: ``> 0``; small values concentrate the weight on the best samples.
        clip: cap each weight at this value (``>= 1``; no renormalisation afterwards); ``None``: no cap.
        group_size: normalise within consecutive groups of this size (one prompt's samples) instead of over
            the batch.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if clip is not None and not clip >= 1.0:
        raise ValueError(f"weight clip must be >= 1 (the mean weight is 1), got {clip}; use null for no clip")
    weights = normalized_exp_weights(rewards.float() / temperature, group_size=group_size)
    return weights if clip is None else weights.clamp(max=clip)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RWRConfig(OnlineConfig):
    """Flow-RWR (VideoAlign Eq. 9) on online samples of the current policy."""

    temperature: float = option(
        0.1, help="Weight temperature: w = B * softmax(r / temperature) (in reward units; mean weight 1)."
    )
    weight_normalization: Literal["batch", "group"] = option(
        "batch", help="Normalise the weights over the whole batch (paper) or within each prompt's group."
    )
    weight_clip: float | None = option(
        None, help="Cap each normalised weight at this value (>= 1; null: no cap)."
    )
    rollout_refresh_iterations: int = option(
        1,
        bounds="[1, inf)",
        help="Sample from a frozen copy of the policy refreshed every this many iterations (1: the current "
        "weights, on-policy). Regressing on samples of the very weights being trained is a feedback loop that "
        "collapsed the shapes base within ~20 optimizer steps, while samples of a frozen copy trained stably "
        "(docs/alignment.md, 'Why regressing on your own samples collapses'); ReST's grow/improve phases.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ trainer
class RWRTrainer(OnlineWeightedTrainer):
    """Flow-RWR: weights ``B * softmax(r / temperature)`` fixed per iteration, weighted flow matching."""

    name = "rwr"
    config: RWRConfig

    def __init__(self, config: RWRConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.rollout_snapshot: PolicySnapshot | None = None
        if config.rollout_refresh_iterations > 1:
            self.rollout_snapshot = self.policy_snapshot("rollout_refresh_iterations > 1")

    def collect(self) -> OnlineBatch:
        if self.rollout_snapshot is None:
            return super().collect()
        with self.rollout_snapshot.swapped_in():
            return super().collect()

    def learn(self, batch: OnlineBatch) -> dict[str, float]:
        metrics = super().learn(batch)
        if self.rollout_snapshot is not None:
            refresh = self.config.rollout_refresh_iterations
            metrics["rollout/policy_age"] = float(self.iteration % refresh)  # iterations since the refresh
            if (self.iteration + 1) % refresh == 0:
                self.rollout_snapshot.update()
        return metrics

    def extra_state(self) -> dict[str, Any]:
        if self.rollout_snapshot is None:
            return {}
        return {"rollout_policy": self.rollout_snapshot.state(self.trainable_name_list())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.rollout_snapshot is None:
            return
        if not self.rollout_snapshot.load_state(
            state.get("rollout_policy") or {}, self.trainable_name_list()
        ):
            raise ConfigError(
                "the checkpoint has no matching rollout policy (saved with rollout_refresh_iterations: 1?); "
                "resume with the run's own settings or use a new output_dir"
            )

    def prepare(self, batch: OnlineBatch) -> dict[str, float]:
        config = self.config
        self.weights = rwr_weights(
            batch.rewards,
            config.temperature,
            clip=config.weight_clip,
            group_size=batch.group_size if config.weight_normalization == "group" else None,
        )
        return weight_metrics(self.weights)

    def loss(
        self, batch: OnlineBatch, rows: Tensor, t: Tensor, noise: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        errors = self.errors(batch, rows, t, noise)
        loss = weighted_flow_matching_loss(errors, self.weights[rows])
        return loss, {"train/loss": loss.detach(), "train/fm_error": errors.detach().mean()}


def train(config: RWRConfig) -> dict[str, Any]:
    """Entry point of ``rlflow rwr``."""
    return RWRTrainer(config).train()
