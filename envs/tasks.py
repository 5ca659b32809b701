"""The MuJoCo locomotion tasks and factories for single and vectorised, wrapped environments.

Tasks are named either by a short name (``"hopper"``) or by their gymnasium id (``"Hopper-v5"``); see
:data:`TASKS`. :func:`make_env` builds one env with rlflow's standard wrapper stack
(:func:`rlflow.envs.wrappers.wrap_env`), :func:`make_vector_env` a ``SyncVectorEnv`` of them.

Vector-env ``infos`` under ``AutoresetMode.SAME_STEP`` (checked against gymnasium 1.4; the mode and the
``final_obs`` / ``final_info`` keys exist from gymnasium 1.1 on). When sub-env ``i`` terminates or
truncates in a ``step`` call, that same call returns, for ``i``:

* ``obs[i]``: the **reset** observation of the next episode (the next chunk starts from it);
* ``rewards[i]``, ``terminations[i]``, ``truncations[i]``: those of the finished chunk (the reward is
  the sum over the env steps the chunk executed before the episode ended);
* ``infos["final_obs"]``: numpy **object** array ``[num_envs]``; element ``i`` is the true last
  observation ``[obs_dim]`` of the finished episode (elements of sub-envs that did not finish are
  ``None``); ``infos["_final_obs"]``: bool ``[num_envs]``, true exactly for the finished sub-envs;
* ``infos["final_info"]``: a dict laid out like a vector ``infos`` (arrays over ``num_envs`` with ``_key``
  masks) holding the finished step's info; ``infos["_final_info"]``: bool ``[num_envs]`` (same mask);
* the episode statistics are at ``infos["final_info"]["episode"]``, a dict with
  ``"r"`` float64 ``[num_envs]`` (true return), ``"l"`` int ``[num_envs]`` (true length in **env steps**,
  not chunks), ``"t"`` float ``[num_envs]`` (wall-clock seconds), and masks ``"_r"``, ``"_l"``, ``"_t"``;
  ``infos["final_info"]["_episode"]`` is the bool ``[num_envs]`` mask of sub-envs with statistics.
  Read episode ``i``'s return as ``infos["final_info"]["episode"]["r"][i]`` where
  ``infos["final_info"]["_episode"][i]``; entries of other sub-envs are 0 and meaningless;
* the finished chunk's length is ``infos["final_info"]["chunk_steps"][i]``. The top-level
  ``infos["chunk_steps"]`` / ``infos["_chunk_steps"]`` hold it only for the sub-envs that did **not**
  finish: for a finished sub-env the top level carries the *reset* info instead (mask false for
  ``chunk_steps``, no ``"episode"`` key at the top level from it). Count env steps as
  ``where(_final_info, final_info["chunk_steps"], chunk_steps)``.

None of these keys exist in a step where no sub-env finished (``infos`` then has only the running
sub-envs' info keys, e.g. ``chunk_steps``), so test with ``"final_info" in infos`` (or ``.get``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import gymnasium as gym
import numpy as np

from rlflow.config import ConfigError

from .normalization import Normalization
from .wrappers import wrap_env

__all__ = ["TASKS", "env_dims", "make_env", "make_vector_env", "resolve_task"]

logger = logging.getLogger(__name__)

# Short name -> gymnasium id. The v5 versions are the maintained MuJoCo-bindings envs (the v2/v3 ones
# need the deprecated mujoco-py).
TASKS: dict[str, str] = {
    "hopper": "Hopper-v5",
    "walker2d": "Walker2d-v5",
    "halfcheetah": "HalfCheetah-v5",
    "ant": "Ant-v5",
    "humanoid": "Humanoid-v5",
    # Small and quick to learn: the task for learning tests and smoke runs.
    "inverted_pendulum": "InvertedPendulum-v5",
}


def resolve_task(task: str) -> str:
    """The gymnasium id of ``task``, given as a short name or an id (both case-insensitive).

    Raises:
        ValueError: unknown task; the message lists the accepted names.
    """
    if not isinstance(task, str):
        raise ConfigError(f"task must be a string, got {type(task).__name__}")
    key = task.strip().lower()
    if key in TASKS:
        return TASKS[key]
    for gym_id in TASKS.values():
        if key == gym_id.lower():
            return gym_id
    choices = ", ".join(f"{name} ({gym_id})" for name, gym_id in TASKS.items())
    raise ConfigError(f"unknown task {task!r}; choose one of: {choices}")


def make_env(
    task: str,
    *,
    horizon: int = 1,
    normalization: Normalization | None = None,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
    **make_kwargs: Any,
) -> gym.Env[np.ndarray, np.ndarray]:
    """One wrapped env: ``gym.make -> RecordEpisodeStatistics -> [NormalizedObsAction] -> ActionChunk``.

    Args:
        task: short name or gymnasium id (:func:`resolve_task`).
        horizon: actions per agent step; the action space is ``(horizon, act_dim)`` even for ``1``.
        normalization: dataset statistics (observations and actions in ``[-1, 1]``); ``None`` keeps the
            raw spaces (observations float64 as MuJoCo returns them).
        render_mode: passed to ``gym.make`` (``"rgb_array"`` for videos).
        max_episode_steps: episode limit in **env steps** (not chunks); ``None`` keeps the task's
            default (1000 for these tasks).
        **make_kwargs: further keyword arguments for ``gym.make`` (e.g. ``width``, ``height``,
            ``terminate_when_unhealthy``).

    Returns:
        The env; observations ``[obs_dim]``, actions ``[horizon, act_dim]``.
    """
    gym_id = resolve_task(task)
    env = gym.make(gym_id, render_mode=render_mode, max_episode_steps=max_episode_steps, **make_kwargs)
    return wrap_env(env, horizon=horizon, normalization=normalization)


def make_vector_env(
    task: str,
    num_envs: int,
    *,
    horizon: int = 1,
    normalization: Normalization | None = None,
    seed: int | None = None,
    max_episode_steps: int | None = None,
) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies of :func:`make_env` in a ``SyncVectorEnv`` with ``AutoresetMode.SAME_STEP``.

    See the module docstring for the exact ``infos`` layout when a sub-env finishes (``final_obs``,
    ``final_info``, where ``episode`` statistics and ``chunk_steps`` end up).

    Seeding: when ``seed`` is given, the env is reset once here with ``reset(seed=seed)`` (sub-env ``i``
    gets ``seed + i``) and the action spaces are seeded likewise, so every later ``reset()`` without a
    seed, and therefore the whole run, is reproducible. The caller still calls ``reset()`` to obtain
    the first observations (calling ``reset(seed=seed)`` again gives the same ones).

    Returns:
        The vector env: observations ``[num_envs, obs_dim]``, actions ``[num_envs, horizon, act_dim]``.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    gym_id = resolve_task(task)  # fail here, not inside a factory, on a bad name
    factory = functools.partial(
        make_env, gym_id, horizon=horizon, normalization=normalization, max_episode_steps=max_episode_steps
    )
    envs = gym.vector.SyncVectorEnv(
        [factory for _ in range(int(num_envs))], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    if seed is not None:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        for i, sub in enumerate(envs.envs):
            sub.action_space.seed(seed + i)
    return envs


@functools.cache
def _dims(gym_id: str) -> tuple[int, int]:
    env = gym.make(gym_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if obs_space.shape is None or act_space.shape is None:
            raise TypeError(f"{gym_id} does not have Box observation/action spaces")
        return int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))
    finally:
        env.close()


def env_dims(task: str) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` of a task, read from its spaces (builds the env once, never steps; cached)."""
    return _dims(resolve_task(task))


def identity_normalization(task: str) -> Normalization:
    """Statistics for a task without a dataset: observations unchanged, actions mapped from [-1, 1] to the
    env's action bounds (what a policy trained from scratch acts in)."""
    gym_id = resolve_task(task)
    env = gym.make(gym_id)
    try:
        low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    finally:
        env.close()
    return Normalization.identity(_dims(gym_id)[0], low, high)
