"""Train on a learned reward: replace a MuJoCo env's reward with ``r(obs, act)`` of a segment reward model.

:class:`LearnedRewardWrapper` wraps a **raw** env (raw observations and actions, as the segments the model
was trained on: see :mod:`rlflow.data.segment_preferences`) and returns, for the step from ``obs`` with
``action``, ``(r(obs, action) - offset) * scale`` instead of the env's reward. The env's own reward is kept
in ``info["true_reward"]`` (and the learned one in ``info["learned_reward"]``).

Where it plugs in (:func:`make_learned_reward_vector_env`, used by ``rlflow ppo`` with ``learned_reward``)::

    gym.make(task)                 raw MuJoCo env + TimeLimit
    RecordEpisodeStatistics        info["episode"]: the TRUE return (it sits inside the replacement)
    LearnedRewardWrapper           reward <- learned r(raw obs, raw action)
    NormalizedObsAction            the policy's [-1, 1] coordinates
    ActionChunk(horizon)           sums the learned rewards of the chunk's env steps

It sits per sub-env, under the normalisation and chunking wrappers, because only there are the raw
observation and action of *every* env step visible (a chunk of ``horizon`` actions crosses ``horizon``
states the vector level never sees). Batching: in the vector env each sub-env's wrapper only *records*
its raw steps (``defer=True``) and :class:`BatchedLearnedReward` on top scores all sub-envs' steps of a
vector step in one ``torch.no_grad`` forward and sums them per chunk (a per-step call costs ~0.3 ms on
this CPU, about a Hopper env step). Episode statistics (``rollout/episode_return_mean`` in PPO) stay the
true returns. ``info["true_reward"]`` of a chunked env is that of the chunk's last env step only
(ActionChunk passes the last info through).

Normalisation: a reward model fitted to preferences is defined only up to an additive constant and a
scale (Bradley-Terry sees differences of segment sums). ``scale`` and ``offset`` fix them by hand; PPO's
``reward_scaling`` already divides rewards by a running std of the return, so ``scale`` rarely matters there.
The constant does matter in tasks that terminate: after a termination PPO counts nothing (value 0), so a
negative learned step reward teaches the policy to fall early, a positive one to stay alive. Segments cut
with absorbing padding (the default of ``rlflow segment-preferences``) teach the model the absorbing state's
reward ``r_abs``; ``offset = r_abs`` gives the absorbing state reward 0, as in the true MDP, and leaves the
model's preference for staying alive (``r_alive - r_abs``) intact. :func:`absorbing_offset_from_preferences`
computes it from the preference set (PPO: ``learned_reward_offset``). Measured on InvertedPendulum-v5
(learned r_alive = +0.08, r_abs = -0.80; Gaussian PPO, 8 iterations): true return 24 -> 57 without the
offset, 24 -> 76 with it (24 -> 77 on the true reward).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BatchedLearnedReward",
    "LearnedRewardWrapper",
    "absorbing_offset",
    "absorbing_offset_from_preferences",
    "check_reward_model_dims",
    "make_learned_reward_vector_env",
    "reward_model_dims",
]

logger = logging.getLogger(__name__)


def reward_model_dims(model: nn.Module) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` a segment reward model scores (from its config)."""
    config = getattr(model, "config", None)
    if getattr(config, "kind", None) != "segment":
        raise TypeError(
            f"a learned env reward needs a segment reward model (obs, act); got {type(model).__name__} "
            f"of kind {getattr(config, 'kind', None)!r}"
        )
    return int(config.obs_dim), int(config.act_dim)


def check_reward_model_dims(model: nn.Module, obs_dim: int, act_dim: int, *, where: str) -> None:
    """Raise a ValueError naming both shapes when the model was trained for other observation/action sizes."""
    model_obs, model_act = reward_model_dims(model)
    if (model_obs, model_act) != (obs_dim, act_dim):
        raise ValueError(
            f"the learned reward model scores obs_dim={model_obs}, act_dim={model_act} but {where} has "
            f"obs_dim={obs_dim}, act_dim={act_dim}; train the reward model on segments of this task"
        )


def _combine(model: nn.Module, head: str | None, weights: Mapping[str, float] | None) -> Tensor:
    """``[D]`` weights over the model's heads (one definition of head/weights for every learned reward)."""
    from rlflow.reward_models.learned import _head_weights

    return _head_weights(list(model.config.dimensions), head, weights)


class LearnedRewardWrapper(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """Replace the reward of a raw 1-D-Box env with a segment reward model's per-step reward.

    Args:
        env: an env with raw observations ``[obs_dim]`` and actions ``[act_dim]`` (not normalised, not chunked).
        reward_model: a ``SegmentRewardModel`` (``step_rewards(obs, act) -> [..., D]``, ``config.dimensions``).
        head: the head to use (required when the model has several), or ``None`` for a one-head model.
        weights: alternatively ``{dimension: weight}``: the reward is ``sum_d w_d r_d``.
        scale, offset: the returned reward is ``(r - offset) * scale`` (module docstring).
        device: where the model runs.
        defer: only record the raw steps and return reward 0; :class:`BatchedLearnedReward` on the vector
            env scores them in one batch (``make_learned_reward_vector_env`` sets this up).
    """

    def __init__(
        self,
        env: gym.Env[np.ndarray, np.ndarray],
        reward_model: nn.Module,
        *,
        head: str | None = None,
        weights: Mapping[str, float] | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
        device: str | torch.device = "cpu",
        defer: bool = False,
    ) -> None:
        super().__init__(env)
        obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
        if obs_shape is None or act_shape is None or len(obs_shape) != 1 or len(act_shape) != 1:
            raise TypeError(
                f"LearnedRewardWrapper needs raw 1-D observation and action spaces, got {env.observation_space} "
                f"and {env.action_space}; wrap the env before ActionChunk"
            )
        check_reward_model_dims(reward_model, int(obs_shape[0]), int(act_shape[0]), where=str(env))
        if not (np.isfinite(scale) and np.isfinite(offset)):
            raise ValueError(f"scale and offset must be finite, got scale={scale}, offset={offset}")
        self.device = torch.device(device)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        self.head_weights = _combine(reward_model, head, weights).to(self.device)
        self.scale, self.offset = float(scale), float(offset)
        self.defer = bool(defer)
        # Deferred mode: raw (obs, action) of the steps taken since the last take_pending().
        self.pending_obs: list[np.ndarray] = []
        self.pending_act: list[np.ndarray] = []
        self._obs: np.ndarray | None = None

    @torch.no_grad()
    def learned_reward(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """``(r(obs, action) - offset) * scale`` for raw ``obs [..., obs_dim]``, ``action [..., act_dim]``."""
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        a = torch.as_tensor(np.asarray(action), dtype=torch.float32, device=self.device)
        r = self.reward_model.step_rewards(o, a) @ self.head_weights
        return ((r - self.offset) * self.scale).cpu().numpy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs = np.asarray(obs)
        return obs, info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._obs is None:
            raise RuntimeError("LearnedRewardWrapper.step called before reset")
        # The reward belongs to the (state, action) the step started from, as in the training segments.
        # The env clips the action it executes; the segments hold clipped actions, so score the clipped one.
        space = self.env.action_space
        executed = np.clip(np.asarray(action), space.low, space.high)  # type: ignore[attr-defined]
        if self.defer:
            # The vector wrapper scores every sub-env's steps in one batch after the vector step.
            self.pending_obs.append(self._obs)
            self.pending_act.append(executed)
            reward = 0.0
        else:
            reward = float(self.learned_reward(self._obs, executed))
        obs, true_reward, terminated, truncated, info = self.env.step(action)
        self._obs = np.asarray(obs)
        info = dict(info)
        info["true_reward"] = float(true_reward)
        if not self.defer:
            info["learned_reward"] = reward
        return obs, reward, terminated, truncated, info

    def take_pending(self) -> tuple[np.ndarray, np.ndarray]:
        """Deferred mode: the ``(obs [n, obs_dim], act [n, act_dim])`` recorded since the last call."""
        obs_dim, act_dim = reward_model_dims(self.reward_model)
        obs = np.stack(self.pending_obs) if self.pending_obs else np.zeros((0, obs_dim))
        act = np.stack(self.pending_act) if self.pending_act else np.zeros((0, act_dim))
        self.pending_obs, self.pending_act = [], []
        return obs, act


class BatchedLearnedReward(gym.vector.VectorWrapper):
    """Vector-env reward = the learned rewards of each sub-env's env steps, scored in ONE model call per step.

    The sub-envs must contain a :class:`LearnedRewardWrapper` with ``defer=True`` (it records the raw steps
    and returns 0); after each vector step this wrapper scores all recorded steps of all sub-envs together
    and sums them per sub-env, i.e. per action chunk, exactly what the per-step wrapper would give (one tiny
    MLP forward per vector step instead of one per env step; measured ~0.3 ms each on this CPU).
    """

    def __init__(self, env: gym.vector.SyncVectorEnv) -> None:
        super().__init__(env)
        self.envs = env.envs  # the sub-envs, as SyncVectorEnv exposes them
        self.scorers: list[LearnedRewardWrapper] = []
        for sub in env.envs:
            layer = sub
            while not isinstance(layer, LearnedRewardWrapper):
                if not hasattr(layer, "env"):
                    raise TypeError(f"sub-env {sub} has no LearnedRewardWrapper(defer=True) inside")
                layer = layer.env
            if not layer.defer:
                raise TypeError(
                    "BatchedLearnedReward needs LearnedRewardWrapper(defer=True) in every sub-env"
                )
            self.scorers.append(layer)

    def reset(self, **kwargs: Any) -> Any:
        for scorer in self.scorers:
            scorer.take_pending()  # drop steps of an interrupted block
        return self.env.reset(**kwargs)

    def step(self, actions: Any) -> Any:
        obs, _, terminations, truncations, infos = self.env.step(actions)
        pending = [scorer.take_pending() for scorer in self.scorers]
        counts = np.array([p[0].shape[0] for p in pending])
        scorer = self.scorers[0]
        rewards = np.zeros(len(pending), dtype=np.float64)
        if counts.sum() > 0:
            step_rewards = scorer.learned_reward(
                np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending])
            ).astype(np.float64)
            owner = np.repeat(np.arange(len(pending)), counts)
            np.add.at(rewards, owner, step_rewards)  # plain sum per sub-env (per chunk), like ActionChunk
        return obs, rewards, terminations, truncations, infos


@torch.no_grad()
def absorbing_offset(
    reward_model: nn.Module,
    final_observations: np.ndarray,
    *,
    head: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> float:
    """Mean learned reward of absorbing steps (final observation, zero action): the ``offset`` that gives
    the absorbing state reward 0, as the true reward does after a termination."""
    obs = torch.as_tensor(np.asarray(final_observations), dtype=torch.float32)
    act = torch.zeros(*obs.shape[:-1], reward_model_dims(reward_model)[1])
    return float((reward_model.step_rewards(obs, act) @ _combine(reward_model, head, weights)).mean())


@torch.no_grad()
def absorbing_offset_from_preferences(
    reward_model: nn.Module | str | Path,
    preferences: Any,
    *,
    head: str | None = None,
    weights: Mapping[str, float] | None = None,
) -> float:
    """Mean learned reward of the absorbing (padded) steps of a segment preference set: the ``offset``
    (``rlflow ppo``'s ``learned_reward_offset``) that makes the state after a termination worth 0.

    Args:
        reward_model: a segment reward model or its directory.
        preferences: a segment :class:`~rlflow.data.preferences.PreferenceSet` or its directory, cut with
            ``absorbing: true`` (padded steps have an all-zero action).

    Raises:
        ValueError: the set has no absorbing steps (no segment ran past a termination).
    """
    from rlflow.reward_models.learned import load_reward_model

    from rlflow.data.preferences import load_preferences

    model = load_reward_model(reward_model) if isinstance(reward_model, (str, Path)) else reward_model
    pairs = load_preferences(preferences) if isinstance(preferences, (str, Path)) else preferences
    obs_dim, _ = reward_model_dims(model)
    steps = torch.cat([pairs.a, pairs.b])  # [2N, L, obs_dim + act_dim]
    obs, act = steps[..., :obs_dim], steps[..., obs_dim:]
    padded = (act == 0).all(dim=-1)  # real actions are (almost surely) never exactly all zero
    if not bool(padded.any()):
        raise ValueError(
            "the preference set has no absorbing steps (no segment runs past a termination); cut segments with "
            "absorbing: true from a task that terminates, or keep learned_reward_offset at 0"
        )
    return absorbing_offset(model, obs[padded].numpy(), head=head, weights=weights)


def make_learned_reward_vector_env(
    task: str,
    num_envs: int,
    reward_model: nn.Module,
    *,
    head: str | None = None,
    weights: Mapping[str, float] | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
    horizon: int = 1,
    normalization: Any = None,
    max_episode_steps: int | None = None,
    seed: int | None = None,
    batched: bool = True,
) -> Any:
    """Like :func:`rlflow.envs.tasks.make_vector_env`, with the learned reward inserted (module docstring).

    ``batched`` (default): the sub-envs record their raw steps and :class:`BatchedLearnedReward` scores all
    of them in one model call per vector step; ``False``: each sub-env calls the model on every env step.
    Both give the same rewards (tested).
    """
    from .tasks import env_dims, resolve_task
    from .wrappers import ActionChunk, NormalizedObsAction

    gym_id = resolve_task(task)
    check_reward_model_dims(reward_model, *env_dims(gym_id), where=f"task {task!r} ({gym_id})")

    def factory() -> gym.Env[np.ndarray, np.ndarray]:
        env: gym.Env[np.ndarray, np.ndarray] = gym.make(gym_id, max_episode_steps=max_episode_steps)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = LearnedRewardWrapper(
            env, reward_model, head=head, weights=weights, scale=scale, offset=offset, defer=batched
        )
        if normalization is not None:
            env = NormalizedObsAction(env, normalization)
        return ActionChunk(env, horizon)

    sync = gym.vector.SyncVectorEnv(
        [factory for _ in range(int(num_envs))], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    envs: Any = BatchedLearnedReward(sync) if batched else sync
    if seed is not None:
        envs.reset(seed=seed)
        envs.action_space.seed(seed)
        for i, sub in enumerate(sync.envs):
            sub.action_space.seed(seed + i)
    return envs
