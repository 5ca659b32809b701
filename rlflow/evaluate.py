"""``rlflow eval``: evaluate a saved robot policy in its MuJoCo task, with a video and a summary.

Runs ``episodes`` episodes deterministically (flow: ODE from sampled noise, no injected noise;
Gaussian: the mean) and as many stochastically (the exploration policy), writes ``summary.json``,
an mp4 of one deterministic episode, and, when the policy sits in a run directory, that run's
learning curves as PNGs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlflow.config import ConfigError, option
from rlflow.utils.checkpoint import write_json

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate a saved policy (``config.json`` + ``model.safetensors`` [+ ``normalization.json``])."""

    policy: str = option(help="Directory of the saved policy, e.g. runs/hopper_reinflow/policy.")
    task: str = option("hopper", help="MuJoCo task the policy was trained for.")
    episodes: int = option(10, help="Episodes per mode (deterministic and stochastic).")
    seed: int = option(0, help="Seed of the evaluation environments and the policy noise.")
    num_steps: int | None = option(None, help="Flow policies: denoising steps K (null: the saved value).")
    max_episode_steps: int | None = option(None, help="Override the task's time limit (env steps).")
    output_dir: str | None = option(None, help="Where to write results (null: <policy>/../eval).")
    video: bool = option(True, help="Record an mp4 of one deterministic episode (MUJOCO_GL=egl headless).")
    device: str = option("cpu", help="Torch device for the policy.")

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow eval --policy DIR --task hopper``."""
    from rlflow.envs import env_dims, identity_normalization, make_vector_env, record_video
    from rlflow.policies.loading import load_policy
    from rlflow.rollout import evaluate_episodes

    overrides = {} if config.num_steps is None else {"num_steps": config.num_steps}
    policy, normalization = load_policy(config.policy, device=config.device, **overrides)
    obs_dim, act_dim = env_dims(config.task)
    if (policy.config.obs_dim, policy.config.act_dim) != (obs_dim, act_dim):
        raise ConfigError(
            f"policy {config.policy} (obs_dim={policy.config.obs_dim}, act_dim={policy.config.act_dim}) does not "
            f"fit task {config.task!r} (obs_dim={obs_dim}, act_dim={act_dim}); pass the task it was trained on"
        )
    normalization = normalization or identity_normalization(config.task)
    horizon = policy.config.horizon
    envs = make_vector_env(
        config.task,
        config.episodes,
        horizon=horizon,
        normalization=normalization,
        max_episode_steps=config.max_episode_steps,
    )
    summary: dict[str, Any] = {"policy": config.policy, "task": config.task, "episodes": config.episodes}
    for mode, deterministic in (("", True), ("stochastic_", False)):
        returns, lengths = evaluate_episodes(
            policy,
            envs,
            seed=config.seed,
            deterministic=deterministic,
            generator=torch.Generator().manual_seed(config.seed),
            device=config.device,
        )
        summary[f"{mode}return_mean"] = float(np.mean(returns))
        summary[f"{mode}return_std"] = float(np.std(returns))
        summary[f"{mode}length_mean"] = float(np.mean(lengths))
        summary[f"{mode}returns"] = returns
    envs.close()

    policy_dir = Path(config.policy)
    output_dir = Path(config.output_dir) if config.output_dir else policy_dir.parent / "eval"
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.video:
        generator = torch.Generator().manual_seed(config.seed)

        def act(obs: np.ndarray) -> np.ndarray:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=config.device).unsqueeze(0)
            with torch.no_grad():
                return policy.deterministic_action(obs_t, generator=generator)[0].cpu().numpy()

        video_path = output_dir / "rollout.mp4"
        record_video(
            config.task, act, video_path, horizon=horizon, normalization=normalization, seed=config.seed
        )
        summary["video"] = str(video_path)
    summary["learning_curves"] = [str(p) for p in _learning_curves(policy_dir.parent, output_dir)]
    write_json(output_dir / "summary.json", summary)
    logger.info(
        "%s on %s: deterministic return %.1f +- %.1f, stochastic %.1f +- %.1f over %d episodes; wrote %s",
        config.policy,
        config.task,
        summary["return_mean"],
        summary["return_std"],
        summary["stochastic_return_mean"],
        summary["stochastic_return_std"],
        config.episodes,
        output_dir / "summary.json",
    )
    return summary


def _learning_curves(run_dir: Path, output_dir: Path) -> list[Path]:
    """Plot the training run's curves next to the evaluation, when the policy came from a run."""
    from rlflow.utils.plotting import plot_metric_curves
    from rlflow.utils.run import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    return plot_metric_curves(rows, output_dir / "plots") if rows else []
