"""gymnasium wrappers that give every rlflow task the same interface: normalised spaces and action chunks.

The stack built by :func:`wrap_env` (and therefore by :func:`rlflow.envs.tasks.make_env`), innermost first::

    gym.make(task)                 raw MuJoCo env + gymnasium's TimeLimit (counts raw env steps)
    RecordEpisodeStatistics        info["episode"] = {"r": true return, "l": true length in env steps, "t": seconds}
    NormalizedObsAction            optional: observations / actions in [-1, 1] (dataset min-max statistics)
    ActionChunk(horizon)           one agent step = ``horizon`` env steps; action shape (horizon, act_dim)

Episode statistics are recorded innermost, on every raw env step, so that returns and lengths are the
environment's true ones whatever the chunking or normalisation; the chunk wrapper passes the last inner
step's info (and with it ``info["episode"]``) through.
"""

from __future__ import annotations

import logging
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box

from .normalization import Normalization

__all__ = ["ActionChunk", "NormalizedObsAction", "wrap_env"]

logger = logging.getLogger(__name__)


def _require_vector_box(space: gym.Space[Any], what: str, env: gym.Env[Any, Any]) -> Box:
    """``space`` if it is a 1-D Box, else a TypeError naming the env (the wrappers need flat vectors)."""
    if not isinstance(space, Box) or len(space.shape) != 1:
        raise TypeError(f"{env} has {what} space {space}; rlflow's wrappers need a 1-D gymnasium.spaces.Box")
    return space


class ActionChunk(
    gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray], gym.utils.RecordConstructorArgs
):
    """Execute a chunk of ``horizon`` actions per agent step (action chunking, as in ReinFlow / DPPO).

    Action space: ``Box(shape=(horizon, act_dim))`` whose bounds are the inner Box's bounds tiled over the
    chunk (same dtype). ``step(chunk)`` executes ``chunk[0], chunk[1], ...`` in order and returns

    * ``obs``: the observation after the last executed action;
    * ``reward``: the plain (undiscounted) sum of the executed steps' rewards, as a Python float;
    * ``terminated`` / ``truncated``: those of the last executed step;
    * ``info``: a copy of the last executed step's info plus ``info["chunk_steps"]`` (int), the number of
      env steps executed.

    The chunk stops at the first termination or truncation: the remaining actions are discarded, so
    ``chunk_steps < horizon`` only on the step that ends an episode.

    Discounting: from the agent's point of view one chunk is one MDP step, so a PPO/GAE discount
    ``gamma`` applies *per chunk* (``gamma ** k`` for the k-th chunk), not per env step. To match a
    per-env-step discount ``g``, use ``gamma = g ** horizon``. Rewards inside a chunk are not discounted.
    """

    def __init__(self, env: gym.Env[np.ndarray, np.ndarray], horizon: int) -> None:
        # Recording the constructor arguments puts this wrapper into ``env.spec``, so ``gym.make(env.spec)``
        # (used by gymnasium's env checker, and handy to rebuild an env from a run) recreates the stack.
        gym.utils.RecordConstructorArgs.__init__(self, horizon=horizon)
        gym.Wrapper.__init__(self, env)
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"ActionChunk: horizon must be an int >= 1, got {horizon!r}")
        inner = _require_vector_box(env.action_space, "action", env)
        self.horizon = int(horizon)
        self.act_dim = int(inner.shape[0])
        self.action_space = Box(
            low=np.tile(inner.low, (self.horizon, 1)),
            high=np.tile(inner.high, (self.horizon, 1)),
            shape=(self.horizon, self.act_dim),
            dtype=inner.dtype,  # type: ignore[arg-type]
        )

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Run the chunk ``action`` ``[horizon, act_dim]``; see the class docstring for the return values."""
        chunk = np.asarray(action)
        if chunk.shape != (self.horizon, self.act_dim):
            raise ValueError(
                f"ActionChunk.step: expected an action chunk of shape {(self.horizon, self.act_dim)} "
                f"(horizon, act_dim), got {chunk.shape}"
            )
        total = 0.0
        for k in range(self.horizon):
            obs, reward, terminated, truncated, info = self.env.step(chunk[k])
            # Accumulate as Python floats, left to right, so the sum is reproducible and equals a
            # hand-written loop over the same rewards exactly.
            total += float(reward)
            if terminated or truncated:
                break
        info = dict(info)  # never mutate a dict the inner env may keep
        info["chunk_steps"] = k + 1
        return obs, total, bool(terminated), bool(truncated), info


class NormalizedObsAction(
    gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray], gym.utils.RecordConstructorArgs
):
    """Present the env in normalised coordinates (dataset min-max statistics, see :class:`Normalization`).

    * Observations: ``normalization.normalize_obs(raw)`` as float32 ``[obs_dim]``; in ``[-1, 1]`` while
      the env stays inside the dataset's range. They are not clipped (the policy should see how far
      outside the data it is), so the observation space is the inner Box's bounds mapped through the
      same transform (``Box(-inf, inf)`` for the MuJoCo locomotion tasks).
    * Actions: the agent acts in ``Box(-1, 1, (act_dim,), float32)``; actions are mapped with
      ``normalization.denormalize_action`` to the dataset's range and then clipped to the env's true
      action bounds (a dataset range wider than the bounds, or an agent action outside ``[-1, 1]``,
      can never send an invalid command), and cast to the inner action dtype.
    """

    def __init__(self, env: gym.Env[np.ndarray, np.ndarray], normalization: Normalization) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, normalization=normalization)  # see ActionChunk
        gym.Wrapper.__init__(self, env)
        obs_space = _require_vector_box(env.observation_space, "observation", env)
        act_space = _require_vector_box(env.action_space, "action", env)
        if obs_space.shape[0] != normalization.obs_dim or act_space.shape[0] != normalization.act_dim:
            raise ValueError(
                f"normalization statistics are for obs_dim={normalization.obs_dim}, act_dim={normalization.act_dim} "
                f"but {env} has obs_dim={obs_space.shape[0]}, act_dim={act_space.shape[0]}; "
                "use the statistics computed for this task"
            )
        self.normalization = normalization
        self._act_low = act_space.low.astype(np.float64)
        self._act_high = act_space.high.astype(np.float64)
        self._act_dtype = act_space.dtype
        # Mapping the bounds with the same function as the observations (float64, then float32) keeps
        # every mapped observation inside the declared space: both roundings are monotone.
        low = normalization.normalize_obs(obs_space.low.astype(np.float64)).astype(np.float32)
        high = normalization.normalize_obs(obs_space.high.astype(np.float64)).astype(np.float32)
        self.observation_space = Box(low=low, high=high, dtype=np.float32)
        self.action_space = Box(low=-1.0, high=1.0, shape=act_space.shape, dtype=np.float32)

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        return self.normalization.normalize_obs(np.asarray(obs, dtype=np.float64)).astype(np.float32)

    def env_action(self, action: np.ndarray) -> np.ndarray:
        """Normalised agent action ``[act_dim]`` -> the raw, clipped action sent to the inner env."""
        raw = self.normalization.denormalize_action(np.asarray(action, dtype=np.float64))
        return np.clip(raw, self._act_low, self._act_high).astype(self._act_dtype)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        return self._obs(obs), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(self.env_action(action))
        return self._obs(obs), reward, terminated, truncated, info


def wrap_env(
    env: gym.Env[Any, Any], *, horizon: int = 1, normalization: Normalization | None = None
) -> gym.Env[np.ndarray, np.ndarray]:
    """Apply rlflow's standard stack to a raw env (see the module docstring for the order).

    Args:
        env: a gymnasium env with 1-D Box observation and action spaces (e.g. from ``gym.make``; add a
            ``TimeLimit`` before calling this if episodes must be truncated).
        horizon: actions per chunk; ``1`` still gives an action space of shape ``(1, act_dim)``.
        normalization: statistics for :class:`NormalizedObsAction`; ``None`` keeps the raw spaces.

    Returns:
        The wrapped env: observations ``[obs_dim]``, actions ``[horizon, act_dim]``.
    """
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if normalization is not None:
        env = NormalizedObsAction(env, normalization)
    return ActionChunk(env, horizon)
