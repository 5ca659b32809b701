"""``rlflow collect``: record demonstrations of a saved policy or a scripted expert in a MuJoCo vector env.

:func:`collect_demonstrations` rolls a saved policy (``FlowPolicy`` or ``GaussianPolicy``) or a Meta-World
task's scripted expert out for an exact number of episodes and records **raw** (unnormalised) transitions
as :class:`~rlflow.data.demonstrations.Demonstrations`; :class:`CollectConfig` / :func:`collect` are the
command, which writes them as ``.npz`` and / or a Minari dataset (:mod:`rlflow.data.minari_io`). How action
chunks, episode assignment and end flags are handled: :mod:`rlflow.data.demonstrations`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlflow.config import ConfigError, option, validate_config
from rlflow.data.demonstrations import (
    DEMONSTRATIONS_FORMAT,
    DEMONSTRATIONS_VERSION,
    SCRIPTED_POLICY,
    Demonstrations,
    PathLike,
)
from rlflow.data.minari_io import import_minari, minari_root, save_minari
from rlflow.envs.normalization import Normalization
from rlflow.policies.loading import Policy, load_policy
from rlflow.utils.checkpoint import CheckpointError

__all__ = ["CollectConfig", "collect", "collect_demonstrations"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------------------------


def _policy_env_actions(
    policy: Policy,
    normalization: Normalization,
    raw_obs: np.ndarray,
    *,
    deterministic: bool,
    generator: torch.Generator,
    device: torch.device,
    low: np.ndarray,
    high: np.ndarray,
    dtype: np.dtype,
) -> np.ndarray:
    """Raw observations ``[k, obs_dim]`` -> raw, clipped env action chunks ``[k, horizon, act_dim]``.

    The same maps as :class:`rlflow.envs.NormalizedObsAction` (normalise in float64, feed float32;
    denormalise, clip to the env's bounds, cast to the env's action dtype), applied here because the
    env runs unwrapped so that raw values can be recorded.
    """
    obs = normalization.normalize_obs(raw_obs.astype(np.float64)).astype(np.float32)
    obs_t = torch.as_tensor(obs, device=device)
    if deterministic:
        action = policy.deterministic_action(obs_t, generator=generator)
    else:
        action = policy.explore(obs_t, generator=generator).action
    raw = normalization.denormalize_action(action.detach().cpu().numpy().astype(np.float64))
    return np.clip(raw, low, high).astype(dtype)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


@torch.no_grad()
def collect_demonstrations(
    policy_dir: PathLike,
    task: str,
    *,
    episodes: int,
    num_envs: int = 8,
    deterministic: bool = False,
    seed: int = 0,
    max_episode_steps: int | None = None,
    device: str | torch.device = "cpu",
    action_noise_std: float = 0.0,
) -> Demonstrations:
    """Roll a saved policy (or a scripted expert) out for exactly ``episodes`` complete episodes and record
    raw transitions.

    The vector env runs without the normalisation wrapper and with horizon 1; the policy's
    ``normalization.json`` is applied here (policy input ``normalize_obs(raw obs)``, env action
    ``clip(denormalize_action(policy action), env low, env high)``), so the recorded observations and
    actions are the raw ones. Without a ``normalization.json`` the identity statistics are used (raw
    observations in, ``[-1, 1]`` mapped onto the action bounds), as ``rlflow ppo`` does. Policies with
    ``horizon > 1`` execute each chunk open loop and every env step is recorded (module docstring).

    ``policy_dir`` ``"scripted"`` uses the task's hand-written expert instead (Meta-World tasks:
    :func:`rlflow.envs.manipulation.scripted_expert`; one action per env step).

    Args:
        policy_dir: directory written by ``save_pretrained`` (``config.json``, ``model.safetensors``,
            ``normalization.json``), or ``"scripted"``.
        task: short name or gymnasium id (:func:`rlflow.envs.resolve_task`).
        episodes: number of complete episodes to record.
        num_envs: parallel sub-envs (capped at ``episodes``).
        deterministic: use the policy's deterministic action (Gaussian mean / noise-free flow ODE)
            instead of sampling.
        seed: seeds the envs (sub-env ``i`` with ``seed + i``) and the policy's sampling generator.
        max_episode_steps: time limit in env steps; ``None`` keeps the task's (1000).
        device: torch device of the policy.
        action_noise_std: Gaussian noise added to every executed action, in units of half the action range
            (``N(0, (action_noise_std * (high - low) / 2)^2)``), after the policy's action is clipped to the
            bounds and clipped again after: demonstrations with mistakes and failures, as real ones have.

    Returns:
        The episodes in completion order (ids ``0 .. episodes - 1``); ``metadata`` records the settings
        and the env-reported returns and lengths per episode.
    """
    from rlflow.envs.tasks import TASKS, env_dims, make_vector_env, resolve_task
    from rlflow.rollout.gym import check_env_step

    episodes = _check_positive_int(episodes, "episodes")
    num_envs = min(_check_positive_int(num_envs, "num_envs"), episodes)
    if max_episode_steps is not None:
        max_episode_steps = _check_positive_int(max_episode_steps, "max_episode_steps")
    if not np.isfinite(action_noise_std) or action_noise_std < 0:
        raise ValueError(f"action_noise_std must be a finite number >= 0, got {action_noise_std!r}")
    gym_id = resolve_task(task)
    obs_dim, act_dim = env_dims(gym_id)
    device = torch.device(device)
    scripted = str(policy_dir) == SCRIPTED_POLICY
    if scripted:
        from rlflow.envs.manipulation import scripted_expert_for

        expert = scripted_expert_for(gym_id)
        policy = normalization = None
        horizon = 1
    else:
        policy, normalization = load_policy(policy_dir, device=device)
        if policy.config.obs_dim != obs_dim or policy.config.act_dim != act_dim:
            raise ConfigError(
                f"the policy in {policy_dir} (obs_dim={policy.config.obs_dim}, act_dim={policy.config.act_dim}) "
                f"does not fit task {task!r} (obs_dim={obs_dim}, act_dim={act_dim}); pick the task it was trained on"
            )
        horizon = int(policy.config.horizon)
    noise_rng = np.random.default_rng(seed)

    envs = make_vector_env(gym_id, num_envs, horizon=1, seed=seed, max_episode_steps=max_episode_steps)
    try:
        space = envs.single_action_space  # Box (1, act_dim): horizon-1 chunks
        low, high = space.low[0].astype(np.float64), space.high[0].astype(np.float64)
        if policy is not None and normalization is None:
            logger.warning("%s has no normalization.json; using identity statistics", policy_dir)
            normalization = Normalization.identity(obs_dim, low, high)
        if normalization is not None and (
            normalization.obs_dim != obs_dim or normalization.act_dim != act_dim
        ):
            raise CheckpointError(
                f"{Path(policy_dir) / 'normalization.json'} is for obs_dim={normalization.obs_dim}, "
                f"act_dim={normalization.act_dim}, but {gym_id} has obs_dim={obs_dim}, act_dim={act_dim}"
            )
        generator = torch.Generator(device=device).manual_seed(seed)
        noise_scale = action_noise_std * (high - low) / 2

        def chunks_for(raw_obs: np.ndarray) -> np.ndarray:
            """Raw observations ``[k, obs_dim]`` -> executed raw action chunks ``[k, horizon, act_dim]``."""
            if policy is None:
                chunk = np.clip(expert(raw_obs), low, high)[:, None, :]
            else:
                chunk = _policy_env_actions(
                    policy,
                    normalization,
                    raw_obs,
                    deterministic=deterministic,
                    generator=generator,
                    device=device,
                    low=low,
                    high=high,
                    dtype=space.dtype,
                )
            if action_noise_std > 0:
                chunk = np.clip(chunk + noise_scale * noise_rng.standard_normal(chunk.shape), low, high)
            return chunk.astype(space.dtype)

        env_index = np.arange(num_envs)
        # Episodes per sub-env, fixed up front so the kept episodes do not depend on their lengths.
        quota = episodes // num_envs + (env_index < episodes % num_envs)  # [num_envs]
        finished = np.zeros(num_envs, dtype=np.int64)  # complete episodes per sub-env so far
        plan = np.zeros((num_envs, horizon, act_dim), dtype=space.dtype)  # current chunk per sub-env
        cursor = np.full(num_envs, horizon)  # next chunk position; == horizon: ask the policy

        # Per-step records over the sub-envs still collecting, concatenated at the end.
        steps: dict[str, list[np.ndarray]] = {
            k: [] for k in ("env", "episode", "obs", "action", "reward", "next_obs", "term", "trunc")
        }
        # Completed episodes in completion order: (sub-env, its local episode index, return, length).
        done_env: list[np.ndarray] = []
        done_local: list[np.ndarray] = []
        done_return: list[np.ndarray] = []
        done_length: list[np.ndarray] = []

        obs, _ = envs.reset(seed=seed)
        with tqdm(total=episodes, desc=f"collect {task}", unit="ep", disable=None) as bar:
            while (finished < quota).any():
                active = finished < quota  # [num_envs]
                replan = active & (cursor >= horizon)
                if replan.any():
                    plan[replan] = chunks_for(obs[replan])
                    cursor[replan] = 0
                # Sub-envs past their quota keep stepping (SyncVectorEnv steps all) with a stale action;
                # nothing of theirs is recorded.
                action = plan[env_index, np.minimum(cursor, horizon - 1)]  # [num_envs, act_dim]
                next_obs, reward, term, trunc, infos = envs.step(action[:, None, :])
                term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
                ended = term | trunc
                cursor += 1
                cursor[ended] = horizon  # a new episode starts with a new chunk (ActionChunk drops the rest)

                # SAME_STEP autoreset: next_obs of a finished sub-env is already the reset observation.
                true_next = np.array(next_obs, dtype=np.float64, copy=True)
                if ended.any():
                    final_mask = np.asarray(infos["_final_obs"], dtype=bool)
                    true_next[final_mask] = np.stack(infos["final_obs"][final_mask])
                check_env_step(
                    len(steps["env"]),
                    observations=true_next,
                    rewards=np.asarray(reward, dtype=np.float64),
                    where="collection",
                )

                steps["env"].append(env_index[active])
                steps["episode"].append(finished[active])
                steps["obs"].append(np.asarray(obs, dtype=np.float64)[active])
                steps["action"].append(action[active])
                steps["reward"].append(np.asarray(reward, dtype=np.float64)[active])
                steps["next_obs"].append(true_next[active])
                steps["term"].append(term[active])
                steps["trunc"].append(trunc[active])

                completes = ended & active
                if completes.any():
                    stats = infos["final_info"]["episode"]
                    done_env.append(env_index[completes])
                    done_local.append(finished[completes])
                    done_return.append(np.asarray(stats["r"], dtype=np.float64)[completes])
                    done_length.append(np.asarray(stats["l"], dtype=np.int64)[completes])
                    finished += completes
                    bar.update(int(completes.sum()))
                obs = next_obs
    finally:
        envs.close()

    # Global episode ids in completion order; rows sorted by id (stable: time order is kept).
    env_of_done, local_of_done = np.concatenate(done_env), np.concatenate(done_local)
    global_id = np.full((num_envs, int(quota.max())), -1, dtype=np.int64)
    global_id[env_of_done, local_of_done] = np.arange(episodes)
    row_ids = global_id[np.concatenate(steps["env"]), np.concatenate(steps["episode"])]
    order = np.argsort(row_ids, kind="stable")
    term_rows = np.concatenate(steps["term"])[order]
    returns = np.concatenate(done_return)
    lengths = np.concatenate(done_length)
    task_name = next((name for name, gid in TASKS.items() if gid == gym_id), gym_id)
    demos = Demonstrations(
        observations=np.concatenate(steps["obs"])[order].astype(np.float32),
        actions=np.concatenate(steps["action"])[order].astype(np.float32),
        rewards=np.concatenate(steps["reward"])[order].astype(np.float32),
        next_observations=np.concatenate(steps["next_obs"])[order].astype(np.float32),
        terminals=term_rows,
        timeouts=np.concatenate(steps["trunc"])[order] & ~term_rows,
        episode_ids=row_ids[order],
        metadata={
            "format": DEMONSTRATIONS_FORMAT,
            "version": DEMONSTRATIONS_VERSION,
            "source": "rlflow.collect",
            "task": task_name,
            "gym_id": gym_id,
            "policy_dir": SCRIPTED_POLICY if scripted else str(Path(policy_dir).resolve()),
            "policy_type": "scripted_expert" if scripted else policy.model_type,
            "policy_horizon": horizon,
            "deterministic": bool(deterministic),
            "action_noise_std": float(action_noise_std),
            "seed": int(seed),
            "num_envs": num_envs,
            "max_episode_steps": max_episode_steps,
            "episode_returns": returns.tolist(),
            "episode_lengths": lengths.tolist(),
        },
    )
    # The env's own episode statistics must agree with what was recorded (guards the bookkeeping above).
    if not np.array_equal(demos.episode_lengths(), lengths):
        raise RuntimeError(
            f"recorded episode lengths {demos.episode_lengths().tolist()} differ from the env's {lengths.tolist()}"
        )
    return demos


# ---------------------------------------------------------------------------------------------------------
# The ``rlflow collect`` command
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CollectConfig:
    """``rlflow collect``: record demonstrations of a saved policy (e.g. a "medium" PPO checkpoint)."""

    policy: str = option(
        help="Saved policy directory (config.json, model.safetensors, normalization.json), or 'scripted' for "
        "the task's hand-written expert (Meta-World tasks)."
    )
    task: str = option(
        help="Task the policy acts in: hopper, walker2d, ..., button_press, pick_place, ... (or a gym id)."
    )
    episodes: int = option(100, help="Complete episodes to record.")
    num_envs: int = option(8, help="Parallel environments.")
    deterministic: bool = option(False, help="Act with the deterministic action instead of sampling.")
    seed: int = option(0, help="Seed for the environments and the policy's sampling.")
    max_episode_steps: int | None = option(None, help="Time limit in env steps (null: the task's, 1000).")
    output: str | None = option(None, help="Path of the .npz file to write (null: none; then set minari_id).")
    minari_id: str | None = option(
        None, help='Also write a local Minari dataset with this id, e.g. "rlflow/hopper-medium-v0".'
    )
    action_noise_std: float = option(
        0.0,
        bounds="[0, 10]",
        help="Gaussian noise on every executed action, in half action ranges (clipped to the bounds): "
        "demonstrations with mistakes and failures.",
    )
    overwrite: bool = option(False, help="Replace an existing output file (otherwise it is an error).")
    data_path: str | None = option(
        None, help="Minari datasets root (null: $MINARI_DATASETS_PATH or ~/.minari/datasets)."
    )

    def __post_init__(self) -> None:
        validate_config(self)
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"max_episode_steps must be >= 1 or null, got {self.max_episode_steps}")
        if self.output is None and self.minari_id is None:
            raise ConfigError("nothing would be written: set output (an .npz path) and/or minari_id")
        if self.output is not None:
            if not self.output.endswith(".npz"):
                raise ConfigError(
                    f"output {self.output!r} must end in .npz (the demonstrations are an npz file)"
                )
            target = Path(self.output)
            if target.is_dir():
                raise ConfigError(f"output {self.output!r} is a directory; give a file path ending in .npz")
            if any(parent.exists() and not parent.is_dir() for parent in target.parents):
                raise ConfigError(f"output {self.output!r} is below a file; choose a path in a directory")


def collect(config: CollectConfig) -> dict[str, Any]:
    """CLI entry: collect, write the npz and/or Minari dataset, and return (and log) a summary."""
    import time

    started = time.perf_counter()
    if config.output is not None and Path(config.output).exists() and not config.overwrite:
        # Checked here, not in the config: a recipe naming a shipped file must still load (and say this).
        raise ConfigError(
            f"output {config.output!r} already exists; set overwrite: true to replace it, or choose a new path"
        )
    if config.minari_id is not None:
        # Fail before spending time on collection: minari missing, or the id taken.
        import_minari()
        from minari.storage.datasets_root_dir import get_dataset_path

        with minari_root(config.data_path):
            try:
                existing = get_dataset_path(config.minari_id)
            except ValueError as exc:  # minari's own check of the id's form
                raise ConfigError(
                    f"minari_id {config.minari_id!r} is not a Minari dataset id ({exc}); write it as "
                    "namespace/name-v0, e.g. rlflow/hopper-medium-v0"
                ) from None
        if existing.exists():
            raise ConfigError(
                f"minari_id: a Minari dataset {config.minari_id!r} already exists at {existing}; choose a new "
                "id or version"
            )
    demos = collect_demonstrations(
        config.policy,
        config.task,
        episodes=config.episodes,
        num_envs=config.num_envs,
        deterministic=config.deterministic,
        seed=config.seed,
        max_episode_steps=config.max_episode_steps,
        action_noise_std=config.action_noise_std,
    )
    output = demos.save_npz(config.output) if config.output is not None else None
    minari_path = (
        save_minari(demos, config.minari_id, data_path=config.data_path)
        if config.minari_id is not None
        else None
    )
    returns = np.asarray(demos.metadata["episode_returns"], dtype=np.float64)
    lengths = np.asarray(demos.metadata["episode_lengths"], dtype=np.float64)
    summary: dict[str, Any] = {
        "task": demos.metadata["task"],
        "episodes": demos.num_episodes,
        "transitions": len(demos),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
        "length_mean": float(lengths.mean()),
        "terminals": int(demos.terminals.sum()),
        "timeouts": int(demos.timeouts.sum()),
        "output": None if output is None else str(output),
        "minari_id": config.minari_id,
        "minari_path": None if minari_path is None else str(minari_path),
    }
    from rlflow.utils.run import done_line

    saved = [
        *([] if output is None else [f"wrote {output}"]),
        *([] if minari_path is None else [f"Minari dataset {config.minari_id} at {minari_path}"]),
    ]
    line = done_line(
        f"collected {summary['episodes']} episodes ({summary['transitions']} transitions) of {summary['task']}",
        time.perf_counter() - started,
        [
            f"return {summary['return_mean']:.1f} +- {summary['return_std']:.1f} (std; min "
            f"{summary['return_min']:.1f}, max {summary['return_max']:.1f})"
        ],
        "; ".join(saved),
    )
    logger.info("%s", line)
    return summary
