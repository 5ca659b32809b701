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

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    # ... and success (1.0 / 0.0) where the env reports ``info["is_success"]`` (manipulation tasks), else empty
    episode_successes: list[float] = field(default_factory=list)

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


def _episode_successes(final_info: dict[str, Any], done: np.ndarray) -> np.ndarray:
    """1.0 / 0.0 per finished sub-env in ``done`` whose env reports ``is_success`` (the success at any step of
    the episode: :mod:`rlflow.envs.manipulation`, gymnasium-robotics); empty where it reports none."""
    if "is_success" not in final_info:
        return np.zeros(0)
    reported = done & np.asarray(final_info.get("_is_success", done), dtype=bool)
    return np.asarray(final_info["is_success"], dtype=np.float64)[reported]


@dataclass
class EvaluationEpisodes:
    """One finished episode per sub-env: true returns, lengths (env steps) and, where the env reports
    ``info["is_success"]``, successes (1.0 / 0.0; ``None`` for envs without a success flag)."""

    returns: list[float]
    lengths: list[int]
    successes: list[float] | None = None

    @property
    def success_rate(self) -> float | None:
        return None if self.successes is None else float(np.mean(self.successes))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}return_mean`` / ``return_std`` / ``length_mean`` and, with successes, ``success_rate`` with
        its 95% Wilson interval ``success_ci95_low`` / ``success_ci95_high``."""
        from rlflow.utils.stats import wilson_interval

        metrics = {
            f"{prefix}return_mean": float(np.mean(self.returns)),
            f"{prefix}return_std": float(np.std(self.returns)),
            f"{prefix}length_mean": float(np.mean(self.lengths)),
        }
        if self.successes is not None:
            low, high = wilson_interval(int(round(sum(self.successes))), len(self.successes))
            metrics[f"{prefix}success_rate"] = float(np.mean(self.successes))
            metrics[f"{prefix}success_ci95_low"], metrics[f"{prefix}success_ci95_high"] = low, high
        return metrics


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
    first_env: int = 0,
    num_envs: int | None = None,
) -> None:
    """Stop at once (:class:`~rlflow.errors.NonFiniteError`) when a step of a vector env is not finite.

    ``actions`` ``[N, ...]`` are what the policy sent (a NaN action means the policy, not the env, is
    broken), ``observations`` ``[N, obs_dim]`` and ``rewards`` ``[N]`` what the env returned. The message
    names the sub-env index, the step and the value, so a NaN never reaches an update, the advantages or
    a checkpoint. For one group of a :class:`SplitVectorEnv`, ``first_env`` (its first sub-env's index)
    and ``num_envs`` (of the whole) make the message name the index in the whole env.
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
            total = len(values) if num_envs is None else num_envs
            raise NonFiniteError(
                f"{what} for env {first_env + env} (of {total}) at {where} step {step}: {shown}. Likely cause: {cause}. "
                "The run stopped before this step was used."
            )


class SplitVectorEnv:
    """One rollout's sub-envs as consecutive groups of vector envs, so that simulation overlaps inference.

    :func:`collect_gym_rollout` samples the policy's actions for group ``g + 1`` while group ``g`` steps:
    in one background thread for in-process vector envs (``SyncVectorEnv``: MuJoCo's step and torch's
    kernels release the GIL, so the simulation and the network run at once on two free cores, less the
    Python both run under the GIL), or through ``step_async`` / ``step_wait`` for vector envs that have
    them (gymnasium's ``AsyncVectorEnv``: worker processes). On a single core nothing overlaps.

    The episodes are those of one vector env of all the sub-envs: a reset with ``seed`` resets group ``g``
    with ``seed + offsets[g]``, so sub-env ``i`` starts from ``seed + i`` as in one vector env, and a
    rollout lays the groups side by side in env order (``[T, N, ...]``), episodes listed by step, then
    env. A policy that draws noise draws it per group (group 0's rows, then group 1's, ...), so a
    stochastic rollout is not the unsplit one's bit for bit (the same distribution); it is reproducible
    bit for bit from the same seed and generator. A policy that acts on each observation alone without
    noise (or any actor whose output rows do not depend on the other rows) gives the unsplit batch.
    """

    def __init__(self, groups: list[Any]):
        if not groups:
            raise ValueError("SplitVectorEnv needs at least one group of environments")
        self.groups = list(groups)
        sizes = [int(group.num_envs) for group in self.groups]
        self.offsets = [sum(sizes[:g]) for g in range(len(sizes))]
        self.num_envs = sum(sizes)

    @classmethod
    def build(cls, make: Callable[[int], Any], num_envs: int, groups: int = 2) -> SplitVectorEnv:
        """``groups`` vector envs ``make(n)`` of nearly equal sizes ``n`` (the first ones one larger)."""
        if not 1 <= groups <= num_envs:
            raise ValueError(f"cannot split {num_envs} environments into {groups} non-empty groups")
        base, extra = divmod(num_envs, groups)
        return cls([make(base + (g < extra)) for g in range(groups)])

    def close(self) -> None:
        for group in self.groups:
            group.close()


@dataclass
class _Step:
    """One group's decision whose env step is under way (or done, for a step run inline)."""

    group: int
    t: int
    obs: Tensor
    out: Any  # ActorOutput
    result: Callable[[], Any] = lambda: None  # waits for envs.step(...)'s return value


class _Stepper:
    """Starts env steps: inline for one group; otherwise through ``step_async`` where the vector env has it,
    else in one background thread (steps then run one at a time, in the order started)."""

    def __init__(self, groups: list[Any]):
        self.groups = groups
        self.thread = ThreadPoolExecutor(max_workers=1) if len(groups) > 1 else None
        self.pending: deque[_Step] = deque()

    def start(self, step: _Step, actions: np.ndarray) -> None:
        group = self.groups[step.group]
        if self.thread is None:
            value = group.step(actions)
            step.result = lambda: value
        elif hasattr(group, "step_async"):  # AsyncVectorEnv (a VectorWrapper has none: it takes the thread)
            group.step_async(actions)
            step.result = group.step_wait
        else:
            step.result = self.thread.submit(group.step, actions).result
        self.pending.append(step)

    def close(self) -> None:
        """After an error: let the steps under way end (their results are dropped), stop the thread."""
        while self.pending:
            try:
                self.pending.popleft().result()
            except Exception:  # noqa: BLE001 - the error that stopped the rollout is the one to report
                pass
        if self.thread is not None:
            self.thread.shutdown(wait=True)


class _Recorder:
    """What a rollout keeps: per group, a list over time of each field; the env steps and episodes."""

    FIELDS = ("observations", "records", "actions", "log_probs", "rewards", "terminated", "truncated", "next")

    def __init__(self, num_groups: int, offsets: list[int], num_envs: int, num_steps: int):
        self.lists = [{name: [] for name in self.FIELDS} for _ in range(num_groups)]
        self.offsets, self.num_envs, self.num_steps = offsets, num_envs, num_steps
        self.env_steps = 0
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.episode_successes: list[float] = []

    def record(self, step: _Step, result: Any) -> np.ndarray:
        """Check and keep a finished step; returns the observations the group's next decision starts from."""
        next_obs_np, reward, term, trunc, infos = result
        t, first_env = step.t, self.offsets[step.group]
        term, trunc = np.asarray(term, dtype=bool), np.asarray(trunc, dtype=bool)
        if t == self.num_steps - 1:
            trunc = trunc | ~term  # the block ends here: bootstrap like a time limit
        true_next = np.array(next_obs_np, dtype=np.float32, copy=True)
        ended = np.asarray(infos["_final_obs"], dtype=bool) if "_final_obs" in infos else None
        if ended is not None and ended.any():
            true_next[ended] = np.stack(infos["final_obs"][ended]).astype(np.float32)
        # true_next holds the final observation of an ended episode; next_obs_np its reset observation.
        where = {"first_env": first_env, "num_envs": self.num_envs}
        check_env_step(t, observations=true_next, rewards=np.asarray(reward, dtype=np.float64), **where)
        if ended is not None:
            check_env_step(t, observations=next_obs_np, where="rollout (reset observation)", **where)
        self.env_steps += int(_per_env(infos, "chunk_steps", len(term), default=1.0).sum())
        final = infos.get("final_info")
        if isinstance(final, dict) and "episode" in final:
            done = np.asarray(final["_episode"], dtype=bool)
            self.episode_returns += np.asarray(final["episode"]["r"], dtype=np.float64)[done].tolist()
            self.episode_lengths += np.asarray(final["episode"]["l"], dtype=np.int64)[done].tolist()
            self.episode_successes += _episode_successes(final, done).tolist()
        lists = self.lists[step.group]
        lists["observations"].append(step.obs)
        lists["records"].append(step.out.record.cpu())
        lists["actions"].append(step.out.action.cpu())
        lists["log_probs"].append(step.out.log_prob.cpu())
        lists["rewards"].append(torch.as_tensor(reward, dtype=torch.float32))
        lists["terminated"].append(torch.as_tensor(term))
        lists["truncated"].append(torch.as_tensor(trunc))
        lists["next"].append(torch.as_tensor(true_next))
        return next_obs_np

    def field(self, name: str) -> Tensor:
        """``[T, N, ...]``: the groups' ``[T, N_g, ...]`` side by side (a normal tensor, even where the
        actor's outputs were made under ``torch.inference_mode``)."""
        stacked = [torch.stack(lists[name]) for lists in self.lists]
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)


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
    """Run ``num_steps`` decisions in every sub-env of ``envs``: a SAME_STEP vector env (``SyncVectorEnv``),
    or a :class:`SplitVectorEnv` of them, whose groups step while the policy acts for the next group.

    The policy is called under ``torch.inference_mode`` (its outputs are copied into the batch, which
    holds normal tensors that PPO's update may use).
    """
    groups, offsets = (envs.groups, envs.offsets) if isinstance(envs, SplitVectorEnv) else ([envs], [0])
    num_envs = envs.num_envs
    recorder = _Recorder(len(groups), offsets, num_envs, num_steps)
    obs_np = []
    for group, first_env in zip(groups, offsets, strict=True):
        reset_obs, _ = group.reset(seed=seed + first_env)
        check_env_step(
            0,
            observations=reset_obs,
            where="rollout (reset observation)",
            first_env=first_env,
            num_envs=num_envs,
        )
        obs_np.append(reset_obs)
    stepper = _Stepper(groups)
    try:
        for t in range(num_steps):
            for g in range(len(groups)):
                # Group g's last step must have ended (with several groups it ended while the policy
                # acted for the other groups); steps end in the order they started.
                while any(step.group == g for step in stepper.pending):
                    done = stepper.pending.popleft()
                    obs_np[done.group] = recorder.record(done, done.result())
                obs = torch.as_tensor(obs_np[g], dtype=torch.float32)
                with torch.inference_mode():
                    out = actor.explore(obs.to(device), generator=generator)
                action_np = out.action.cpu().numpy()
                check_env_step(t, actions=action_np, first_env=offsets[g], num_envs=num_envs)
                stepper.start(_Step(group=g, t=t, obs=obs, out=out), action_np)
        while stepper.pending:
            done = stepper.pending.popleft()
            recorder.record(done, done.result())
    finally:
        stepper.close()

    return GymRolloutBatch(
        observations=recorder.field("observations"),
        records=recorder.field("records"),
        actions=recorder.field("actions"),
        log_probs=recorder.field("log_probs"),
        rewards=recorder.field("rewards"),
        terminated=recorder.field("terminated"),
        truncated=recorder.field("truncated"),
        next_observations=recorder.field("next"),
        env_steps=recorder.env_steps,
        episode_returns=recorder.episode_returns,
        episode_lengths=recorder.episode_lengths,
        episode_successes=recorder.episode_successes,
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
) -> EvaluationEpisodes:
    """Run exactly one episode in each sub-env; returns their true returns, lengths (env steps) and successes."""
    num_envs = envs.num_envs
    obs_np, _ = envs.reset(seed=seed)
    returns = np.full(num_envs, np.nan)
    lengths = np.zeros(num_envs, dtype=np.int64)
    successes = np.full(num_envs, np.nan)
    for step in range(max_decisions):
        obs = torch.as_tensor(obs_np, dtype=torch.float32).to(device)
        with torch.inference_mode():
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
            if "is_success" in final:
                successes[done] = np.asarray(final["is_success"], dtype=np.float64)[done]
        if not np.isnan(returns).any():
            reported = not np.isnan(successes).any()
            return EvaluationEpisodes(returns.tolist(), lengths.tolist(), successes.tolist() if reported else None)
    raise RuntimeError(f"evaluation did not finish {num_envs} episodes within {max_decisions} decisions")
