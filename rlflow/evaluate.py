"""``rlflow eval``: evaluate a saved robot policy in its MuJoCo task, with a video and a summary.

Runs ``episodes`` episodes deterministically (flow: ODE from sampled noise, no injected noise;
Gaussian: the mean) and as many stochastically (the exploration policy), writes ``summary.json``,
an mp4 of one deterministic episode, and, when the policy sits in a run directory, that run's
learning curves as PNGs.

Seeds: the episodes and the policy noise are seeded exactly as ``rlflow ppo`` seeds its evaluations
(:func:`rlflow.trainers.ppo.evaluation_seeds` of ``seed``), so with the run's ``seed``, its
``eval_episodes`` as ``episodes`` and its ``max_episode_steps``, ``rlflow eval`` reproduces the training's
final evaluation (``final_return_mean`` in the run's ``summary.json``) exactly. The defaults (seed 0, 10
episodes) are ``rlflow ppo``'s defaults; a line in the log says whether they match the run the policy
comes from and, if not, which options would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlflow.config import ConfigError, option, validate_config
from rlflow.utils.checkpoint import write_json
from rlflow.utils.output_dirs import claim_output_dir

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate a saved policy (``config.json`` + ``model.safetensors`` [+ ``normalization.json``])."""

    policy: str = option(help="Directory of the saved policy, e.g. runs/hopper_reinflow/policy.")
    task: str = option("hopper", help="MuJoCo task the policy was trained for.")
    episodes: int | None = option(
        None,
        help="Episodes per mode (deterministic and stochastic); null: the run's eval_episodes (else 10), so "
        "the numbers match the training's final evaluation.",
    )
    seed: int | None = option(
        None,
        help="Seed of the evaluation environments and the policy noise; null: the run's seed (else 0), the "
        "same evaluation seeds as the training's final evaluation.",
    )
    num_steps: int | None = option(None, help="Flow policies: denoising steps K (null: the saved value).")
    max_episode_steps: int | None = option(None, help="Override the task's time limit (env steps).")
    output_dir: str | None = option(None, help="Where to write results (null: <policy>/../eval).")
    video: bool = option(True, help="Record an mp4 of one deterministic episode (MUJOCO_GL=egl headless).")
    device: str = option("cpu", help="Torch device for the policy.")

    def __post_init__(self) -> None:
        validate_config(self)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow eval --policy DIR --task hopper``."""
    from rlflow.envs import env_dims, identity_normalization, make_vector_env, record_policy_video
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
    policy_dir = Path(config.policy)
    output_dir = Path(config.output_dir) if config.output_dir else policy_dir.parent / "eval"
    claim_output_dir(output_dir, "eval")  # before the episodes: a training run's summary.json is never replaced
    training = _training_run(policy_dir)
    seed = config.seed if config.seed is not None else int((training or {}).get("seed", 0))
    episodes = (
        config.episodes if config.episodes is not None else int((training or {}).get("eval_episodes", 10))
    )
    env_seed, noise_seed = _evaluation_seeds(seed)
    logger.info("%s", _seed_report(config, seed, episodes, env_seed, noise_seed, training, policy_dir))
    started = time.perf_counter()
    envs = make_vector_env(
        config.task,
        episodes,
        horizon=horizon,
        normalization=normalization,
        max_episode_steps=config.max_episode_steps,
    )
    summary: dict[str, Any] = {
        "policy": config.policy,
        "task": config.task,
        "episodes": episodes,
        "seed": seed,
        "env_seed": env_seed,
        "noise_seed": noise_seed,
    }
    for mode, deterministic in (("", True), ("stochastic_", False)):
        episodes = evaluate_episodes(
            policy,
            envs,
            seed=env_seed,
            deterministic=deterministic,
            generator=torch.Generator().manual_seed(noise_seed),
            device=config.device,
        )
        summary.update(episodes.metrics(prefix=mode))
        summary[f"{mode}returns"] = episodes.returns
        if episodes.successes is not None:
            summary[f"{mode}successes"] = episodes.successes
    envs.close()
    if training is not None and training.get("final_return_mean") is not None:
        summary["training_final_return_mean"] = training["final_return_mean"]


    if config.video:
        video_path = output_dir / "rollout.mp4"
        record_policy_video(
            policy, config.task, video_path, normalization=normalization, seed=seed, device=config.device
        )
        summary["video"] = str(video_path)
    summary["learning_curves"] = [str(p) for p in _learning_curves(policy_dir.parent, output_dir)]
    write_json(output_dir / "summary.json", summary)
    logger.info("%s", _done_line(config, summary, output_dir, time.perf_counter() - started))
    return summary


def _evaluation_seeds(seed: int) -> tuple[int, int]:
    from rlflow.trainers.ppo import evaluation_seeds

    return evaluation_seeds(seed)


def _training_run(policy_dir: Path) -> dict[str, Any] | None:
    """The ``rlflow ppo`` run the policy comes from (``<run>/policy``): its ``seed``, ``eval_episodes``,
    ``max_episode_steps``, ``task`` (config.yaml) and ``final_return_mean`` (summary.json); ``None``
    when the policy does not sit in such a run directory."""
    import json

    import yaml

    run_dir = policy_dir.parent
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or "eval_episodes" not in config or "seed" not in config:
        return None  # not a PPO run (e.g. pretraining, which has no return evaluation)
    run = {key: config.get(key) for key in ("seed", "eval_episodes", "max_episode_steps", "task")}
    run["run_dir"] = str(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        run["final_return_mean"] = summary.get("final_return_mean")
    return run


def _seed_report(
    config: EvalConfig,
    seed: int,
    episodes: int,
    env_seed: int,
    noise_seed: int,
    training: dict[str, Any] | None,
    policy_dir: Path,
) -> str:
    """One line: which seeds and episodes this evaluation uses, and whether they are the training's."""
    used = (
        f"evaluating {episodes} episodes per mode with seed {seed} (env resets {env_seed} + episode index, "
        f"policy noise {noise_seed}: rlflow ppo's evaluation seeds)"
    )
    if training is None:
        return f"{used}; {policy_dir} is not in an rlflow ppo run directory, so there is no training evaluation to match"
    from rlflow.envs import resolve_task

    wanted = {
        "seed": training.get("seed"),
        "episodes": training.get("eval_episodes"),
        "max_episode_steps": training.get("max_episode_steps"),
    }
    ours = {"seed": seed, "episodes": episodes, "max_episode_steps": config.max_episode_steps}
    same_task = training.get("task") is None or resolve_task(str(training["task"])) == resolve_task(
        config.task
    )
    differ = [key for key in wanted if wanted[key] != ours[key]]
    if same_task and not differ:
        final = training.get("final_return_mean")
        reported = "" if final is None else f" (deterministic return {final:.1f} in its summary.json)"
        return (
            f"{used}: the same seeds and episodes as the final evaluation of {training['run_dir']}{reported}"
        )
    fix = " ".join(f"--{key} {'null' if wanted[key] is None else wanted[key]}" for key in differ)
    why = "another task" if not same_task else f"pass {fix} to reproduce it"
    return f"{used}: NOT those of the final evaluation of {training['run_dir']} ({why}), so the returns can differ"


def _done_line(config: EvalConfig, summary: dict[str, Any], output_dir: Path, seconds: float) -> str:
    from rlflow.utils.run import done_line, result_phrase

    deterministic = result_phrase(
        "deterministic return", summary["return_mean"], stderr=summary["return_std"], fmt=".1f"
    )
    stochastic = result_phrase(
        "stochastic", summary["stochastic_return_mean"], stderr=summary["stochastic_return_std"], fmt=".1f"
    )
    from rlflow.utils.stats import success_phrase

    success = None
    if "success_rate" in summary:
        success = (
            success_phrase(summary["success_rate"], summary["success_ci95_low"], summary["success_ci95_high"])
            + f", stochastic {summary['stochastic_success_rate']:.0%}"
        )
    return done_line(
        f"evaluated {config.policy} on {config.task}, {summary['episodes']} episodes per mode",
        seconds,
        [success, f"{deterministic} (std), {stochastic}"],
        f"wrote {output_dir / 'summary.json'}" + (f" and {summary['video']}" if summary.get("video") else ""),
    )


def _learning_curves(run_dir: Path, output_dir: Path) -> list[Path]:
    """Plot the training run's curves next to the evaluation, when the policy came from a run."""
    from rlflow.utils.plotting import plot_metric_curves
    from rlflow.utils.run import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    return plot_metric_curves(rows, output_dir / "plots") if rows else []
