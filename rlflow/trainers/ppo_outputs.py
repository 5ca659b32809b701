"""What a PPO run reports (:mod:`rlflow.trainers.ppo`): each iteration's rollout metrics, ``summary.json``'s
results and the run's last log line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from rlflow.rollout import GymRolloutBatch

if TYPE_CHECKING:
    from rlflow.trainers.ppo import PPOConfig

__all__ = ["ppo_done_line", "ppo_summary", "rollout_metrics"]


def rollout_metrics(batch: GymRolloutBatch, values: Tensor, returns: Tensor) -> dict[str, float]:
    """An iteration's rollout metrics: reward per decision, finished episodes' returns, lengths and successes,
    and how much of the returns' variance the critic explains."""
    variance = returns.var()
    metrics = {
        "rollout/reward_per_decision": batch.rewards.mean().item(),
        "rollout/episodes": float(len(batch.episode_returns)),
        "train/explained_variance": float(1 - (returns - values).var() / variance)
        if variance > 0
        else float("nan"),
    }
    if batch.episode_returns:
        metrics["rollout/episode_return_mean"] = float(np.mean(batch.episode_returns))
        metrics["rollout/episode_length_mean"] = float(np.mean(batch.episode_lengths))
    if batch.episode_successes:
        metrics["rollout/success_rate"] = float(np.mean(batch.episode_successes))
    return metrics


def ppo_summary(
    output_dir: Path, final: dict[str, float], env_steps: int, wall: float, policy_dir: Path
) -> dict[str, Any]:
    """``summary.json``'s results: base (step 0 of ``metrics.jsonl``) and final returns and, on tasks with a
    success flag, success rates with the final one's 95% interval."""
    from rlflow.utils.run import read_metrics

    rows = read_metrics(output_dir / "metrics.jsonl")
    base = next(
        (row["eval/return_mean"] for row in rows if row["step"] == 0 and "eval/return_mean" in row), None
    )
    summary = {
        "base_return_mean": base,
        "final_return_mean": final["eval/return_mean"],
        "final_return_std": final["eval/return_std"],
        "final_stochastic_return_mean": final["eval/stochastic_return_mean"],
        "env_steps": env_steps,
        "wall_seconds": wall,
        "policy_dir": str(policy_dir),
    }
    if "eval/success_rate" in final:  # tasks with a success flag (manipulation)
        summary["base_success_rate"] = next(
            (row["eval/success_rate"] for row in rows if row["step"] == 0 and "eval/success_rate" in row),
            None,
        )
        summary["final_success_rate"] = final["eval/success_rate"]
        summary["final_success_ci95"] = [final["eval/success_ci95_low"], final["eval/success_ci95_high"]]
        summary["final_stochastic_success_rate"] = final["eval/stochastic_success_rate"]
    return summary


def _success_phrase(summary: dict[str, Any], episodes: int) -> str | None:
    """``success 32% -> 100% (95% CI 93-100%, 50 episodes)`` for tasks with a success flag, else ``None``."""
    from rlflow.utils.stats import success_phrase

    if summary.get("final_success_rate") is None:
        return None
    low, high = summary["final_success_ci95"]
    return success_phrase(
        summary["final_success_rate"], low, high, base=summary.get("base_success_rate"), episodes=episodes
    )


def ppo_done_line(config: PPOConfig, summary: dict[str, Any]) -> str:
    """The run's last log line: what was trained, how long it took, the result and where it went."""
    from rlflow.utils.run import done_line, plural, result_phrase

    base = summary.get("base_return_mean")
    # Sparse success tasks return 0 or 1 per episode: whole numbers would print "0 -> 1 +- 0".
    fmt = ".2f" if summary.get("final_success_rate") is not None else ".0f"
    returns = result_phrase(
        "deterministic return" + (" (base -> final)" if base is not None else ""),
        summary["final_return_mean"],
        base=base,
        stderr=summary["final_return_std"],
        fmt=fmt,
    )
    return done_line(
        f"{plural(config.iterations, 'iteration')} ({summary['env_steps']:,} env steps)",
        summary["wall_seconds"],
        [
            _success_phrase(summary, config.eval_episodes),
            None if returns is None else f"{returns} (std over {config.eval_episodes} episodes)",
            result_phrase("stochastic return", summary["final_stochastic_return_mean"], fmt=fmt),
        ],
        f"policy saved to {summary['policy_dir']}"
        + (f", video {summary['video']}" if summary.get("video") else ""),
    )
