"""Meta-World v3 manipulation tasks (Sawyer arm) as gymnasium ids, with sparse or shaped rewards.

Every Meta-World v3 task ``<name>-v3`` (``button-press-v3``, ``pick-place-v3``, ... the 50 of the
``metaworld`` package) is registered lazily under two gymnasium ids, following gymnasium-robotics' naming
of sparse and dense Fetch tasks (``FetchReach-v4`` / ``FetchReachDense-v4``):

* ``rlflow/<name>-v3``: the **sparse** task. Reward 1 on the step that succeeds (Meta-World's own
  ``info["success"]``) and 0 otherwise; the episode **terminates on success**, or is truncated at the time
  limit. The return of an episode is therefore its success (0 or 1).
* ``rlflow/<name>-dense-v3``: Meta-World's **shaped** reward (``reward_function_version="v2"``, 0 to 10 per
  step); the episode runs to the time limit, as Meta-World's benchmarks do.

Both report ``info["success"]`` (this step) and ``info["is_success"]`` (success at any step of the episode
so far; gymnasium-robotics' and Stable-Baselines3's key), so an evaluation reads the episode's success from
the last step's info. The time limit is :data:`DEFAULT_MAX_EPISODE_STEPS` env steps (``max_episode_steps``
overrides it; Meta-World's own limit of 500 is lifted so that any limit works).

Object and goal positions: **random by default** -- every ``reset`` draws a fresh object / goal placement
from the task's range (``env.np_random``, so ``reset(seed=s)`` makes it reproducible; held-out episodes are
new placements). ``gym.make(id, fixed_goal=True)`` keeps the placement drawn at construction (seeded by
``goal_seed``) for every episode, as Meta-World's single-task ``set_task`` does; that env is then
deterministic, so use it for debugging, not for held-out evaluation.

Observations are Meta-World's 39 values (hand position, gripper opening, two objects' positions and
quaternions, the previous step's 18 values, the goal position); actions are 4 values in ``[-1, 1]`` (hand
displacement xyz, gripper torque). Rendered frames come from the ``corner`` camera family, turned the right
way up (MuJoCo's offscreen buffers of these cameras are upside down).

:func:`scripted_expert` wraps the package's hand-written expert of a task (``metaworld.policies``) for
``rlflow collect --policy scripted`` (which injects Gaussian action noise: ``action_noise_std``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box

from rlflow.config import ConfigError

__all__ = [
    "DEFAULT_MAX_EPISODE_STEPS",
    "MANIPULATION_TASKS",
    "MetaWorldTask",
    "is_manipulation_id",
    "manipulation_gym_id",
    "metaworld_task_names",
    "resolve_manipulation_task",
    "scripted_expert",
    "scripted_expert_for",
]

logger = logging.getLogger(__name__)

#: Time limit in env steps. The scripted experts finish these tasks in 60-150 steps; 200 leaves room for a
#: noisy policy while keeping failed episodes (the common case early in fine-tuning) short.
DEFAULT_MAX_EPISODE_STEPS = 200

#: Short names of the tasks with recipes -> Meta-World name, in rising difficulty: pressing a button (reach
#: and push), opening a drawer (reach a handle, pull along an axis), pick-and-place (grasp, lift, carry to a
#: goal in 3-D), peg insertion (grasp and align a peg with a hole: the tightest tolerance).
MANIPULATION_TASKS: dict[str, str] = {
    "button_press": "button-press-v3",
    "drawer_open": "drawer-open-v3",
    "pick_place": "pick-place-v3",
    "peg_insert_side": "peg-insert-side-v3",
}

_NAMESPACE = "rlflow"
_ID_PATTERN = re.compile(rf"^{_NAMESPACE}/(?P<name>[a-z0-9-]+?)(?P<dense>-dense)?-v3$")
_INSTALL_HINT = 'pip install -e ".[manipulation]" (the metaworld package; it pins mujoco 3.3.0)'


def _import_metaworld() -> Any:
    try:
        import metaworld
        import metaworld.env_dict
    except ImportError as exc:
        raise ImportError(f"Meta-World tasks need the metaworld package: {_INSTALL_HINT}") from exc
    return metaworld


def metaworld_task_names() -> list[str]:
    """The Meta-World v3 task names (``"button-press-v3"``, ...) of the installed package."""
    return sorted(_import_metaworld().env_dict.ALL_V3_ENVIRONMENTS)


def manipulation_gym_id(name: str, *, dense: bool = False) -> str:
    """``"button-press-v3"`` -> ``"rlflow/button-press-v3"`` (``dense``: ``"rlflow/button-press-dense-v3"``)."""
    stem = name[: -len("-v3")] if name.endswith("-v3") else name
    return f"{_NAMESPACE}/{stem}{'-dense' if dense else ''}-v3"


def is_manipulation_id(gym_id: str) -> bool:
    """Whether ``gym_id`` has the form of one of this module's ids (``rlflow/<name>[-dense]-v3``)."""
    return _ID_PATTERN.match(gym_id) is not None


def resolve_manipulation_task(key: str) -> str | None:
    """The registered gymnasium id for a manipulation task name, or ``None`` if ``key`` names none.

    Accepts a short name of :data:`MANIPULATION_TASKS` (``"pick_place"``; ``"pick_place_dense"`` for the shaped
    reward), an id of this module (``"rlflow/pick-place-v3"``, ``"rlflow/pick-place-dense-v3"``) or a Meta-World
    name (``"pick-place-v3"``: the sparse task). A short name or an ``rlflow/`` id without the metaworld package
    raises ImportError with the install command.
    """
    key = key.strip().lower()
    stem, dense = (key[: -len("_dense")], True) if key.endswith("_dense") else (key, False)
    if stem in MANIPULATION_TASKS:
        gym_id = manipulation_gym_id(MANIPULATION_TASKS[stem], dense=dense)
    elif key.startswith(f"{_NAMESPACE}/"):
        gym_id = key
    elif re.fullmatch(r"[a-z0-9-]+-v3", key):
        try:
            _import_metaworld()
        except ImportError:
            return None  # e.g. an old locomotion id ("hopper-v3"): the caller lists the valid names
        gym_id = manipulation_gym_id(key)
    else:
        return None
    return gym_id if register(gym_id) else None


def register(gym_id: str) -> bool:
    """Register ``gym_id`` (``rlflow/<name>[-dense]-v3``) with gymnasium if it names a Meta-World v3 task.

    Returns whether the id is registered afterwards. Imports metaworld (only) to check the name.
    """
    match = _ID_PATTERN.match(gym_id)
    if match is None:
        return False
    if gym_id in gym.registry:
        return True
    name = f"{match['name']}-v3"
    if name not in _import_metaworld().env_dict.ALL_V3_ENVIRONMENTS:
        return False
    gym.register(
        id=gym_id,
        # A string, not the class: Minari datasets record the env spec, and gymnasium serialises only strings.
        entry_point="rlflow.envs.manipulation:MetaWorldTask",
        max_episode_steps=DEFAULT_MAX_EPISODE_STEPS,
        kwargs={"task_name": name, "reward_mode": "shaped" if match["dense"] else "sparse"},
        disable_env_checker=True,  # our spaces are checked by the tests; the checker only adds per-step cost
    )
    return True


class MetaWorldTask(gym.Env[np.ndarray, np.ndarray]):
    """One Meta-World v3 task with rlflow's reward modes, fresh placements per reset, and upright frames.

    Args:
        task_name: Meta-World name, e.g. ``"pick-place-v3"``.
        reward_mode: ``"sparse"`` (1 on success, terminate on success) or ``"shaped"`` (Meta-World's v2 reward,
            no termination).
        fixed_goal: keep one object / goal placement for every episode (module docstring).
        goal_seed: seeds the placement drawn at construction (the only one when ``fixed_goal``).
        render_mode: ``None`` or ``"rgb_array"``.
        camera_name: a Meta-World camera (``corner``, ``corner2``, ``corner3``, ``corner4``, ``topview``,
            ``behindGripper``, ``gripperPOV``); ``corner`` by default, which shows the arm and the table.
        width, height: frame size in pixels.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task_name: str,
        *,
        reward_mode: str = "sparse",
        fixed_goal: bool = False,
        goal_seed: int = 0,
        render_mode: str | None = None,
        camera_name: str = "corner",
        width: int = 320,
        height: int = 240,
    ) -> None:
        if reward_mode not in ("sparse", "shaped"):
            raise ValueError(f"reward_mode must be 'sparse' or 'shaped', got {reward_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        metaworld = _import_metaworld()
        classes = metaworld.env_dict.ALL_V3_ENVIRONMENTS
        if task_name not in classes:
            raise ValueError(
                f"unknown Meta-World task {task_name!r}; choose one of: {', '.join(sorted(classes))}"
            )
        self.task_name = task_name
        self.reward_mode = reward_mode
        self.fixed_goal = bool(fixed_goal)
        self.render_mode = render_mode
        self._camera_name = camera_name
        base = classes[task_name](
            reward_function_version="v2",
            render_mode=render_mode,
            camera_name=camera_name if render_mode is not None else None,
            width=width,
            height=height,
        )
        # What metaworld's own goal-observable classes (env_dict._create_observable_goal_envs) do: show the
        # goal in the observation and draw placements from the env's generator rather than a fixed task.
        base._partially_observable = False
        # A cached property computed in __init__ for the partially observable layout; step() clips
        # observations to it, which would zero the goal.
        base.__dict__.pop("sawyer_observation_space", None)
        base._set_task_called = True
        base._freeze_rand_vec = False
        base.seeded_rand_vec = True
        # The base raises once it has run max_path_length (500) steps; the TimeLimit of gym.make truncates.
        base.max_path_length = np.iinfo(np.int64).max
        base.seed(int(goal_seed))
        base.reset()  # draws the construction-time placement
        base._freeze_rand_vec = self.fixed_goal
        self._base = base
        self.observation_space = Box(
            -np.inf, np.inf, shape=base.sawyer_observation_space.shape, dtype=np.float64
        )
        self.action_space = Box(-1.0, 1.0, shape=base.action_space.shape, dtype=np.float32)
        self._succeeded = False

    @property
    def unwrapped_metaworld(self) -> Any:
        """The ``metaworld`` env inside (its ``SawyerXYZEnv`` API: ``model``, ``data``, ``_target_pos``, ...)."""
        return self._base

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            # SawyerXYZEnv.reset ignores its seed argument; its placements come from base.np_random.
            self._base.seed(int(seed))
        obs, _ = self._base.reset()
        self._succeeded = False
        return obs, {"success": 0.0, "is_success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_space.shape), -1.0, 1.0)
        obs, shaped, _, _, info = self._base.step(action)
        success = bool(info["success"])
        self._succeeded = self._succeeded or success
        info = dict(info, success=float(success), is_success=self._succeeded)
        if self.reward_mode == "sparse":
            return obs, float(success), success, False, info
        return obs, float(shaped), False, False, info

    def render(self) -> np.ndarray | None:
        frame = self._base.render()
        if frame is None:
            return None
        # The corner cameras' offscreen frames come out rotated by 180 degrees.
        return np.ascontiguousarray(frame[::-1, ::-1]) if self._camera_name.startswith("corner") else frame

    def close(self) -> None:
        self._base.close()


def scripted_expert(task_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The package's scripted expert of a Meta-World task (``"pick-place-v3"``), vectorised over envs.

    The returned function maps raw observations ``[k, 39]`` to the expert's actions ``[k, 4]``, clipped to
    ``[-1, 1]`` as the env clips them (the experts' raw actions can be 10x the bounds). ``rlflow collect``
    adds its ``action_noise_std`` after this clip, so the noise acts on what the env executes. The experts are
    written per observation (``policy.get_action(obs)``), so this calls them once per env.
    """
    _import_metaworld()
    import metaworld.policies

    policies = metaworld.policies.ENV_POLICY_MAP
    if task_name not in policies:
        raise ValueError(f"Meta-World has no scripted expert for {task_name!r}")
    expert = policies[task_name]()

    def act(observations: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # Every expert warns that its gains exceed the action bounds; the clip below is the answer.
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            actions = np.stack([expert.get_action(obs) for obs in np.asarray(observations, dtype=np.float64)])
        return np.clip(actions, -1.0, 1.0).astype(np.float32)

    return act


def scripted_expert_for(gym_id: str) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`scripted_expert` of a registered id (``"rlflow/pick-place-v3"``); a ValueError names the tasks
    that have one when ``gym_id`` is not a Meta-World task of this module."""
    match = _ID_PATTERN.match(gym_id)
    if match is None:
        raise ConfigError(
            f"{gym_id} has no scripted expert: policy 'scripted' is for the Meta-World tasks "
            f"({', '.join(MANIPULATION_TASKS)}, or rlflow/<name>-v3); give a saved policy directory instead"
        )
    return scripted_expert(f"{match['name']}-v3")
