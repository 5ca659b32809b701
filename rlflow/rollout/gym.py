"""Rollouts in gymnasium vector environments (MuJoCo), for any :class:`~rlflow.policies.actor.Actor`.

The vector env must use gymnasium's ``AutoresetMode.SAME_STEP`` (``rlflow.envs.make_vector_env`` does):
when a sub-env's episode ends, the same ``step`` returns its reset observation, and the TRUE final
observation sits in ``infos["final_obs"]`` (mask ``infos["_final_obs"]``) with the final step's info in
``infos["final_info"]``. We keep that final observation so a truncated episode bootstraps from where it
really ended, and we keep terminations and truncations apart.

Every collection starts from ``envs.reset(seed=...)`` and the last step of the block is recorded as a
truncation (its true next state is bootstrapped, as for a time limit). No environment state crosses a
rollout block, which makes a resumed run replay exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlflow.errors import NonFiniteError
from rlflow.policies.actor import Actor


@dataclass
class GymRolloutBatch:
    """``T`` decisions of ``N`` environments (one decision = one executed action chunk)."""

    observations: Tensor  # [T, N, obs_dim]  what the actor saw
    records: Tensor  # [T, N, ...]  what the actor re-scores (flow chain or Gaussian action)
    actions: Tensor  # [T, N, horizon, act_dim]  the chunk sent to the env
    log_probs: Tensor  # [T, N]  log-density at collection time (sum over stochastic elements)
    rewards: Tensor  # [T, N]  sum of the env rewards inside the chunk
    terminated: Tensor  # [T, N] bool  the MDP ended (no bootstrap)
    truncated: Tensor  # [T, N] bool  cut by a time limit or the end of the block (bootstrap)
    next_observations: Tensor  # [T, N, obs_dim]  the TRUE next state of each decision
    env_steps: int  # raw simulator steps taken (chunks can end early)
    episode_returns: list[float] = field(default_factory=list)  # finished episodes: true return
    episode_lengths: list[int] = field(default_factory=list)  # ... and length in env steps

    @property
    def episode_ends(self) -> Tensor:
        return self.terminated | self.truncated

    def flat(self, name: str) -> Tensor:
        """A ``[T, N, ...]`` field flattened to ``[T * N, ...]`` (for minibatching)."""
        value = getattr(self, name)
        return value.reshape(-1, *value.shape[2:])


def _per_env(infos: dict[str, Any], key: str, num_envs: int, default: float) -> np.ndarray:
    """An info value per sub-env, taking finished envs' values from ``final_info`` (SAME_STEP layout)."""
    out = np.full(num_envs, default, dtype=np.float64)
    if key in infos:
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        out[mask] = np.asarray(infos[key], dtype=np.float64)[mask]
    final = infos.get("final_info")
    if isinstance(final, dict) and key in final:
        mask = final.get(f"_{key}", np.zeros(num_envs, dtype=bool))
        out[mask] = np.asarray(final[key], dtype=np.float64)[mask]
    return out


def _first_bad_env(values: np.ndarray) -> int | None:
    """The index of the first sub-env whose row of ``values`` (``[N, ...]``) holds a NaN/inf, else None.

    One vectorised ``isfinite`` over the whole batch per step; the index is searched only on failure.
    """
    finite = np.isfinite(values)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))[0])


def check_env_step(
    step: int,
    *,
    actions: np.ndarray | None = None,
    observations: np.ndarray | None = None,
    rewards: np.ndarray | None = None,
    where: str = "rollout",
) -> None:
    """Stop at once (:class:`~rlflow.errors.NonFiniteError`) when a step of a vector env is not finite.

    ``actions`` ``[N, ...]`` are what the policy sent (a NaN action means the policy, not the env, is
    broken), ``observations`` ``[N, obs_dim]`` and ``rewards`` ``[N]`` what the env returned. The message
    names the sub-env index, the step and the value, so a NaN never reaches an update, the advantages or
    a checkpoint.
    """
    checks = (
        (
            actions,
            "the policy produced a non-finite action",
            "its weights or the observation normalisation hold NaN/inf (a diverged update: lower the learning "
            "rate, set max_grad_norm), not the environment",
        ),
        (
            observations,
            "the environment returned a non-finite observation",
            "the simulation diverged or a wrapper (normalisation, learned reward) divided by zero; check the "
            "task and its wrappers",
        ),
        (
            rewards,
            "the environment returned a non-finite reward",
            "the task's reward or a wrapper (learned reward, reward scaling) produced NaN/inf; check the task "
            "and its wrappers",
        ),
    )
    for values, what, cause in checks:
        if values is None:
            continue
        values = np.asarray(values)
        env = _first_bad_env(values)
        if env is not None:
            shown = np.array2string(values[env].reshape(-1)[:8], precision=4, threshold=8)
            raise NonFiniteError(
                f"{what} for env {env} (of {len(values)}) at {where} step {step}: {shown}. Likely cause: {cause}. "
                "The run stopped before this step was used."
            )


@torch.no_grad()
def collect_gym_rollout(
    actor: Actor,
    envs: Any,
    num_steps: int,
    *,
    seed: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> GymRolloutBatch:
    """Run ``num_steps`` decisions in every sub-env of ``envs`` (a SAME_STEP ``SyncVectorEnv``)."""
    num_envs = envs.num_envs
    obs_np, _ = envs.reset(seed=seed)
    observations, records, actions, log_probs, rewards = [], [], [], [], []
    terminated, truncated, next_observations = [], [], []
    episode_returns: list[float] = []
    episode_lengths: list[int] = []
    env_steps = 0
    for t in range(num_steps):
        if t == 0:
            check_env_step(t, observations=obs_np, where="rollout (reset observation)")
        obs = torch.as_tensor(obs_np, dtype=torch.float32)
        out = actor.explore(obs.to(device), generator=generator)
        action_np = out.action.cpu().numpy()
        check_env_step(t, actions=action_np)
        next_obs_np, reward, term, trunc, infos = envs.step(action_np)
        term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
        if t == num_steps - 1:
            trunc = trunc | ~term  # the block ends here: bootstrap like a time limit
        true_next = np.array(next_obs_np, dtype=np.float32, copy=True)
        if "_final_obs" in infos:
            ended = np.asarray(infos["_final_obs"], dtype=bool)
            if ended.any():
                true_next[ended] = np.stack(infos["final_obs"][ended]).astype(np.float32)
        # true_next holds the final observation of an ended episode; next_obs_np its reset observation.
        check_env_step(t, observations=true_next, rewards=np.asarray(reward, dtype=np.float64))
        if "_final_obs" in infos:
            check_env_step(t, observations=next_obs_np, where="rollout (reset observation)")
        env_steps += int(_per_env(infos, "chunk_steps", num_envs, default=1.0).sum())
        final = infos.get("final_info")
        if isinstance(final, dict) and "episode" in final:
            done = np.asarray(final["_episode"], dtype=bool)
            episode_returns += np.asarray(final["episode"]["r"], dtype=np.float64)[done].tolist()
            episode_lengths += np.asarray(final["episode"]["l"], dtype=np.int64)[done].tolist()

        observations.append(obs)
        records.append(out.record.cpu())
        actions.append(out.action.cpu())
        log_probs.append(out.log_prob.cpu())
        rewards.append(torch.as_tensor(reward, dtype=torch.float32))
        terminated.append(torch.as_tensor(term))
        truncated.append(torch.as_tensor(trunc))
        next_observations.append(torch.as_tensor(true_next))
        obs_np = next_obs_np

    rewards_t = torch.stack(rewards)
    return GymRolloutBatch(
        observations=torch.stack(observations),
        records=torch.stack(records),
        actions=torch.stack(actions),
        log_probs=torch.stack(log_probs),
        rewards=rewards_t,
        terminated=torch.stack(terminated),
        truncated=torch.stack(truncated),
        next_observations=torch.stack(next_observations),
        env_steps=env_steps,
        episode_returns=episode_returns,
        episode_lengths=episode_lengths,
    )


@torch.no_grad()
def evaluate_episodes(
    actor: Actor,
    envs: Any,
    *,
    seed: int,
    deterministic: bool,
    max_decisions: int = 100_000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[list[float], list[int]]:
    """Run exactly one episode in each sub-env; returns their true returns and lengths (env steps)."""
    num_envs = envs.num_envs
    obs_np, _ = envs.reset(seed=seed)
    returns = np.full(num_envs, np.nan)
    lengths = np.zeros(num_envs, dtype=np.int64)
    for step in range(max_decisions):
        obs = torch.as_tensor(obs_np, dtype=torch.float32).to(device)
        if deterministic:
            action = actor.deterministic_action(obs, generator=generator)
        else:
            action = actor.explore(obs, generator=generator).action
        action_np = action.cpu().numpy()
        check_env_step(step, actions=action_np, where="evaluation")
        obs_np, reward, _, _, infos = envs.step(action_np)
        # A NaN reward would make the episode's return NaN, which reads as "not finished" below.
        check_env_step(
            step, observations=obs_np, rewards=np.asarray(reward, dtype=np.float64), where="evaluation"
        )
        final = infos.get("final_info")
        if isinstance(final, dict) and "episode" in final:
            done = np.asarray(final["_episode"], dtype=bool) & np.isnan(returns)
            returns[done] = np.asarray(final["episode"]["r"], dtype=np.float64)[done]
            lengths[done] = np.asarray(final["episode"]["l"], dtype=np.int64)[done]
        if not np.isnan(returns).any():
            return returns.tolist(), lengths.tolist()
    raise RuntimeError(f"evaluation did not finish {num_envs} episodes within {max_decisions} decisions")
