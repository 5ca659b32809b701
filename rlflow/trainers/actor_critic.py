"""Actor-critic reward-weighted flow matching, AC-Flow style, and ORW-CFM-W2 (``rlflow actor-critic``).

ORW-CFM-W2 (public code) fine-tunes a flow model on its own online samples with
``L = E[w(x1) ||v_theta(x_t, t) - (x1 - x0)||^2 + alpha ||v_theta(x_t, t) - v_ref(x_t, t)||^2]``,
``w = exp(tau * r)``. AC-Flow (arXiv 2510.18072) adds reward normalisation, a critic on intermediate
states, advantage clipping, a critic warm-up and critic-based weighting, keeping the W2 regulariser. Its
exact formulas are not public; this module is one consistent design. Every choice (and why):

**Samples.** Each iteration draws ``samples_per_prompt`` ODE samples per prompt from the *current* policy
(as :mod:`rlflow.trainers.rwr`); ``x1`` below is a sample's latent, ``c`` its prompt. All path points are
``x_t = (1 - t) x0 + t x1`` with *fresh* noise ``x0 ~ N(0, I)`` and ``t ~ time_distribution``: the
independent coupling of the flow-matching loss, so actor and critic see the same state distribution.

1. **Reward normalisation** (``reward_normalization``, default ``running``): ``r_norm = (r - m) / (s + eps)``
   with an exponential moving mean ``m`` and variance ``s^2`` over iterations
   (:class:`RewardNormalizer`; the first batch initialises them; each batch's statistics are merged
   before normalising it, as the variance of the two-component mixture, momentum ``reward_norm_momentum``).
   Why running and not per-group z-scores: the critic then learns prompt difficulty (its value at
   ``t ~ 0`` is the prompt's expected normalised reward), and the scale of ``r_norm`` is stable across
   iterations, so the temperature and the advantage clip mean the same thing all run long.
   ``batch`` / ``group`` z-score per iteration (or prompt group); ``none`` uses the raw rewards.
2. **Critic** ``V(x_t, t, c)`` (:class:`ValueCritic`): a small CNN on ``x_t`` (3 convolutions, pooled to
   4x4 so it keeps coarse layout, flattened), a sinusoidal time embedding and the (frozen) pooled prompt
   embedding of the policy's own text encoder (:func:`prompt_features`), merged by an MLP into a scalar.
   It predicts ``r_norm`` of the sample ``x1`` the state ``x_t`` was built from, trained by MSE
   (:func:`critic_loss`) for ``critic_epochs`` passes over every iteration's batch. With the independent
   coupling ``V(x_t, t, c) ~ E[r_norm | x_t, c]``: near ``t = 0`` the prompt's mean (a GRPO-like group
   baseline), near ``t = 1`` the sample's own reward. The critic is fitted *after* the actor's updates of
   an iteration, so the advantages of a batch come from a critic that has not seen that batch (no
   regression to the batch's own rewards); its pre-update fit on the new batch is the logged explained
   variance (an honest held-out measure).
3. **Warm-up**: during the first ``critic_warmup_iterations`` only the critic trains;
   the actor is frozen (``warmup_actor: none``) or trained with plain reward weights
   ``B * softmax(r_norm / temperature)`` (``warmup_actor: reward``). An untrained critic's advantages are
   noise, so they must not drive the actor.
4. **Advantage** ``A = clip(r_norm - V(x_t, t, c), -advantage_clip, advantage_clip)`` (:func:`advantages`),
   ``V`` without gradients, evaluated at the same ``(x_t, t)`` as the actor's flow-matching term.
5. **Critic weighting** ``w = B * softmax(A / temperature)`` over the minibatch (:func:`critic_weights`:
   mean weight 1, so the loss scale does not drift with the advantages; optional cap ``weight_clip``). The
   weighted loss is ``mean_b(w_b * ||(x1 - x0) - v_theta(x_t, t, c)||^2 / D)`` (per-element mean).
6. **W2 regulariser** ``alpha * mean_b(||v_theta(x_t, t, c) - v_ref(x_t, t, c)||^2 / D)``
   (:func:`w2_penalty`, per-element mean, unweighted, at the same ``x_t``), ``alpha = w2_alpha``. The
   reference is the base model: LoRA disabled, or a frozen copy with full fine-tuning. Why "W2": the
   squared W2 distance between the two generated distributions is bounded by the time-integral of this
   velocity gap along the flow (ORW-CFM-W2). It is zero at initialisation with LoRA (B = 0).

**ORW-CFM-W2** is ``use_critic: false``: no critic, no warm-up, ``w = exp(orw_tau * r)`` on the *raw*
rewards (their parameterisation, ``orw_tau = 0.5``, ``w2_alpha = 1``; not normalised unless
``orw_normalize_weights``), plus the same W2 term (:func:`orw_weights`).

Logged (``metrics.jsonl``): ``critic/loss``, ``critic/explained_variance`` (pre-update, on the new batch),
``critic/value_mean``; ``train/advantage_{mean,std,abs_mean,clip_fraction}``,
``train/weight_{mean,max,min,std,ess_fraction}``, ``train/w2``, ``train/fm_error`` (unweighted),
``train/weighted_fm``, ``train/loss``; ``rewards_norm/{mean,std,running_mean,running_std}``;
``train/actor_active`` (0 during a frozen warm-up); plus RWR's rollout/eval metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlflow.config import ConfigError, option
from rlflow.flows.gaussian import standard_normal
from rlflow.flows.paths import linear_path
from rlflow.flows.time import sample_training_times
from rlflow.trainers.online_weighted import (
    OnlineBatch,
    OnlineConfig,
    OnlineWeightedTrainer,
    normalized_exp_weights,
    weight_metrics,
)
from rlflow.utils.checkpoint import save_state_dict

__all__ = [
    "ActorCriticConfig",
    "ActorCriticTrainer",
    "RewardNormalizer",
    "ValueCritic",
    "actor_loss",
    "advantages",
    "critic_loss",
    "critic_weights",
    "explained_variance",
    "orw_weights",
    "prompt_features",
    "train",
    "velocity_errors",
    "w2_penalty",
]


# ------------------------------------------------------------------------------------------------ math
class RewardNormalizer:
    """Reward shaping to a normalised signal (choice 1 of the module docs).

    ``mode``: ``running`` (exponential moving mean/variance over batches), ``batch`` / ``group`` (z-score of
    this batch / of each consecutive group), ``none`` (identity).
    """

    def __init__(
        self, mode: Literal["running", "batch", "group", "none"], momentum: float = 0.9, eps: float = 1e-6
    ):
        if mode not in ("running", "batch", "group", "none"):
            raise ValueError(f"reward normalisation must be running, batch, group or none, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.mode, self.momentum, self.eps = mode, float(momentum), float(eps)
        self.mean: float | None = None
        self.var: float | None = None

    def __call__(self, rewards: Tensor, group_size: int | None = None) -> Tensor:
        r = rewards.double()
        if self.mode == "none":
            return rewards.float()
        if self.mode == "group":
            if group_size is None or group_size < 1 or r.numel() % group_size:
                raise ValueError(
                    f"group normalisation needs a group_size dividing {r.numel()}, got {group_size}"
                )
            grouped = r.reshape(-1, group_size)
            z = (grouped - grouped.mean(1, keepdim=True)) / (
                grouped.std(1, unbiased=False, keepdim=True) + self.eps
            )
            return z.reshape(-1).float()
        mean, var = float(r.mean()), float(r.var(unbiased=False))
        if self.mode == "running":
            if self.mean is None or self.var is None:
                self.mean, self.var = mean, var
            else:
                m = self.momentum
                # Variance of the mixture "old stats with weight m, this batch with weight 1 - m".
                merged_var = m * self.var + (1 - m) * var + m * (1 - m) * (mean - self.mean) ** 2
                self.mean, self.var = m * self.mean + (1 - m) * mean, merged_var
            mean, var = self.mean, self.var
        return ((r - mean) / (math.sqrt(var) + self.eps)).float()

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = state["mean"], state["var"]


def prompt_features(cond: Any) -> Tensor:
    """The critic's prompt input: the pooled embedding, else the mean of the hidden states (detached)."""
    pooled = getattr(cond, "pooled", None)
    features = pooled if pooled is not None else cond.hidden_states.mean(dim=1)
    return features.detach().float()


class ValueCritic(nn.Module):
    """``V(x_t, t, c) -> [B]``: CNN features of ``x_t`` + time embedding + prompt features -> MLP.

    Args:
        channels: latent channels (image latents ``[C, H, W]``).
        prompt_dim: size of :func:`prompt_features`.
        width: channels of the first convolution (the others use ``2 * width``).
        time_dim: sinusoidal time-embedding size (even).
    """

    def __init__(self, channels: int, prompt_dim: int, width: int = 32, time_dim: int = 32):
        super().__init__()
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        self.time_dim = time_dim
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),  # keeps coarse layout (object positions) for layout rewards
            nn.Flatten(),
        )
        hidden = 4 * width
        self.image_proj = nn.Linear(2 * width * 16, hidden)
        self.time_proj = nn.Linear(time_dim, hidden)
        self.prompt_proj = nn.Linear(prompt_dim, hidden)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def time_embedding(self, t: Tensor) -> Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(
            torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(1000.0) / half)
        )
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]  # t in [0, 1] spans the frequency range
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x_t: Tensor, t: Tensor, prompt: Tensor) -> Tensor:
        if x_t.ndim != 4:
            raise ValueError(f"ValueCritic takes image latents [B, C, H, W], got shape {tuple(x_t.shape)}")
        h = self.image_proj(self.features(x_t.float()))
        h = h + self.time_proj(self.time_embedding(t)) + self.prompt_proj(prompt.float())
        return self.head(h).squeeze(1)


def critic_loss(values: Tensor, targets: Tensor) -> Tensor:
    """MSE ``mean((V - r_norm)^2)``."""
    return F.mse_loss(values.float(), targets.float().to(values.device))


def explained_variance(predictions: Tensor, targets: Tensor) -> float:
    """``1 - Var(targets - predictions) / Var(targets)`` (1: perfect, 0: as good as the mean; NaN if Var = 0)."""
    targets = targets.detach().double()
    residual = targets - predictions.detach().double().to(targets.device)
    var = targets.var(unbiased=False)
    return float("nan") if float(var) == 0.0 else float(1.0 - residual.var(unbiased=False) / var)


def advantages(normalized_rewards: Tensor, values: Tensor, clip: float) -> Tensor:
    """``A = clip(r_norm - V, -clip, clip)`` (``V`` detached)."""
    if not clip > 0:
        raise ValueError(f"advantage clip must be > 0, got {clip}")
    return (normalized_rewards.to(values.device) - values.detach()).clamp(-clip, clip)


def critic_weights(advantage: Tensor, temperature: float, clip: float | None = None) -> Tensor:
    """``w = B * softmax(A / temperature)`` (mean 1), optionally capped at ``clip``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = normalized_exp_weights(advantage.float() / temperature)
    return weights if clip is None else weights.clamp(max=clip)


def orw_weights(rewards: Tensor, tau: float, *, normalize: bool = False) -> Tensor:
    """ORW-CFM-W2's ``w = exp(tau * r)`` on raw rewards (``normalize``: divided by its batch mean)."""
    logits = tau * rewards.float()
    # exp(l) / mean(exp(l)) computed as B * softmax(l): no overflow for large tau * r.
    return normalized_exp_weights(logits) if normalize else torch.exp(logits)


def w2_penalty(velocity: Tensor, reference_velocity: Tensor) -> Tensor:
    """Per-sample ``||v_theta - v_ref||^2 / D`` (mean over latent elements): ``[B]``."""
    diff = (velocity.float() - reference_velocity.float().detach()).square()
    return diff.reshape(diff.shape[0], -1).mean(dim=1)


def actor_loss(errors: Tensor, weights: Tensor, w2: Tensor | None, alpha: float) -> Tensor:
    """``mean_b(w_b e_b) + alpha * mean_b(w2_b)``."""
    loss = (weights.to(errors) * errors).mean()
    if w2 is not None and alpha > 0:
        loss = loss + alpha * w2.mean()
    return loss


def velocity_errors(
    model: Any, x1: Tensor, cond: Any, t: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`rlflow.trainers.flow_objectives.flow_matching_errors` (per-element mean) but also returns
    the predicted velocity and ``x_t``, which the W2 term and the critic need: ``(errors [B], v, x_t)``."""
    path = linear_path(noise, x1, t)
    velocity = model.velocity(path.x_t, t, cond)
    squared = (path.velocity - velocity).float().square().reshape(x1.shape[0], -1)
    return squared.mean(dim=1), velocity, path.x_t


# ------------------------------------------------------------------------------------------------ config
@dataclass
class ActorCriticConfig(OnlineConfig):
    """AC-Flow-style actor-critic (``use_critic: true``) or ORW-CFM-W2 (``use_critic: false``)."""

    output_dir: str = option(
        "runs/actor_critic", help="Run directory (metrics, plots, image grids, checkpoints, model, critic)."
    )
    use_critic: bool = option(
        True, help="Critic-based advantage weights (false: ORW-CFM-W2, w = exp(orw_tau * r))."
    )
    reward_normalization: Literal["running", "batch", "group", "none"] = option(
        "running",
        help="Reward shaping before the critic: running EMA z-score, per batch, per prompt group, none.",
    )
    reward_norm_momentum: float = option(0.9, help="Momentum of the running reward mean/variance.")
    critic_width: int = option(32, help="Critic CNN width.")
    critic_learning_rate: float = option(1e-3, help="Critic Adam learning rate.")
    critic_epochs: int = option(
        2, help="Critic passes over each iteration's batch (after the actor's updates)."
    )
    critic_minibatch_size: int = option(64, help="Samples per critic step.")
    critic_warmup_iterations: int = option(
        5, help="Iterations that train only the critic before its advantages drive the actor."
    )
    warmup_actor: Literal["none", "reward"] = option(
        "none",
        help="Actor during the warm-up: frozen (none) or trained with weights softmax(r_norm / temperature).",
    )
    advantage_clip: float = option(2.0, help="Clip advantages to [-c, c] (in normalised-reward units).")
    temperature: float = option(1.0, help="Critic weights w = B * softmax(A / temperature).")
    weight_clip: float | None = option(
        None, help="Cap each normalised weight at this value (>= 1; null: no cap)."
    )
    orw_tau: float = option(
        0.5, help="use_critic false: ORW-CFM-W2's w = exp(orw_tau * r) (their tau = 0.5)."
    )
    orw_normalize_weights: bool = option(
        False, help="use_critic false: divide exp(orw_tau * r) by its batch mean."
    )
    w2_alpha: float = option(1.0, help="W2 regulariser weight alpha (ORW-CFM-W2: 1; 0: off, collapses).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.critic_width < 1 or self.critic_epochs < 1 or self.critic_minibatch_size < 1:
            raise ConfigError("critic_width, critic_epochs and critic_minibatch_size must be >= 1")
        if self.critic_warmup_iterations < 0:
            raise ConfigError(f"critic_warmup_iterations must be >= 0, got {self.critic_warmup_iterations}")
        if (
            self.use_critic
            and self.warmup_actor == "none"
            and self.critic_warmup_iterations >= self.iterations
        ):
            raise ConfigError(
                f"critic_warmup_iterations ({self.critic_warmup_iterations}) >= iterations ({self.iterations}): "
                "the actor would never train; lower critic_warmup_iterations or set warmup_actor: reward"
            )
        if not self.advantage_clip > 0 or not self.temperature > 0:
            raise ConfigError(
                f"advantage_clip and temperature must be > 0, got {self.advantage_clip} and {self.temperature}"
            )
        if self.weight_clip is not None and self.weight_clip < 1.0:
            raise ConfigError(
                f"weight_clip must be >= 1 (the mean weight is 1) or null, got {self.weight_clip}"
            )
        if self.w2_alpha < 0:
            raise ConfigError(f"w2_alpha must be >= 0, got {self.w2_alpha}")
        if not 0.0 <= self.reward_norm_momentum < 1.0:
            raise ConfigError(f"reward_norm_momentum must be in [0, 1), got {self.reward_norm_momentum}")


# ------------------------------------------------------------------------------------------------ trainer
class ActorCriticTrainer(OnlineWeightedTrainer):
    """Online weighted flow matching with a critic (see the module docs for every step)."""

    name = "actor_critic"
    config: ActorCriticConfig

    def __init__(self, config: ActorCriticConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.normalizer = RewardNormalizer(config.reward_normalization, config.reward_norm_momentum)
        self.critic: ValueCritic | None = None
        if config.use_critic:
            shape = tuple(self.model.latent_shape)
            if len(shape) != 3:
                raise ConfigError(
                    f"the critic handles image latents [C, H, W]; this model's latents are {shape}: "
                    "use use_critic: false (ORW-CFM-W2) for video models"
                )
            probe = prompt_features(self.model.encode_prompts(self.prompts.eval_prompts()[:1]))
            critic = ValueCritic(shape[0], probe.shape[1], width=config.critic_width).to(self.device)
            optimizer = torch.optim.Adam(critic.parameters(), lr=config.critic_learning_rate)
            self.critic, self.critic_optimizer = self.runtime.prepare_extra(critic, optimizer)

    def needs_reference(self) -> bool:
        return self.config.w2_alpha > 0

    def in_warmup(self) -> bool:
        return self.config.use_critic and self.iteration < self.config.critic_warmup_iterations

    def actor_active(self) -> bool:
        return not (self.in_warmup() and self.config.warmup_actor == "none")

    # ------------------------------------------------------------------------------------- per iteration
    def prepare(self, batch: OnlineBatch) -> dict[str, float]:
        normalized = self.normalizer(batch.rewards, batch.group_size)
        self.normalized_rewards = normalized.to(self.device)
        metrics = {
            "rewards_norm/mean": float(normalized.mean()),
            "rewards_norm/std": float(normalized.std(unbiased=False)),
            "train/actor_active": float(self.actor_active()),
        }
        if self.normalizer.mean is not None and self.normalizer.var is not None:
            metrics["rewards_norm/running_mean"] = self.normalizer.mean
            metrics["rewards_norm/running_std"] = math.sqrt(self.normalizer.var)
        return metrics

    def update(self, batch: OnlineBatch) -> dict[str, float]:
        metrics = super().update(batch)  # actor first: its advantages use the critic before this batch
        if self.critic is not None:
            metrics.update(self.train_critic(batch))
        return metrics

    def _features(self, batch: OnlineBatch, rows: Tensor) -> tuple[Any, Tensor]:
        cond = self.model.encode_prompts([batch.prompts[i] for i in rows.tolist()])
        return cond, prompt_features(cond).to(self.device)

    def loss(
        self, batch: OnlineBatch, rows: Tensor, t: Tensor, noise: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        cond, features = self._features(batch, rows)
        device_rows = rows.to(self.device)
        errors, velocity, x_t = velocity_errors(self.model, batch.latents[device_rows], cond, t, noise)
        metrics: dict[str, Any] = {}
        if not config.use_critic:
            weights = orw_weights(
                batch.rewards[rows].to(self.device), config.orw_tau, normalize=config.orw_normalize_weights
            )
        elif self.in_warmup():  # warmup_actor == "reward": plain reward weights
            weights = critic_weights(
                self.normalized_rewards[device_rows], config.temperature, config.weight_clip
            )
        else:
            assert self.critic is not None
            with torch.no_grad():
                self.critic.eval()
                values = self.critic(x_t.detach(), t, features)
            raw = self.normalized_rewards[device_rows] - values
            advantage = advantages(self.normalized_rewards[device_rows], values, config.advantage_clip)
            weights = critic_weights(advantage, config.temperature, config.weight_clip)
            metrics.update(
                {
                    "train/advantage_mean": advantage.mean(),
                    "train/advantage_std": advantage.std(unbiased=False),
                    "train/advantage_abs_mean": advantage.abs().mean(),
                    "train/advantage_clip_fraction": (raw.abs() > config.advantage_clip).float().mean(),
                    "train/value_mean": values.mean(),
                }
            )
        w2 = None
        if config.w2_alpha > 0:
            with torch.no_grad(), self.model.reference():
                reference = self.model.velocity(x_t.detach(), t, cond)
            w2 = w2_penalty(velocity, reference)
            metrics["train/w2"] = w2.detach().mean()
        loss = actor_loss(errors, weights, w2, config.w2_alpha)
        metrics.update(
            {
                "train/loss": loss.detach(),
                "train/fm_error": errors.detach().mean(),
                "train/weighted_fm": (weights * errors.detach()).mean(),
            }
        )
        metrics.update(weight_metrics(weights))
        return loss, metrics

    # ------------------------------------------------------------------------------------- critic
    def train_critic(self, batch: OnlineBatch) -> dict[str, float]:
        """``critic_epochs`` MSE passes over the batch; the explained variance is measured before each step."""
        assert self.critic is not None
        config = self.config
        self.critic.train()
        losses, predictions, targets = [], [], []
        for epoch in range(config.critic_epochs):
            order = torch.randperm(len(batch), generator=self.generator)
            for rows in order.split(config.critic_minibatch_size):
                t = sample_training_times(len(rows), config.time_distribution, generator=self.generator).to(
                    self.device
                )
                noise = standard_normal(
                    (len(rows), *batch.latents.shape[1:]), generator=self.generator, device=self.device
                )
                device_rows = rows.to(self.device)
                x_t = linear_path(noise, batch.latents[device_rows], t).x_t
                _, features = self._features(batch, rows)
                values = self.critic(x_t, t, features)
                target = self.normalized_rewards[device_rows]
                loss = critic_loss(values, target)
                self.critic_optimizer.zero_grad(set_to_none=True)
                self.runtime.backward_extra(loss)
                self.runtime.step_extra(self.critic_optimizer, self.critic)
                losses.append(float(loss.detach()))
                if epoch == 0:  # first pass: the critic has not fitted these samples yet
                    predictions.append(values.detach())
                    targets.append(target)
        first = torch.cat(predictions)
        return {
            "critic/loss": sum(losses) / len(losses),
            "critic/explained_variance": explained_variance(first, torch.cat(targets)),
            "critic/value_mean": float(first.mean()),
        }

    # ------------------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"normalizer": self.normalizer.state_dict()}
        if self.critic is not None:
            state["critic"] = self.accelerator.unwrap_model(self.critic).state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "normalizer" in state:
            self.normalizer.load_state_dict(state["normalizer"])
        if self.critic is not None:
            if "critic" not in state:
                raise ConfigError(
                    "the checkpoint has no critic (written with use_critic: false); use a new output_dir"
                )
            self.accelerator.unwrap_model(self.critic).load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def _summary(self, final: dict[str, float], wall: float) -> dict[str, Any]:
        summary = super()._summary(final, wall)
        summary["use_critic"] = self.config.use_critic
        if self.critic is not None and self.is_main:
            path = Path(self.output_dir) / "critic" / "critic.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state_dict(self.accelerator.unwrap_model(self.critic).state_dict(), path)
            summary["critic_path"] = str(path)
        return summary


def train(config: ActorCriticConfig) -> dict[str, Any]:
    """Entry point of ``rlflow actor-critic``."""
    return ActorCriticTrainer(config).train()
