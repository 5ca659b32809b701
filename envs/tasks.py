"""The MuJoCo tasks (locomotion here, Meta-World manipulation in :mod:`.manipulation`) and factories for single and vectorised, wrapped environments.

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

__all__ = [
    "TASKS",
    "TRACKING_CAMERAS",
    "env_dims",
    "make_env",
    "make_raw_env",
    "make_vector_env",
    "resolve_task",
    "use_tracking_camera",
]

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
    from .manipulation import MANIPULATION_TASKS, resolve_manipulation_task

    manipulation_id = resolve_manipulation_task(key)
    if manipulation_id is not None:
        return manipulation_id
    choices = ", ".join(f"{name} ({gym_id})" for name, gym_id in TASKS.items())
    manipulation = ", ".join(MANIPULATION_TASKS)
    raise ConfigError(
        f"unknown task {task!r}; choose one of: {choices}; or a Meta-World manipulation task: {manipulation} "
        "(sparse reward; add _dense for the shaped one), or any Meta-World v3 name as rlflow/<name>-v3 / "
        "rlflow/<name>-dense-v3 (the [manipulation] extra)"
    )


#: Camera of rendered frames per task (besides the tracked body): distance and elevation as gymnasium's
#: own ``DEFAULT_CAMERA_CONFIG`` of each env where it sets them; azimuth 90 looks at the robot from its side
#: (forward = right). Tasks without an entry keep gymnasium's camera.
TRACKING_CAMERAS: dict[str, dict[str, float]] = {
    "Hopper-v5": {"distance": 3.0, "elevation": -20.0, "azimuth": 90.0},
    "Walker2d-v5": {"distance": 4.0, "elevation": -20.0, "azimuth": 90.0},
    "HalfCheetah-v5": {"distance": 4.0, "elevation": -20.0, "azimuth": 90.0},
    "Ant-v5": {"distance": 5.0, "elevation": -30.0, "azimuth": 90.0},
    "Humanoid-v5": {"distance": 4.0, "elevation": -20.0, "azimuth": 90.0},
}

#: ``gym.make`` keywords that choose a camera themselves; :func:`make_raw_env` then leaves the camera alone.
_CAMERA_KWARGS = ("camera_id", "camera_name", "default_camera_config")


def use_tracking_camera(env: gym.Env[Any, Any], body: str = "torso", **camera: float) -> bool:
    """Make ``env``'s rendered frames follow ``body`` (a MuJoCo ``mjCAMERA_TRACKING`` camera).

    gymnasium (1.x) renders ``rgb_array`` frames with a *free* camera whose look-at point stays where the
    robot started, even where its ``default_camera_config`` names a ``trackbodyid``: the renderer resets the
    camera type to free before every frame (``camera_id=-1``). Here the renderer's camera config gets
    ``type=mjCAMERA_TRACKING`` and ``trackbodyid`` = ``body``'s id, and its ``camera_id`` becomes ``None``
    so the type is kept; MuJoCo then moves the look-at point to the body's subtree centre of mass every
    frame (the whole robot for the root body ``torso``). ``camera`` overrides further ``mjvCamera`` fields
    (``distance``, ``elevation``, ``azimuth``). Call before the first ``render()`` (or after: the live
    camera is updated too).

    Returns:
        whether the camera was set: ``False`` for an env that is not a gymnasium MuJoCo env or has no such
        body (it then renders as before).
    """
    base = env.unwrapped
    renderer = getattr(base, "mujoco_renderer", None)
    model = getattr(base, "model", None)
    if renderer is None or model is None:
        return False
    import mujoco

    body_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, body)
    if body_id < 0:
        return False
    config: dict[str, Any] = dict(renderer.default_cam_config or {})
    config.pop("lookat", None)  # the tracked body sets it
    config.update(camera)
    config["type"] = int(mujoco.mjtCamera.mjCAMERA_TRACKING)
    config["trackbodyid"] = body_id
    renderer.default_cam_config = config
    renderer.camera_id = None  # -1 would make the offscreen viewer reset the camera to free every frame
    for viewer in getattr(renderer, "_viewers", {}).values():  # a viewer that exists already
        for key, value in config.items():
            setattr(viewer.cam, key, value)
    return True


def make_raw_env(
    task: str,
    *,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
    track_robot: bool = True,
    **make_kwargs: Any,
) -> gym.Env[np.ndarray, np.ndarray]:
    """``gym.make`` of a task without rlflow's wrappers; rendered frames follow the robot.

    With a ``render_mode`` other than ``"human"``, ``track_robot`` and no camera keyword of its own
    (``camera_id``, ``camera_name``, ``default_camera_config``), the camera tracks the robot's torso
    (:func:`use_tracking_camera`, settings :data:`TRACKING_CAMERAS`), so a robot that walks away stays in
    the frame.
    """
    gym_id = resolve_task(task)
    env = gym.make(gym_id, render_mode=render_mode, max_episode_steps=max_episode_steps, **make_kwargs)
    if (
        track_robot
        and render_mode not in (None, "human")
        and gym_id in TRACKING_CAMERAS
        and not any(key in make_kwargs for key in _CAMERA_KWARGS)
    ):
        use_tracking_camera(env, **TRACKING_CAMERAS[gym_id])
    return env


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
        render_mode: passed to ``gym.make`` (``"rgb_array"`` for videos; the camera then follows the robot,
            see :func:`make_raw_env`).
        max_episode_steps: episode limit in **env steps** (not chunks); ``None`` keeps the task's
            default (1000 for these tasks).
        **make_kwargs: further keyword arguments for ``gym.make`` (e.g. ``width``, ``height``,
            ``terminate_when_unhealthy``).

    Returns:
        The env; observations ``[obs_dim]``, actions ``[horizon, act_dim]``.
    """
    env = make_raw_env(task, render_mode=render_mode, max_episode_steps=max_episode_steps, **make_kwargs)
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
