"""Preferences between trajectory segments of a MuJoCo task: ``rlflow segment-preferences``.

The robotics half of preference-based reward learning (Christiano et al. 2017):

1. **Roll out** one or more sources in a gymnasium vector env: saved policies (e.g. the shipped Gaussian
   behaviour policy, sampled stochastically) and ``"random"`` (uniform actions in the env's bounds), so
   that segment returns range from poor to good. Policies are rolled out by
   :func:`rlflow.data.collect.collect_demonstrations` (raw transitions, chunked policies executed
   open loop).
2. **Cut** fixed-length segments of ``L`` env steps (:func:`cut_segments`). Each step is stored as
   ``concat(obs, action)`` in the env's **raw** spaces (not normalised: raw observations as MuJoCo returns
   them, raw actions clipped to the env's bounds), so a reward model trained on them plugs into any policy
   whatever its normalisation (:class:`rlflow.envs.learned_reward.LearnedRewardWrapper` scores raw
   steps). Segments never mix two episodes. At an episode end:

   * **termination** (the MDP ended, e.g. Hopper fell): the segment may run past it; the missing steps are
     the MDP's absorbing state: the true final observation repeated, a zero action and reward 0 (the true
     return counts nothing after a termination). Without this, every segment of a task whose reward is
     constant while alive (InvertedPendulum: +1 per step) would have the same return, and falling early
     could never be compared with balancing;
   * **truncation** (time limit, end of collection): segments that would cross it are dropped, since what
     would have followed is unknown.
3. **Pair** random segments and **label** them with a simulated noisy rater, Bradley-Terry with ties
   (Rao-Kupper; the model :func:`rlflow.reward_models.losses.bt_ties_loss` fits):
   ``P(A) = sigmoid(s * (R_A - R_B) - log theta)``, ``P(B) = sigmoid(s * (R_B - R_A) - log theta)``,
   ``P(tie) = 1 - P(A) - P(B)`` (ties are likely when the returns are close). ``R`` is the segment's true
   return divided by the standard deviation of all cut segments' returns, so ``rater_scale`` means the same
   on every task (``standardize_returns``).
4. **Save** a :class:`rlflow.data.preferences.PreferenceSet` of kind ``"segment"`` (one dimension,
   ``"return"``; ``meta`` holds ``obs_dim``, ``act_dim``, the task and the pairs' true returns) and a
   ``summary.json`` with label statistics and the *noiseless-order ceiling*: the accuracy that ranking by
   the true return itself gets on the sampled decided labels (no reward model can expect more), next to
   its expectation under the rater (``expected_ceiling``, :func:`~rlflow.worlds.shapes.oracle.agreement_ceiling`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlflow.config import ConfigError, dump_yaml, option, validate_config
from rlflow.utils.checkpoint import atomic_file, to_builtin
from rlflow.utils.output_dirs import overwrite_option

__all__ = [
    "RANDOM_SOURCE",
    "Segments",
    "SegmentPreferencesConfig",
    "build_segment_preferences",
    "collect_random",
    "collect_segments",
    "cut_segments",
    "label_pairs",
    "noiseless_ceiling",
    "rater_probabilities",
]

logger = logging.getLogger(__name__)

#: The source name for uniformly random actions.
RANDOM_SOURCE = "random"


# ---------------------------------------------------------------------------------------------------------
# Rater
# ---------------------------------------------------------------------------------------------------------


def rater_probabilities(
    score_a: torch.Tensor, score_b: torch.Tensor, scale: float, theta: float
) -> torch.Tensor:
    """Bradley-Terry-with-ties label probabilities ``[..., 3]`` (A, B, tie) of a rater comparing scores.

    ``P(A) = sigmoid(scale * (a - b) - log theta)``, ``P(B) = sigmoid(scale * (b - a) - log theta)``,
    ``P(tie) = 1 - P(A) - P(B)``, which is >= 0 for ``theta >= 1`` (``theta = 1``: no ties). The formula is the
    shapes-world oracle's (:func:`rlflow.worlds.shapes.oracle.bt_ties_label_probabilities`), so both
    worlds' simulated raters are the same model; this adds the argument checks and float64.
    """
    from rlflow.worlds.shapes.oracle import bt_ties_label_probabilities

    if not scale >= 0 or not math.isfinite(scale):
        raise ValueError(f"rater scale must be a finite number >= 0, got {scale}")
    if not theta >= 1 or not math.isfinite(theta):
        raise ValueError(f"rater theta must be >= 1 (1 means no ties), got {theta}")
    return bt_ties_label_probabilities(score_a.double(), score_b.double(), scale, theta)


def label_pairs(
    return_a: torch.Tensor, return_b: torch.Tensor, *, scale: float, theta: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample rater labels (0 = A, 1 = B, 2 = tie), ``[N]`` int64, and return them with the probabilities."""
    probs = rater_probabilities(return_a, return_b, scale, theta)
    labels = torch.multinomial(probs.reshape(-1, 3).float(), 1, generator=generator).reshape(probs.shape[:-1])
    return labels, probs


def noiseless_ceiling(
    return_a: torch.Tensor, return_b: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """How well ranking by the true return itself matches the sampled labels.

    ``accuracy``: fraction of decided (non-tie) pairs whose label agrees with the true-return order (pairs
    with equal returns count 1/2): the expected ceiling of any reward model's decided-pair accuracy.
    """
    decided = labels != 2
    if not bool(decided.any()):
        return {"accuracy": float("nan"), "decided_pairs": 0}
    diff = (return_a - return_b)[decided]
    says_a = labels[decided] == 0
    agree = torch.where(diff == 0, 0.5, ((diff > 0) == says_a).double())
    return {"accuracy": float(agree.mean()), "decided_pairs": int(decided.sum())}


# ---------------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Segments:
    """``S`` fixed-length segments of raw steps and their true returns."""

    steps: np.ndarray  # [S, L, obs_dim + act_dim] float32: concat(raw obs, raw action); padding as documented
    returns: np.ndarray  # [S] float64: sum of the true rewards of the real (unpadded) steps
    real_steps: np.ndarray  # [S] int64: steps before the absorbing padding (L when none)
    source: np.ndarray  # [S] int64: index of the source the segment came from

    def __len__(self) -> int:
        return int(self.returns.shape[0])


def cut_segments(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_observations: np.ndarray,
    terminals: np.ndarray,
    episode_ids: np.ndarray,
    *,
    length: int,
    stride: int = 1,
    absorbing: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every segment of ``length`` steps starting every ``stride`` steps of each episode (vectorised).

    Rows are transitions in the layout of :class:`rlflow.data.demonstrations.Demonstrations` (episodes
    contiguous, in time order). Start ``t`` of an episode of ``n`` rows is kept when ``t + length <= n``; if
    the episode *terminated* and ``absorbing`` is true, every start ``t < n`` is kept and steps past the end
    are absorbing (final observation, zero action, reward 0). Segments crossing a truncation are dropped.

    Returns:
        ``(steps [S, L, obs_dim + act_dim] float32, returns [S] float64, real_steps [S] int64)``.
    """
    if length < 1 or stride < 1:
        raise ValueError(f"segment length and stride must be >= 1, got length={length}, stride={stride}")
    ids = np.asarray(episode_ids)
    num = ids.shape[0]
    obs_dim, act_dim = observations.shape[1], actions.shape[1]
    if num == 0:
        return np.zeros((0, length, obs_dim + act_dim), np.float32), np.zeros(0), np.zeros(0, np.int64)
    boundaries = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [num]])  # exclusive
    episode_of_row = np.repeat(np.arange(starts.size), ends - starts)
    offset = np.arange(num) - starts[episode_of_row]  # position of each row inside its episode
    last = ends[episode_of_row] - 1  # last row of the row's episode
    terminated = np.asarray(terminals, dtype=bool)[last]
    remaining = last - np.arange(num) + 1  # real steps from this row to the episode end
    keep = (offset % stride == 0) & ((remaining >= length) | (terminated & absorbing))
    first = np.flatnonzero(keep)  # [S] start rows
    index = first[:, None] + np.arange(length)[None, :]  # [S, L]
    real = index <= last[first][:, None]
    safe = np.minimum(index, last[first][:, None])
    obs = np.where(real[..., None], observations[safe], next_observations[last[first]][:, None, :])
    act = np.where(real[..., None], actions[safe], 0.0)
    rew = np.where(real, np.asarray(rewards, dtype=np.float64)[safe], 0.0)
    steps = np.concatenate([obs, act], axis=-1).astype(np.float32)
    return steps, rew.sum(axis=1), real.sum(axis=1).astype(np.int64)


def collect_random(
    task: str,
    *,
    episodes: int,
    num_envs: int = 8,
    seed: int = 0,
    max_episode_steps: int | None = None,
) -> Any:
    """Exactly ``episodes`` complete episodes of uniformly random actions, as raw ``Demonstrations``."""
    from rlflow.data.demonstrations import Demonstrations
    from rlflow.envs.tasks import make_vector_env, resolve_task
    from rlflow.rollout.gym import check_env_step

    gym_id = resolve_task(task)
    num_envs = max(1, min(int(num_envs), int(episodes)))
    envs = make_vector_env(gym_id, num_envs, horizon=1, seed=seed, max_episode_steps=max_episode_steps)
    env_index = np.arange(num_envs)
    quota = episodes // num_envs + (env_index < episodes % num_envs)
    finished = np.zeros(num_envs, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("key", "obs", "act", "rew", "next", "term", "trunc")
    }
    try:
        obs, _ = envs.reset(seed=seed)
        while (finished < quota).any():
            active = finished < quota
            action = envs.action_space.sample()  # [num_envs, 1, act_dim], seeded by make_vector_env
            next_obs, reward, term, trunc, infos = envs.step(action)
            term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
            ended = term | trunc
            true_next = np.array(next_obs, dtype=np.float64, copy=True)
            if ended.any():
                mask = np.asarray(infos["_final_obs"], dtype=bool)
                true_next[mask] = np.stack(infos["final_obs"][mask])
            check_env_step(
                len(parts["key"]),
                observations=true_next,
                rewards=np.asarray(reward, dtype=np.float64),
                where="collection",
            )
            # Episode key (sub-env, local episode) -> sorted later into contiguous episodes.
            parts["key"].append(env_index[active] * (int(quota.max()) + 1) + finished[active])
            parts["obs"].append(np.asarray(obs, dtype=np.float64)[active])
            parts["act"].append(np.asarray(action)[active, 0])
            parts["rew"].append(np.asarray(reward, dtype=np.float64)[active])
            parts["next"].append(true_next[active])
            parts["term"].append(term[active])
            parts["trunc"].append(trunc[active])
            finished += ended & active
            obs = next_obs
    finally:
        envs.close()
    key = np.concatenate(parts["key"])
    order = np.argsort(key, kind="stable")
    _, episode_ids = np.unique(key[order], return_inverse=True)
    term = np.concatenate(parts["term"])[order]
    return Demonstrations(
        observations=np.concatenate(parts["obs"])[order].astype(np.float32),
        actions=np.concatenate(parts["act"])[order].astype(np.float32),
        rewards=np.concatenate(parts["rew"])[order].astype(np.float32),
        next_observations=np.concatenate(parts["next"])[order].astype(np.float32),
        terminals=term,
        timeouts=np.concatenate(parts["trunc"])[order] & ~term,
        episode_ids=episode_ids.astype(np.int64),
        metadata={"source": RANDOM_SOURCE, "gym_id": gym_id, "seed": int(seed)},
    )


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SegmentPreferencesConfig:
    """``rlflow segment-preferences``: noisy preferences between trajectory segments of a MuJoCo task."""

    output_dir: str = option(
        "runs/segment_preferences",
        help="Where the PreferenceSet and summary.json go: empty, new, or an earlier set (only this command's "
        "files are replaced).",
    )
    task: str = option("hopper", help="MuJoCo task: hopper, walker2d, ..., inverted_pendulum (or a gym id).")
    sources: list[str] = option(
        default_factory=lambda: ["recipes/robotics/artifacts/hopper_medium_gaussian", RANDOM_SOURCE],
        help='Saved policy directories to roll out, and/or "random" (uniform actions).',
    )
    episodes: list[int] = option(
        default_factory=lambda: [16, 16], help="Complete episodes per source (one number per source)."
    )
    deterministic: bool = option(
        False, help="Policies act with their deterministic action instead of sampling."
    )
    num_envs: int = option(8, help="Parallel environments per source.")
    max_episode_steps: int | None = option(None, help="Time limit in env steps (null: the task's, 1000).")
    segment_length: int = option(50, help="Env steps per segment.")
    stride: int = option(
        10, help="Segments start every `stride` steps of an episode (they overlap when < length)."
    )
    absorbing: bool = option(
        True,
        help="Let segments run past a termination into the absorbing state (reward 0); false drops them.",
    )
    num_pairs: int = option(2000, help="Labelled pairs to draw (segments are paired uniformly at random).")
    rater_scale: float = option(2.0, help="Rater sharpness s in P(A) = sigmoid(s * (R_A - R_B) - log theta).")
    rater_theta: float = option(
        1.5, help="Rater tie parameter theta >= 1 (1: no ties; P(tie | equal) = (t-1)/(t+1))."
    )
    standardize_returns: bool = option(
        True, help="Divide segment returns by their std before the rater (rater_scale is then task-free)."
    )
    seed: int = option(0, help="Seed for the rollouts, the pairing and the rater's noise.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        validate_config(self)
        if not self.sources:
            raise ConfigError('sources is empty; list saved policy directories and/or "random"')
        if len(self.episodes) != len(self.sources):
            raise ConfigError(
                f"episodes has {len(self.episodes)} entries for {len(self.sources)} sources {self.sources}; "
                "give one episode count per source"
            )
        if any(e < 1 for e in self.episodes):
            raise ConfigError(f"episodes must all be >= 1, got {self.episodes}")
        if self.rater_theta < 1:
            raise ConfigError(f"rater_theta must be >= 1 (1 means no ties), got {self.rater_theta}")
        if self.rater_scale < 0:
            raise ConfigError(f"rater_scale must be >= 0, got {self.rater_scale}")


def collect_segments(config: SegmentPreferencesConfig) -> tuple[Segments, list[dict[str, Any]]]:
    """Roll out every source and cut its segments; also per-source statistics."""
    from rlflow.data.collect import collect_demonstrations

    for index, source in enumerate(config.sources):  # fail before any rollout
        if source != RANDOM_SOURCE and not (Path(source) / "config.json").is_file():
            raise ConfigError(
                f"sources[{index}]: {source!r} is not a saved policy directory (no config.json); give the "
                'directory a training run saved (e.g. runs/<run>/policy) or "random"'
            )
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    stats: list[dict[str, Any]] = []
    for index, (source, episodes) in enumerate(zip(config.sources, config.episodes, strict=True)):
        seed = config.seed * 1_000_003 + 10_007 * index  # distinct env seeds per source
        if source == RANDOM_SOURCE:
            demos = collect_random(
                config.task,
                episodes=episodes,
                num_envs=config.num_envs,
                seed=seed,
                max_episode_steps=config.max_episode_steps,
            )
        else:
            demos = collect_demonstrations(
                source,
                config.task,
                episodes=episodes,
                num_envs=config.num_envs,
                deterministic=config.deterministic,
                seed=seed,
                max_episode_steps=config.max_episode_steps,
            )
        steps, returns, real = cut_segments(
            demos.observations,
            demos.actions,
            demos.rewards,
            demos.next_observations,
            demos.terminals,
            demos.episode_ids,
            length=config.segment_length,
            stride=config.stride,
            absorbing=config.absorbing,
        )
        parts.append((steps, returns, real))
        episode_returns = demos.episode_returns()
        stats.append(
            {
                "source": source,
                "episodes": int(demos.num_episodes),
                "transitions": len(demos),
                "episode_return_mean": float(episode_returns.mean()),
                "episode_return_std": float(episode_returns.std()),
                "episode_length_mean": float(demos.episode_lengths().mean()),
                "segments": int(returns.size),
                "segment_return_mean": float(returns.mean()) if returns.size else float("nan"),
                "segment_return_std": float(returns.std()) if returns.size else float("nan"),
            }
        )
        logger.info("source %s: %d episodes, %d segments", source, demos.num_episodes, returns.size)
    segments = Segments(
        steps=np.concatenate([p[0] for p in parts]),
        returns=np.concatenate([p[1] for p in parts]),
        real_steps=np.concatenate([p[2] for p in parts]),
        source=np.concatenate([np.full(p[1].size, i, dtype=np.int64) for i, p in enumerate(parts)]),
    )
    if len(segments) < 2:
        raise ValueError(
            f"only {len(segments)} segment(s) of {config.segment_length} steps were cut; collect more episodes, "
            "shorten segment_length or set absorbing: true"
        )
    return segments, stats


def build_segment_preferences(config: SegmentPreferencesConfig) -> dict[str, Any]:
    """CLI entry: collect, cut, pair, label, save; returns (and writes) the summary."""
    import time

    from rlflow.data.preferences import (
        META_FILE,
        PAIRS_FILE,
        SAMPLES_FILE,
        PreferenceSet,
        is_preference_set,
        save_preferences,
    )
    from rlflow.envs.tasks import env_dims, resolve_task
    from rlflow.utils.output_dirs import check_output_dir
    from rlflow.worlds.shapes.oracle import agreement_ceiling

    started = time.perf_counter()
    # Before any rollout: an existing run or a user's directory must never be written into by mistake.
    check_output_dir(
        config.output_dir,
        is_ours=is_preference_set,
        overwrite=config.overwrite,
        what="a preference set (meta.json)",
        writes=(META_FILE, PAIRS_FILE, SAMPLES_FILE, "summary.json", "config.yaml"),
    )
    gym_id = resolve_task(config.task)
    obs_dim, act_dim = env_dims(gym_id)
    segments, source_stats = collect_segments(config)
    generator = torch.Generator().manual_seed(config.seed)
    count = len(segments)
    # Uniform pairs of distinct segments: draw j from the count - 1 others and skip i.
    first = torch.randint(count, (config.num_pairs,), generator=generator)
    second = torch.randint(count - 1, (config.num_pairs,), generator=generator)
    second = second + (second >= first).long()
    returns = torch.from_numpy(segments.returns)
    return_std = float(returns.std()) if count > 1 else 0.0
    unit = return_std if (config.standardize_returns and return_std > 0) else 1.0
    return_a, return_b = returns[first], returns[second]
    labels, probs = label_pairs(
        return_a / unit,
        return_b / unit,
        scale=config.rater_scale,
        theta=config.rater_theta,
        generator=generator,
    )
    steps = torch.from_numpy(segments.steps)
    pairs = PreferenceSet(
        kind="segment",
        dimensions=["return"],
        prompts=[""] * config.num_pairs,
        a=steps[first].contiguous(),
        b=steps[second].contiguous(),
        labels=labels[:, None].long(),
        meta=to_builtin(
            {
                "obs_dim": obs_dim,
                "act_dim": act_dim,
                "task": config.task,
                "gym_id": gym_id,
                "segment_length": config.segment_length,
                "spaces": "raw",  # observations and actions as the env sees them (not normalised)
                "absorbing": config.absorbing,
                "rater": {
                    "scale": config.rater_scale,
                    "theta": config.rater_theta,
                    "return_unit": unit,
                },
                "sources": list(config.sources),
                "return_a": return_a.tolist(),
                "return_b": return_b.tolist(),
            }
        ),
    )
    output = Path(config.output_dir)
    save_preferences(pairs, output)
    fractions = torch.bincount(labels, minlength=3).double() / config.num_pairs
    ceiling = noiseless_ceiling(return_a, return_b, labels)
    summary: dict[str, Any] = {
        "task": config.task,
        "gym_id": gym_id,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "segments": count,
        "pairs": config.num_pairs,
        "segment_length": config.segment_length,
        "segment_return_mean": float(returns.mean()),
        "segment_return_std": return_std,
        "segment_return_min": float(returns.min()),
        "segment_return_max": float(returns.max()),
        "padded_segments": int((segments.real_steps < config.segment_length).sum()),
        "label_fraction_a": float(fractions[0]),
        "label_fraction_b": float(fractions[1]),
        "label_fraction_tie": float(fractions[2]),
        "expected_tie_fraction": float(probs[:, 2].mean()),
        "noiseless_order_accuracy": ceiling["accuracy"],
        "expected_ceiling": agreement_ceiling(probs, ["return"])["return"],
        "decided_pairs": ceiling["decided_pairs"],
        "sources": source_stats,
        "output_dir": str(output),
    }
    with atomic_file(output / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(to_builtin(summary), indent=2, allow_nan=True))
    dump_yaml(config, output / "config.yaml")
    from rlflow.utils.run import done_line

    line = done_line(
        f"{config.num_pairs} pairs of {config.segment_length}-step {config.task} segments",
        time.perf_counter() - started,
        [
            f"labels A {fractions[0]:.2f} / B {fractions[1]:.2f} / tie {fractions[2]:.2f}",
            f"noiseless-order accuracy {ceiling['accuracy']:.3f}",
        ],
        f"saved to {output}",
    )
    logger.info("%s", line)
    return summary
