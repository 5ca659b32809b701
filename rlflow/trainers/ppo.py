"""PPO for flow policies (ReinFlow, arXiv 2505.22094) and Gaussian policies: ``rlflow ppo``.

ReinFlow makes a K-step flow policy's denoising chain a Markov chain with Gaussian transitions
``x_{k+1} ~ N(x_k + v(x_k, t_k, s) dt, sigma_phi(s, t_k)^2)`` and treats the whole chain as the PPO
"action": its log-likelihood is exact, so the clipped ratio objective applies unchanged. The same
trainer runs a diagonal-Gaussian policy (the baseline, and the behaviour-policy trainer for datasets).

Reading order: :class:`PPOConfig` -> :class:`PPOTrainer` (``__init__`` -> ``collect`` ->
``compute_advantages`` -> ``loss`` -> ``update`` -> ``evaluate`` -> checkpoints -> ``train``).

Implementation details that matter (all tested):
- one time grid for sampling and re-scoring; the first minibatch's ratio is checked to be 1 at runtime;
- terminations and truncations are kept apart: a truncated episode bootstraps from its true final
  observation; each rollout block starts from a seeded reset, and its last step is a truncation;
- log-probs are true densities; ``logprob_reduction: mean`` divides log-ratios and entropies by the
  number of stochastic elements (ReinFlow's normalisation, for which its clip range 0.01 was tuned).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError, option
from rlflow.policies import FlowPolicy, FlowPolicyConfig
from rlflow.policies.gaussian import GaussianPolicy, GaussianPolicyConfig, ValueNetwork
from rlflow.rollout import (
    GymRolloutBatch,
    ReturnScaler,
    SplitVectorEnv,
    collect_gym_rollout,
    compute_gae,
    evaluate_episodes,
)
from rlflow.trainers.loop import TrainingConfig, TrainingLoop
from rlflow.trainers.ppo_outputs import ppo_done_line, ppo_summary, rollout_metrics
from rlflow.utils.checkpoint import (
    CheckpointError,
    atomic_directory,
    check_finite_checkpoint,
    check_finite_loss,
    checkpoint_dir,
    load_state_dict,
    load_training_state,
    load_weights_into,
    prune_checkpoints,
    save_state_dict,
    save_training_state,
)
from rlflow.utils.model_card import model_card_info
from rlflow.utils.run import NullRunLogger, RunLogger
from rlflow.utils.seeding import capture_rng_state, prepare_run, restore_rng_state

logger = logging.getLogger(__name__)

#: Maximum |log ratio| tolerated at the first minibatch of an update (float32 re-scoring noise is ~1e-6).
FIRST_RATIO_TOLERANCE = 1e-4


def evaluation_seeds(seed: int) -> tuple[int, int]:
    """``(env reset seed, policy noise seed)`` of every evaluation of a run with ``seed``: each evaluation
    replays the same episodes (eval sub-env ``i`` resets with the first + ``i``) apart from the training
    rollouts' seeds. ``rlflow eval`` uses the same ones, so it reproduces the run's final evaluation."""
    return 10_000_019 + seed, seed + 7


@dataclass
class PPOConfig(TrainingConfig):
    """ReinFlow PPO. Defaults follow ReinFlow's Hopper settings, scaled to a 2-core CPU where noted."""

    output_dir: str = option("runs/ppo", help="Run directory (metrics, plots, checkpoints, final policy).")
    seed: int = option(0, help="Seed for python, numpy, torch, the environments and the trainer's generator.")
    device: str = option("cpu", help="Torch device for the networks (environments run on the CPU).")
    task: str = option(
        "hopper", help="MuJoCo task: hopper, walker2d, halfcheetah, ant, humanoid (or a gym id)."
    )
    policy_type: Literal["flow", "gaussian"] = option(
        "flow", help="flow: ReinFlow; gaussian: the PPO baseline."
    )
    pretrained: str | None = option(
        None,
        help="Directory of a saved policy (+ normalization.json) to fine-tune; null: train from scratch.",
    )
    flow: FlowPolicyConfig = option(
        default_factory=lambda: FlowPolicyConfig(horizon=4, hidden_dims=[512, 512, 512]),
        help="Flow policy architecture (used when pretrained is null; dims are taken from the task).",
    )
    gaussian: GaussianPolicyConfig = option(
        default_factory=GaussianPolicyConfig, help="Gaussian policy architecture (when pretrained is null)."
    )
    num_steps: int = option(4, help="Flow: denoising steps K used for sampling and re-scoring.")
    min_std: float = option(0.10, help="Flow: lower bound of the learned noise std.")
    max_std: float = option(0.24, help="Flow: upper bound of the learned noise std at the start.")
    final_max_std: float | None = option(
        None, help="Flow: anneal max_std linearly to this value over training (null: constant)."
    )
    num_envs: int = option(8, help="Parallel environments (ReinFlow: 40).")
    rollout_overlap: bool = option(
        False,
        help="Collect with the training envs in two halves, one half stepping (in a background thread) while the "
        "policy acts for the other (rlflow.rollout.SplitVectorEnv): simulation overlaps inference. Same reset "
        "seeds and true episode statistics as false, and reproducible from the seed, but the policy's noise is "
        "drawn per half, so not the false run bit for bit. It needs a second free core or a GPU policy to pay "
        "off; on one core it is slower (docs/benchmarks.md), hence off. Needs num_envs >= 2.",
    )
    rollout_steps: int = option(250, help="Decisions (action chunks) per env per iteration (ReinFlow: 500).")
    iterations: int = option(100, help="Collect-then-update iterations.")
    max_episode_steps: int | None = option(None, help="Override the task's time limit in env steps.")
    update_epochs: int = option(5, help="Passes over each rollout batch.")
    minibatch_size: int = option(2000, help="Decisions per minibatch.")
    gamma: float = option(0.99, help="Discount per decision (action chunk).")
    gae_lambda: float = option(0.95, help="GAE lambda.")
    clip_range: float = option(
        0.01, help="PPO ratio clip (ReinFlow 0.01 with the mean reduction; SB3 0.2 with sum)."
    )
    logprob_reduction: Literal["sum", "mean"] = option(
        "mean", help="sum: true chain density; mean: divide log-ratios/entropy by the stochastic elements."
    )
    ent_coef: float = option(0.03, help="Entropy bonus coefficient.")
    vf_coef: float = option(0.5, help="Value loss coefficient (loss = 0.5 * MSE).")
    w2_coef: float = option(
        0.0, help="Flow: weight of the W2 regulariser towards the frozen pretrained policy."
    )
    actor_lr: float = option(4.5e-5, help="Actor learning rate (ReinFlow Hopper).")
    critic_lr: float = option(6.5e-4, help="Critic learning rate (ReinFlow Hopper).")
    lr_scheduler_type: Literal["constant", "cosine"] = option(
        "constant", help="Learning-rate schedule over iterations."
    )
    max_grad_norm: float = option(1.0, help="Global gradient-norm clip.")
    critic_hidden_dims: list[int] = option(default_factory=lambda: [256, 256, 256], help="Critic MLP widths.")
    critic_warmup_iterations: int = option(
        2, help="Iterations that train only the critic before the actor moves."
    )
    normalize_advantages: bool = option(True, help="Standardise advantages per minibatch.")
    reward_scaling: bool = option(True, help="Divide rewards by a running std of the discounted return.")
    target_kl: float | None = option(
        None, help="Stop an update early when approx KL exceeds this (null: never)."
    )
    eval_steps: int = option(10, help="Evaluate every N iterations (and at the start and end).")
    eval_episodes: int = option(10, help="Episodes per evaluation (deterministic and stochastic each).")
    video: bool = option(False, help="Record an mp4 of a deterministic episode at the end.")
    learned_reward: str | None = option(
        None,
        help="Saved segment reward model (an `rlflow reward-model` run's model/ dir): training envs get its "
        "per-step reward instead of the task's; evaluation and episode returns stay true (null: task reward).",
    )
    learned_reward_head: str | None = option(
        None, help="Head of a multi-head learned reward model to train on (null: the only head)."
    )
    learned_reward_offset: float = option(
        0.0,
        help="Subtracted from every learned step reward: the model's absorbing-state reward makes falling "
        "worth 0, as in the true MDP (rlflow.envs.learned_reward.absorbing_offset_from_preferences).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.min_std <= self.max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got {self.min_std}, {self.max_std}")
        if self.rollout_overlap and self.num_envs < 2:
            raise ConfigError(
                f"rollout_overlap splits the training envs into two halves, so it needs num_envs >= 2 (got "
                f"{self.num_envs}); raise num_envs or set rollout_overlap: false"
            )


class PPOTrainer(TrainingLoop):
    """Collect with the rollout engine, then clipped-ratio updates of actor and critic."""

    def __init__(self, config: PPOConfig):
        from rlflow.envs import env_dims, identity_normalization, make_vector_env

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = torch.device(config.device)
        self.generator = prepare_run(config.seed, config.num_threads)

        obs_dim, act_dim = env_dims(config.task)  # an unknown task raises ConfigError (no traceback)
        self.actor, self.normalization = self._build_actor(obs_dim, act_dim)
        if self.normalization is None:
            self.normalization = identity_normalization(config.task)

        def vector_env(num_envs: int) -> Any:
            return make_vector_env(
                config.task,
                num_envs,
                horizon=self.actor.config.horizon,
                normalization=self.normalization,
                max_episode_steps=config.max_episode_steps,
            )

        make_train_envs = vector_env if config.learned_reward is None else self._learned_reward_envs()
        self.envs = (
            SplitVectorEnv.build(make_train_envs, config.num_envs, groups=2)
            if config.rollout_overlap
            else make_train_envs(config.num_envs)
        )
        self.eval_envs = vector_env(config.eval_episodes)
        # The W2 regulariser pulls deterministic actions towards the frozen pretrained policy's.
        self.reference = copy.deepcopy(self.actor).requires_grad_(False) if config.w2_coef > 0 else None
        self.critic = ValueNetwork(obs_dim, config.critic_hidden_dims).to(self.device)
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.actor.parameters()), "lr": config.actor_lr},
                {"params": list(self.critic.parameters()), "lr": config.critic_lr},
            ],
            eps=1e-5,
        )
        self.base_lrs = [config.actor_lr, config.critic_lr]
        self.return_scaler = ReturnScaler(config.num_envs, config.gamma) if config.reward_scaling else None
        self.iteration = 0
        self.env_steps = 0
        self.wall_seconds_before = 0.0  # set by resume(): time spent by earlier processes of this run
        self.run_started = time.perf_counter()
        self.divisor = float(self.actor.stochastic_elements()) if config.logprob_reduction == "mean" else 1.0
        self.last_metrics: dict[str, float] = {}  # the last iteration's, named if a checkpoint is refused

    def _learned_reward_envs(self) -> Callable[[int], Any]:
        """``num_envs -> `` training envs whose reward is the learned model's (raw obs/act per env step; see
        envs.learned_reward); the model is loaded once, here."""
        from rlflow.envs.learned_reward import make_learned_reward_vector_env
        from rlflow.reward_models.learned import load_reward_model

        config = self.config
        model = load_reward_model(config.learned_reward)

        def make(num_envs: int) -> Any:
            try:
                return make_learned_reward_vector_env(
                    config.task,
                    num_envs,
                    model,
                    head=config.learned_reward_head,
                    offset=config.learned_reward_offset,
                    horizon=self.actor.config.horizon,
                    normalization=self.normalization,
                    max_episode_steps=config.max_episode_steps,
                )
            except (TypeError, ValueError) as exc:  # wrong kind, shapes or head: a config problem
                raise ConfigError(f"learned_reward {config.learned_reward}: {exc}") from exc

        return make

    def _build_actor(self, obs_dim: int, act_dim: int) -> tuple[nn.Module, Any]:
        """Load or build the policy and check it fits the task (before any work is done)."""
        from rlflow.envs import Normalization

        config = self.config
        normalization = None
        if config.pretrained is not None:
            directory = Path(config.pretrained)
            if config.policy_type == "flow":
                actor = FlowPolicy.from_pretrained(
                    directory,
                    kernel="reinflow",
                    num_steps=config.num_steps,
                    min_std=config.min_std,
                    max_std=config.max_std,
                )
            else:
                actor = GaussianPolicy.from_pretrained(directory)
            if (directory / "normalization.json").is_file():
                normalization = Normalization.load(directory / "normalization.json")
        elif config.policy_type == "flow":
            flow = copy.deepcopy(config.flow)
            flow.obs_dim, flow.act_dim, flow.kernel = obs_dim, act_dim, "reinflow"
            flow.num_steps, flow.min_std, flow.max_std = config.num_steps, config.min_std, config.max_std
            actor = FlowPolicy(flow)
        else:
            gaussian = copy.deepcopy(config.gaussian)
            gaussian.obs_dim, gaussian.act_dim = obs_dim, act_dim
            actor = GaussianPolicy(gaussian)
        if actor.config.obs_dim != obs_dim or actor.config.act_dim != act_dim:
            raise ConfigError(
                f"the policy{f' in {config.pretrained}' if config.pretrained else ''} (obs_dim={actor.config.obs_dim}, "
                f"act_dim={actor.config.act_dim}) does not fit task "
                f"{config.task!r} (obs_dim={obs_dim}, act_dim={act_dim}); pretrain a policy for this task or "
                "pick the task it was trained on"
            )
        return actor.to(self.device), normalization

    # --------------------------------------------------------------------------------------- collect
    def collect(self) -> GymRolloutBatch:
        """One rollout block from a reset seeded by (seed, iteration)."""
        self.actor.eval()
        # envs.reset(seed=s) seeds sub-env i with s + i, so consecutive blocks need seeds num_envs apart:
        # with s = base + iteration, block t+1 replayed the initial states of sub-envs 1.. of block t.
        block_seed = (self.config.seed * 100_003 + self.iteration) * self.config.num_envs
        batch = collect_gym_rollout(
            self.actor,
            self.envs,
            self.config.rollout_steps,
            seed=block_seed,
            generator=self.generator,
            device=self.device,
        )
        self.env_steps += batch.env_steps
        return batch

    # ------------------------------------------------------------------------------------ advantages
    @torch.no_grad()
    def compute_advantages(self, batch: GymRolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(advantages, returns, values), each ``[T, N]``; rewards scaled if configured."""
        rewards = batch.rewards
        if self.return_scaler is not None:
            rewards = self.return_scaler(rewards, batch.episode_ends)
        values = self.critic(batch.observations.to(self.device)).cpu()
        next_values = self.critic(batch.next_observations.to(self.device)).cpu()
        next_values = torch.where(batch.terminated, 0.0, next_values)
        advantages, returns = compute_gae(
            rewards,
            values,
            next_values,
            batch.episode_ends,
            gamma=self.config.gamma,
            gae_lambda=self.config.gae_lambda,
        )
        return advantages, returns, values

    # ------------------------------------------------------------------------------------------ loss
    def loss(
        self,
        obs: Tensor,
        records: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        returns: Tensor,
        train_actor: bool,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped-ratio policy loss + value loss - entropy bonus (+ W2 regulariser) on one minibatch."""
        config = self.config
        log_probs, entropy = self.actor.evaluate_actions(obs, records)
        log_ratio = (log_probs - old_log_probs) / self.divisor
        ratio = log_ratio.exp()
        if config.normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = torch.max(
            -advantages * ratio, -advantages * ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
        ).mean()
        entropy_mean = (entropy / self.divisor).mean()
        value_loss = 0.5 * (self.critic(obs) - returns).square().mean()
        loss = config.vf_coef * value_loss
        stats = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy_mean}
        if train_actor:
            loss = loss + policy_loss - config.ent_coef * entropy_mean
            if self.reference is not None:
                noise = torch.Generator(device=obs.device).manual_seed(self.iteration)
                ours = self.actor.deterministic_action(obs, generator=noise, requires_grad=True)
                noise = torch.Generator(device=obs.device).manual_seed(self.iteration)
                theirs = self.reference.deterministic_action(obs, generator=noise)
                w2 = (ours - theirs).square().mean()
                loss = loss + config.w2_coef * w2
                stats["w2"] = w2
        with torch.no_grad():
            stats["approx_kl"] = ((ratio - 1) - log_ratio).mean()  # the low-variance k3 estimator
            stats["clipfrac"] = ((ratio - 1).abs() > config.clip_range).float().mean()
            stats["max_abs_log_ratio"] = log_ratio.abs().max()
        return loss, stats

    # ---------------------------------------------------------------------------------------- update
    def update(self, batch: GymRolloutBatch, advantages: Tensor, returns: Tensor) -> dict[str, float]:
        config = self.config
        self.actor.train()
        train_actor = self.iteration >= config.critic_warmup_iterations
        obs, records = batch.flat("observations").to(self.device), batch.flat("records").to(self.device)
        old_log_probs = batch.flat("log_probs").to(self.device)
        flat_adv, flat_ret = advantages.reshape(-1).to(self.device), returns.reshape(-1).to(self.device)
        size = obs.shape[0]
        sums: dict[str, float] = {}
        count = 0
        stop = False
        for epoch in range(config.update_epochs):
            order = torch.randperm(size, generator=self.generator).to(self.device)
            for start in range(0, size, config.minibatch_size):
                index = order[start : start + config.minibatch_size]
                loss, stats = self.loss(
                    obs[index],
                    records[index],
                    old_log_probs[index],
                    flat_adv[index],
                    flat_ret[index],
                    train_actor,
                )
                if epoch == 0 and start == 0:
                    first = stats["max_abs_log_ratio"].item() * self.divisor
                    if first > FIRST_RATIO_TOLERANCE:
                        raise RuntimeError(
                            f"first-update log-ratio is {first:.3g}, not 0: sampling and re-scoring disagree (a "
                            "different time grid, kernel or network state between collection and update)"
                        )
                    sums["first_log_ratio_max"] = first
                # Before any weight is touched; the message tells diverged weights from bad returns.
                check_finite_loss(
                    loss,
                    where=f"iteration {self.iteration + 1} (epoch {epoch + 1}, minibatch "
                    f"{start // config.minibatch_size + 1})",
                    weights={"actor": self.actor, "critic": self.critic},
                    config=config,
                    name="PPO loss",
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(
                    list(self.actor.parameters()) + list(self.critic.parameters()), config.max_grad_norm
                )
                self.optimizer.step()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                count += 1
                if (
                    config.target_kl is not None
                    and train_actor
                    and float(stats["approx_kl"]) > config.target_kl
                ):
                    stop = True
                    break
            if stop:
                break
        metrics = {f"train/{k}": v / count for k, v in sums.items() if k != "first_log_ratio_max"}
        metrics["train/first_log_ratio_max"] = sums["first_log_ratio_max"]
        metrics["train/epochs_completed"] = float(epoch + (0 if stop else 1))
        metrics["train/actor_updated"] = float(train_actor)
        return metrics

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Deterministic (ODE / Gaussian mean) and stochastic episodes, one per eval env (no image grid)."""
        self.actor.eval()
        metrics = {}
        env_seed, noise_seed = evaluation_seeds(self.config.seed)
        for mode, deterministic in (("", True), ("stochastic_", False)):
            episodes = evaluate_episodes(
                self.actor,
                self.eval_envs,
                seed=env_seed,
                deterministic=deterministic,
                generator=torch.Generator().manual_seed(noise_seed),
                device=self.device,
            )
            metrics.update(episodes.metrics(prefix=f"eval/{mode}"))
        return metrics

    def _schedule(self) -> None:
        """Per-iteration learning rates and (flow) noise bounds."""
        config = self.config
        progress = min(1.0, self.iteration / max(config.iterations - 1, 1))
        factor = 0.5 * (1 + math.cos(math.pi * progress)) if config.lr_scheduler_type == "cosine" else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        if isinstance(self.actor, FlowPolicy) and config.final_max_std is not None:
            max_std = config.max_std + (config.final_max_std - config.max_std) * progress
            self.actor.noise_std.set_bounds(config.min_std, max(max_std, config.min_std))
            # Keep the saved config truthful: a reloaded policy explores with the bound it was trained with.
            self.actor.config.max_std = self.actor.noise_std.max_std

    # ----------------------------------------------------------------------------------- checkpoints
    def wall_seconds(self) -> float:
        """Seconds the run has taken so far, evaluations included, summed over resumed processes."""
        return self.wall_seconds_before + time.perf_counter() - self.run_started

    def save_checkpoint(self) -> Path:
        path = checkpoint_dir(self.output_dir, self.iteration)
        # NaN/inf weights must not become the latest checkpoint: the next resume would load them and
        # fail again (their NaN actions looking like a broken environment).
        check_finite_checkpoint(
            path,
            where=f"iteration {self.iteration}",
            weights={"actor": self.actor, "critic": self.critic},
            optimizers={"optimizer": self.optimizer},
            state={} if self.return_scaler is None else {"return_scaler": self.return_scaler.state_dict()},
            losses={k: v for k, v in self.last_metrics.items() if k.endswith("_loss")},
            config=self.config,
        )
        with atomic_directory(path) as tmp:
            self.actor.save_pretrained(
                tmp / "policy", extra_json={"normalization": self.normalization.to_dict()}
            )
            save_state_dict(self.critic.state_dict(), tmp / "critic.safetensors")
            state = {
                "iteration": self.iteration,
                "env_steps": self.env_steps,
                "wall_seconds": self.wall_seconds(),
                "optimizer": self.optimizer.state_dict(),
                "rng": capture_rng_state(self.generator),
            }
            if self.return_scaler is not None:
                state["return_scaler"] = self.return_scaler.state_dict()
            save_training_state(tmp / "training_state.pt", state)
        prune_checkpoints(self.output_dir, self.config.save_total_limit)
        return path

    def resume(self, path: Path) -> None:
        saved = type(self.actor).from_pretrained(path / "policy")
        if _architecture(saved.config) != _architecture(self.actor.config):
            raise CheckpointError(
                f"checkpoint {path} holds a policy with a different config; use a new output_dir"
            )
        self.actor.load_state_dict(saved.state_dict())
        if isinstance(self.actor, FlowPolicy):
            # The annealed noise bounds are config, not weights: a run resumed from its last checkpoint
            # runs no _schedule() before the final evaluation and save, which need the bounds it ended with.
            self.actor.noise_std.set_bounds(saved.noise_std.min_std, saved.noise_std.max_std)
            self.actor.config.max_std = self.actor.noise_std.max_std
        load_weights_into(
            self.critic, load_state_dict(path / "critic.safetensors"), source=str(path / "critic.safetensors")
        )
        state = load_training_state(path / "training_state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.return_scaler is not None:
            self.return_scaler.load_state_dict(state["return_scaler"])
        restore_rng_state(state["rng"], self.generator)
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])
        # Wall time of the interrupted process(es) up to this checkpoint (older checkpoints: unknown, 0).
        self.wall_seconds_before = float(state.get("wall_seconds", 0.0))
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    # ------------------------------------------------------------------------------- loop hooks
    @property
    def progress_name(self) -> str:
        return f"ppo {self.config.task}"

    def started(self) -> None:
        self.run_started = time.perf_counter()

    def before_iteration(self) -> None:
        self._schedule()

    def learn(self, collected: GymRolloutBatch) -> dict[str, float]:
        advantages, returns, values = self.compute_advantages(collected)
        metrics = self.update(collected, advantages, returns)
        metrics.update(rollout_metrics(collected, values, returns))
        return metrics

    def counters(self) -> dict[str, float]:
        return {"rollout/env_steps": self.env_steps}

    def base_summary(self, base: dict[str, float]) -> dict[str, Any]:
        return {"base_return_mean": base["eval/return_mean"]}

    def iteration_metrics(self, metrics: dict[str, float], collected: GymRolloutBatch) -> dict[str, float]:
        seconds = max(metrics["time/collect_seconds"], 1e-9)
        extra = {"time/env_steps_per_second": collected.env_steps / seconds}
        if isinstance(self.actor, FlowPolicy):
            extra["train/noise_max_std"] = self.actor.noise_std.max_std
        extra["time/wall_seconds"] = self.wall_seconds()  # after this iteration's evaluation
        return extra

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"ret": f"{metrics.get('rollout/episode_return_mean', float('nan')):.0f}"}

    def finish(self, run: RunLogger | NullRunLogger, final: dict[str, float], wall: float) -> dict[str, Any]:
        """Save the policy (with its normalisation and model card) and, if asked, a video of it."""
        policy_dir = self.output_dir / "policy"
        summary = ppo_summary(self.output_dir, final, self.env_steps, self.wall_seconds(), policy_dir)
        self.actor.save_pretrained(
            policy_dir,
            extra_json={"normalization": self.normalization.to_dict()},
            card=model_card_info(self.config, summary),
        )
        if self.config.video:
            video = self.record_video()
            summary["video"] = str(video)
            run.log_video(self.iteration, "eval/video", video)
        return summary

    def done_line(self, summary: dict[str, Any]) -> str:
        return ppo_done_line(self.config, summary)

    def record_video(self) -> Path:
        """``videos/final.mp4``: one deterministic episode of the current policy, camera on the robot (not
        rendered again when the finished video already shows these weights: a re-run finished run)."""
        from rlflow.envs import record_policy_video

        path = self.output_dir / "videos" / "final.mp4"
        record_policy_video(
            self.actor,
            self.config.task,
            path,
            normalization=self.normalization,
            seed=self.config.seed,
            device=self.device,
        )
        return path


def _architecture(config: Any) -> dict[str, Any]:
    """A policy config without the noise bounds, which the trainer anneals (and saves) as it goes."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("min_std", "max_std")}


def train(config: PPOConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow ppo --config recipe.yaml``."""
    return PPOTrainer(config).train()
