"""Demonstration datasets: collect them from a saved policy, store them, and turn them into BC data.

The robotics pipeline is *Gaussian PPO -> collect demonstrations -> behaviour cloning of a flow policy
-> ReinFlow fine-tuning*. This module is the second and the start of the third step:

* :func:`collect_demonstrations` rolls a saved policy (``FlowPolicy`` or ``GaussianPolicy``) out in a
  MuJoCo vector env for an exact number of episodes and records **raw** (unnormalised) transitions;
* :class:`Demonstrations` holds them with D4RL's key names and saves / loads them as ``.npz``
  (:meth:`Demonstrations.save_npz`, :meth:`Demonstrations.load_npz`) or as a local Minari dataset
  (:func:`save_minari`, :func:`load_minari`);
* :func:`chunk_demonstrations` and :func:`bc_data_from_demonstrations` turn transitions into
  (observation, action chunk) pairs normalised to ``[-1, 1]`` for flow-matching behaviour cloning;
* :class:`CollectConfig` / :func:`collect` are the ``rlflow collect`` command.

Decisions worth knowing:

* **Action chunks during collection.** The env runs with horizon 1 so that every env step's raw
  observation is recorded, while a policy with ``horizon > 1`` still acts the way it was trained and
  will be evaluated: it is queried once per chunk and the chunk is executed open loop, one action per
  env step, exactly as :class:`rlflow.envs.ActionChunk` would (the rest of a chunk is discarded when
  the episode ends). Each recorded row is one env step: ``actions[t]`` is the action executed at
  ``observations[t]`` (not a chunk).
* **Which episodes are kept.** Episodes are assigned to the sub-envs up front (sub-env ``i`` runs
  ``episodes // num_envs`` episodes, plus one for the first ``episodes % num_envs``). Keeping the first
  ``episodes`` episodes to *finish* instead would over-represent short (failed) episodes.
* **End flags.** ``terminals`` marks true MDP terminations; ``timeouts`` marks time-limit truncations
  that are not also terminations, so the last row of every collected episode has exactly one of them.
* **Chunk padding.** :func:`chunk_demonstrations` pads chunks that run past the end of an episode by
  repeating that episode's last action (as DPPO / ReinFlow build their datasets), so every time step
  gives a training sample and chunks never mix two episodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rlflow.config import ConfigError, option, validate_config
from rlflow.data.datasets import FlowMatchingData
from rlflow.envs.normalization import Normalization
from rlflow.policies.loading import Policy, load_policy
from rlflow.utils.checkpoint import CheckpointError, atomic_file, to_builtin

__all__ = [
    "CollectConfig",
    "Demonstrations",
    "bc_data_from_demonstrations",
    "chunk_demonstrations",
    "collect",
    "collect_demonstrations",
    "load_demonstrations",
    "load_minari",
    "save_minari",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: ``policy`` value of ``rlflow collect`` that selects the task's scripted expert instead of a saved policy.
SCRIPTED_POLICY = "scripted"

# Written into every file's metadata so a later layout can be told apart.
_FORMAT = "rlflow.Demonstrations"
_VERSION = 1
# npz array names; the float/bool ones follow D4RL (``next_observations`` as in d4rl.qlearning_dataset).
_ARRAY_KEYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminals",
    "timeouts",
    "episode_ids",
)
_METADATA_KEY = "metadata"
_MINARI_HINT = 'install it with: pip install "minari[hdf5]"'


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def _episode_runs(episode_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start row and length of each run of equal ids: ``(starts [E], lengths [E])`` in row order."""
    if episode_ids.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    boundaries = np.flatnonzero(episode_ids[1:] != episode_ids[:-1]) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64)
    ends = np.concatenate([boundaries, [episode_ids.size]]).astype(np.int64)
    return starts, ends - starts


def _nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Indices of the rows (first axis) of a float array that hold a NaN or inf."""
    bad = ~np.isfinite(array)
    if bad.ndim > 1:
        bad = bad.reshape(bad.shape[0], -1).any(axis=1)
    return np.flatnonzero(bad)


@dataclass(eq=False)
class Demonstrations:
    """Transitions grouped by episode, raw (unnormalised), with D4RL's key names.

    Row ``t`` is one env step: the agent saw ``observations[t]``, executed ``actions[t]`` (clipped to
    the env's action bounds), got ``rewards[t]`` and reached ``next_observations[t]`` (the true next
    state, also at the end of an episode). Rows of an episode are contiguous and in time order.

    Attributes:
        observations: float ``[N, obs_dim]``.
        actions: float ``[N, act_dim]``, the env actions actually executed.
        rewards: float ``[N]``.
        next_observations: float ``[N, obs_dim]``; within an episode ``next_observations[t] ==
            observations[t + 1]``, at its last row the episode's final observation.
        terminals: bool ``[N]``, the MDP terminated after this step (no bootstrap).
        timeouts: bool ``[N]``, the episode was cut by a time limit after this step (and did not
            terminate).
        episode_ids: int ``[N]``; each id occupies one contiguous run of rows.
        metadata: JSON-ready dict (task, gym id, policy dir, deterministic flag, seed, episode returns
            and lengths, ...).

    Construction checks shapes, dtypes, finiteness and episode contiguity and raises a
    :class:`ValueError` naming the problem (and, for non-finite values, how many rows are affected).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_ids: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {name: np.asarray(getattr(self, name)) for name in _ARRAY_KEYS}
        expected_ndim = {
            "observations": 2,
            "actions": 2,
            "rewards": 1,
            "next_observations": 2,
            "terminals": 1,
            "timeouts": 1,
            "episode_ids": 1,
        }
        for name, ndim in expected_ndim.items():
            if arrays[name].ndim != ndim:
                layout = "[N]" if ndim == 1 else "[N, dim]"
                raise ValueError(f"Demonstrations.{name} must be {layout}, got shape {arrays[name].shape}")
        num = arrays["observations"].shape[0]
        if num == 0:
            raise ValueError("Demonstrations must hold at least one transition, got 0 rows")
        mismatched = {name: a.shape[0] for name, a in arrays.items() if a.shape[0] != num}
        if mismatched:
            raise ValueError(
                f"Demonstrations arrays must all have N = {num} rows (as observations); got {mismatched}"
            )
        if arrays["next_observations"].shape != arrays["observations"].shape:
            raise ValueError(
                f"Demonstrations.next_observations has shape {arrays['next_observations'].shape}, "
                f"observations {arrays['observations'].shape}; they must match"
            )
        for name in ("observations", "actions", "rewards", "next_observations"):
            if not (
                np.issubdtype(arrays[name].dtype, np.floating)
                or np.issubdtype(arrays[name].dtype, np.integer)
            ):
                raise ValueError(f"Demonstrations.{name} must be numeric, got dtype {arrays[name].dtype}")
            if not np.issubdtype(arrays[name].dtype, np.floating):
                arrays[name] = arrays[name].astype(np.float32)
            bad = _nonfinite_rows(arrays[name])
            if bad.size:
                raise ValueError(
                    f"Demonstrations.{name} contain NaN or inf in {bad.size} of {num} rows (first at row "
                    f"{int(bad[0])}); clean the dataset (or drop those episodes) first"
                )
        for name in ("terminals", "timeouts"):
            flags = arrays[name]
            if flags.dtype != np.bool_:
                # 0/1 integers or floats (as some D4RL files store them) are accepted; anything else is not.
                if not (np.issubdtype(flags.dtype, np.number) and np.isin(flags, (0, 1)).all()):
                    raise ValueError(
                        f"Demonstrations.{name} must be booleans (or 0/1), got dtype {flags.dtype}"
                    )
                arrays[name] = flags.astype(bool)
        if not np.issubdtype(arrays["episode_ids"].dtype, np.integer):
            raise ValueError(
                f"Demonstrations.episode_ids must be integers, got dtype {arrays['episode_ids'].dtype}"
            )
        starts, _ = _episode_runs(arrays["episode_ids"])
        num_unique = np.unique(arrays["episode_ids"]).size
        if starts.size != num_unique:
            raise ValueError(
                f"Demonstrations.episode_ids form {starts.size} runs but hold {num_unique} distinct ids: the "
                "rows of each episode must be contiguous (sort the rows by episode, keeping time order)"
            )
        if not isinstance(self.metadata, dict):
            raise ValueError(f"Demonstrations.metadata must be a dict, got {type(self.metadata).__name__}")
        for name, array in arrays.items():
            setattr(self, name, array)

    # ----------------------------------------------------------------------------------- properties

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def num_episodes(self) -> int:
        return int(_episode_runs(self.episode_ids)[0].size)

    def episode_lengths(self) -> np.ndarray:
        """Rows per episode ``[E]`` (int64), in row order."""
        return _episode_runs(self.episode_ids)[1]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted reward sum per episode ``[E]`` (float64), in row order."""
        starts, _ = _episode_runs(self.episode_ids)
        return np.add.reduceat(self.rewards.astype(np.float64), starts)

    # ----------------------------------------------------------------------------------- persistence

    def save_npz(self, path: PathLike) -> Path:
        """Atomically write a compressed ``.npz`` (readable with ``np.load(path, allow_pickle=False)``).

        The arrays are stored under their attribute names; ``metadata`` as a one-element unicode array
        holding a JSON string (no pickled objects).

        Returns:
            ``path`` as a :class:`~pathlib.Path` (written as given: numpy's ``.npz`` suffix is not added).
        """
        path = Path(path)
        text = json.dumps(to_builtin(self.metadata), sort_keys=True, allow_nan=False)
        payload = {name: getattr(self, name) for name in _ARRAY_KEYS}
        with atomic_file(path) as tmp:
            # A file object, not a path: np.savez would append ".npz" to the temporary's name.
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **payload, **{_METADATA_KEY: np.array([text])})
        logger.info("saved %d transitions (%d episodes) to %s", len(self), self.num_episodes, path)
        return path

    @classmethod
    def load_npz(cls, path: PathLike) -> Demonstrations:
        """Read a file written by :meth:`save_npz`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not an npz, lacks arrays (they are named), holds pickled objects,
                unreadable metadata, or inconsistent arrays (mismatched shapes, NaN rows, ...); the
                message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"demonstrations file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                contents = {key: npz[key] for key in npz.files}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npz file ({exc}); re-create it") from exc
        except ValueError as exc:  # e.g. "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(f"{path} could not be read safely: {exc}") from exc
        missing = [key for key in (*_ARRAY_KEYS, _METADATA_KEY) if key not in contents]
        if missing:
            raise ValueError(
                f"{path} lacks the array(s) {missing} (it has {sorted(contents)}); demonstrations files are "
                "written by `rlflow collect` / Demonstrations.save_npz"
            )
        extra = sorted(set(contents) - {*_ARRAY_KEYS, _METADATA_KEY})
        if extra:
            logger.warning("%s: ignoring unknown arrays %s", path, extra)
        arrays = {key: contents[key] for key in _ARRAY_KEYS}
        meta_array = contents[_METADATA_KEY]
        try:
            if meta_array.shape != (1,) or meta_array.dtype.kind != "U":
                raise ValueError(
                    f"expected a one-element string array, got {meta_array.dtype} {meta_array.shape}"
                )
            metadata = json.loads(str(meta_array[0]))
            if not isinstance(metadata, dict):
                raise ValueError(f"expected a JSON object, got {type(metadata).__name__}")
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: invalid '{_METADATA_KEY}' array: {exc}") from exc
        try:
            return cls(**arrays, metadata=metadata)
        except ValueError as exc:
            raise ValueError(f"invalid demonstrations in {path}: {exc}") from exc


def load_demonstrations(path: PathLike) -> Demonstrations:
    """Alias of :meth:`Demonstrations.load_npz`."""
    return Demonstrations.load_npz(path)


# ---------------------------------------------------------------------------------------------------------
# Chunking and behaviour-cloning data
# ---------------------------------------------------------------------------------------------------------


def chunk_demonstrations(demos: Demonstrations, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(observation, action chunk) pairs: one sample per time step.

    The target of step ``t`` is ``actions[t : t + horizon]`` of the same episode. A chunk that runs
    past the episode's last step is padded by repeating that last action (DPPO / ReinFlow do the
    same), so every step gives a sample and no chunk mixes two episodes.

    Args:
        demos: the transitions (raw or normalised: no scaling happens here).
        horizon: chunk length ``>= 1``.

    Returns:
        ``conditions [N, obs_dim]`` (the observations, same dtype) and ``targets [N, horizon, act_dim]``.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    starts, lengths = _episode_runs(demos.episode_ids)
    # Last row of each row's episode, then clamp row + k to it: the padding by repetition.
    last_row = np.repeat(starts + lengths - 1, lengths)  # [N]
    index = np.arange(len(demos))[:, None] + np.arange(int(horizon))[None, :]  # [N, horizon]
    index = np.minimum(index, last_row[:, None])
    return demos.observations, demos.actions[index]


def bc_data_from_demonstrations(
    source: PathLike | Demonstrations, horizon: int
) -> tuple[FlowMatchingData, Normalization]:
    """Behaviour-cloning data from a demonstrations file, normalised to ``[-1, 1]`` by its min/max.

    Args:
        source: an ``.npz`` written by :meth:`Demonstrations.save_npz`, or a :class:`Demonstrations`.
        horizon: action chunk length of the policy to train.

    Returns:
        ``FlowMatchingData`` with float32 ``conditions [N, obs_dim]`` and ``targets [N, horizon,
        act_dim]`` (both in ``[-1, 1]``), and the :class:`Normalization` that maps raw data there. Save
        it with the pretrained policy (``extra_json={"normalization": normalization.to_dict()}``) so
        that fine-tuning and evaluation apply the same maps.
    """
    demos = source if isinstance(source, Demonstrations) else Demonstrations.load_npz(source)
    normalization = Normalization.from_data(demos.observations, demos.actions)
    conditions, targets = chunk_demonstrations(demos, horizon)
    data = FlowMatchingData(
        targets=torch.as_tensor(
            normalization.normalize_action(targets.astype(np.float64)), dtype=torch.float32
        ),
        conditions=torch.as_tensor(
            normalization.normalize_obs(conditions.astype(np.float64)), dtype=torch.float32
        ),
    )
    return data, normalization


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
        if normalization is not None and (normalization.obs_dim != obs_dim or normalization.act_dim != act_dim):
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
                    policy, normalization, raw_obs, deterministic=deterministic, generator=generator,
                    device=device, low=low, high=high, dtype=space.dtype,
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
            "format": _FORMAT,
            "version": _VERSION,
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
# Minari
# ---------------------------------------------------------------------------------------------------------


def _import_minari() -> Any:
    try:
        import minari
    except ImportError as exc:
        raise ImportError(f"Minari datasets need the optional package minari; {_MINARI_HINT}") from exc
    return minari


@contextlib.contextmanager
def _minari_root(data_path: PathLike | None) -> Iterator[None]:
    """Point Minari at ``data_path`` (its datasets root) for the duration of the block.

    Minari reads its root from ``MINARI_DATASETS_PATH`` on every call (default ``~/.minari/datasets``);
    there is no argument for it, so the variable is set and restored. Not thread-safe.
    """
    if data_path is None:
        yield
        return
    key = "MINARI_DATASETS_PATH"
    previous = os.environ.get(key)
    os.environ[key] = os.fspath(Path(data_path).resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def save_minari(
    demos: Demonstrations,
    dataset_id: str,
    *,
    data_path: PathLike | None = None,
    env: str | None = None,
    algorithm_name: str | None = None,
    author: str | None = None,
    description: str | None = None,
) -> Path:
    """Write ``demos`` as a new local Minari dataset (HDF5; nothing is uploaded).

    Each episode gets ``len + 1`` observations (Minari's layout: the final observation is appended from
    ``next_observations``). rlflow's metadata is kept in the dataset's metadata as the JSON string
    ``rlflow_metadata``, so :func:`load_minari` restores it.

    Args:
        demos: the transitions.
        dataset_id: ``(namespace/)name-v<version>``, e.g. ``"rlflow/hopper-medium-v0"``; must not exist yet.
        data_path: Minari's datasets root; ``None`` uses ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``.
        env: gymnasium id recorded as the dataset's environment; ``None`` uses ``metadata["gym_id"]``
            (with the collection's ``max_episode_steps``), or records unbounded Box spaces if absent.
        algorithm_name, author, description: Minari metadata (defaults describe the collection).

    Returns:
        The dataset's directory.

    Raises:
        ImportError: minari is not installed (the message says how to install it).
        FileExistsError: a dataset with this id already exists under the root.
    """
    minari = _import_minari()
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        parse_dataset_id(dataset_id)
    except ValueError as exc:
        raise ValueError(f"{exc} (e.g. 'rlflow/hopper-medium-v0')") from exc
    metadata = demos.metadata
    gym_id = env if env is not None else metadata.get("gym_id")
    starts, lengths = _episode_runs(demos.episode_ids)
    buffers = []
    for index, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        stop = start + length
        buffers.append(
            EpisodeBuffer(
                id=index,  # Minari requires sequential ids from 0
                observations=np.concatenate(
                    [demos.observations[start:stop], demos.next_observations[stop - 1 : stop]]
                ),
                actions=demos.actions[start:stop],
                rewards=demos.rewards[start:stop],
                terminations=demos.terminals[start:stop],
                truncations=demos.timeouts[start:stop],
                infos={},
            )
        )
    spaces: dict[str, Any] = {}
    if gym_id is not None:
        env_spec = gym.spec(gym_id)
        if env is None and metadata.get("max_episode_steps") is not None:
            env_spec = dataclasses.replace(env_spec, max_episode_steps=int(metadata["max_episode_steps"]))
        spaces["env"] = env_spec
        # The recorded arrays are float32; MuJoCo's observation Box is float64. Declaring float32 spaces
        # with the env's bounds keeps Minari's spaces consistent with the stored data.
        probe = gym.make(env_spec)
        try:
            obs_space, act_space = probe.observation_space, probe.action_space
            spaces["observation_space"] = gym.spaces.Box(
                obs_space.low.astype(np.float32), obs_space.high.astype(np.float32), dtype=np.float32
            )
            spaces["action_space"] = gym.spaces.Box(
                act_space.low.astype(np.float32), act_space.high.astype(np.float32), dtype=np.float32
            )
        finally:
            probe.close()
    else:
        spaces["observation_space"] = gym.spaces.Box(-np.inf, np.inf, (demos.obs_dim,), dtype=np.float32)
        spaces["action_space"] = gym.spaces.Box(-np.inf, np.inf, (demos.act_dim,), dtype=np.float32)
    algorithm_name = algorithm_name or f"rlflow.collect ({metadata.get('policy_type', 'policy')})"
    if description is None:
        returns = demos.episode_returns()
        description = (
            f"{demos.num_episodes} episodes ({len(demos)} transitions) of {gym_id or 'an unknown env'} "
            f"collected by rlflow from {metadata.get('policy_dir', 'an unknown policy')} "
            f"(deterministic={metadata.get('deterministic')}, seed={metadata.get('seed')}); "
            f"return {returns.mean():.1f} +- {returns.std():.1f}."
        )
    with _minari_root(data_path):
        path = get_dataset_path(dataset_id)
        if path.exists():
            raise FileExistsError(
                f"a Minari dataset {dataset_id!r} already exists at {path}; choose a new id or version"
            )
        try:
            dataset = _create_minari_dataset(
                minari, dataset_id, buffers, spaces, algorithm_name, author, description
            )
            dataset.storage.update_metadata(
                {"rlflow_metadata": json.dumps(to_builtin(metadata), sort_keys=True)}
            )
        except BaseException:
            # Minari creates the directory first: do not leave a half-written dataset that blocks the id.
            # It did not exist before this call (checked above), so only what Minari just wrote goes.
            shutil.rmtree(path, ignore_errors=True)
            raise
    logger.info("saved Minari dataset %s (%d episodes) to %s", dataset_id, demos.num_episodes, path)
    return path


def _create_minari_dataset(
    minari: Any,
    dataset_id: str,
    buffers: list[Any],
    spaces: dict[str, Any],
    algorithm_name: str | None,
    author: str | None,
    description: str,
) -> Any:
    """``minari.create_dataset_from_buffers`` without its warnings about unset provenance fields."""
    with warnings.catch_warnings():
        # Minari nags about provenance fields (author, e-mail, code link, eval env) that a local
        # dataset need not have.
        warnings.filterwarnings("ignore", message=r"`\w+` is set to None", category=UserWarning)
        return minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            algorithm_name=algorithm_name,
            author=author,
            description=description,
            **spaces,
        )


def load_minari(
    dataset_id: str, *, data_path: PathLike | None = None, download: bool = False
) -> Demonstrations:
    """Read a local Minari dataset (e.g. one written by :func:`save_minari`, or ``mujoco/hopper/medium-v0``
    fetched with ``minari download``) as :class:`Demonstrations`.

    Minari stores ``len + 1`` observations per episode: rows use the first ``len`` as ``observations``
    and the last ``len`` as ``next_observations``. ``timeouts`` are truncations that are not also
    terminations. Episode ids are Minari's.

    Args:
        dataset_id: the Minari id.
        data_path: Minari's datasets root (``None``: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).
        download: let Minari download a missing dataset from its hub (needs network access).

    Raises:
        ImportError: minari is not installed.
        FileNotFoundError: the dataset is not there (and ``download`` is false).
        ValueError: the dataset's observations or actions are not flat arrays (Dict / Tuple spaces).
    """
    minari = _import_minari()
    with _minari_root(data_path):
        try:
            dataset = minari.load_dataset(dataset_id, download=download)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc} (Minari's root: data_path or $MINARI_DATASETS_PATH; `minari download {dataset_id}` "
                "fetches hub datasets)"
            ) from exc
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*_ARRAY_KEYS,)}
        for episode in dataset.iterate_episodes():
            obs, actions = episode.observations, episode.actions
            if not isinstance(obs, np.ndarray) or not isinstance(actions, np.ndarray):
                raise ValueError(
                    f"Minari dataset {dataset_id!r} has structured (Dict/Tuple) observations or actions; "
                    "rlflow needs flat Box arrays"
                )
            num = len(episode)
            if obs.shape[0] != num + 1:
                raise ValueError(
                    f"Minari dataset {dataset_id!r}, episode {episode.id}: {obs.shape[0]} observations for "
                    f"{num} steps (expected {num + 1})"
                )
            terminations = np.asarray(episode.terminations, dtype=bool)
            parts["observations"].append(obs[:-1].reshape(num, -1))
            parts["next_observations"].append(obs[1:].reshape(num, -1))
            parts["actions"].append(actions.reshape(num, -1))
            parts["rewards"].append(np.asarray(episode.rewards))
            parts["terminals"].append(terminations)
            parts["timeouts"].append(np.asarray(episode.truncations, dtype=bool) & ~terminations)
            parts["episode_ids"].append(np.full(num, int(episode.id), dtype=np.int64))
        raw_meta = dataset.storage.metadata
        env_spec = dataset.spec.env_spec
    if not parts["rewards"]:
        raise ValueError(f"Minari dataset {dataset_id!r} has no episodes")
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    metadata: dict[str, Any] = {}
    stored = raw_meta.get("rlflow_metadata")
    if isinstance(stored, str):
        with contextlib.suppress(json.JSONDecodeError):
            metadata.update(json.loads(stored))
    metadata.update(
        {
            "source": f"minari:{dataset_id}",
            "minari_version": str(getattr(minari, "__version__", "unknown")),
        }
    )
    if env_spec is not None:
        metadata.setdefault("gym_id", env_spec.id)
    demos = Demonstrations(**arrays, metadata=metadata)
    demos.metadata.setdefault("episode_returns", demos.episode_returns().tolist())
    demos.metadata.setdefault("episode_lengths", demos.episode_lengths().tolist())
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
                raise ConfigError(f"output {self.output!r} must end in .npz (the demonstrations are an npz file)")
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
        _import_minari()
        from minari.storage.datasets_root_dir import get_dataset_path

        with _minari_root(config.data_path):
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
