"""Rollout throughput levers (issue 17, item 5) keep what they promise.

- Sampling a flow chain with the per-chain work done once (``FlowPolicy.chain_velocity``, all K steps'
  Gaussian log-probs in one call) gives the per-step loop's chain and log-probs bit for bit.
- :class:`~rlflow.rollout.SplitVectorEnv` (simulation of one group overlapping the policy's call for the
  next; PPO's ``rollout_overlap``) gives the unsplit batch for an actor whose rows do not depend on each
  other, is reproducible for a stochastic flow policy, keeps every sub-env's reset seed and the true episode
  statistics, and names the sub-env of the whole env in a non-finite error.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from gymnasium.wrappers import TimeLimit  # noqa: E402
from rlflow.envs import make_vector_env  # noqa: E402
from rlflow.envs.wrappers import wrap_env  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.errors import NonFiniteError  # noqa: E402
from rlflow.flows import ReinFlowStep, sample_chain  # noqa: E402
from rlflow.flows.gaussian import gaussian_log_prob  # noqa: E402
from rlflow.policies import FlowPolicy, FlowPolicyConfig  # noqa: E402
from rlflow.policies.actor import ActorOutput  # noqa: E402
from rlflow.rollout import SplitVectorEnv, collect_gym_rollout  # noqa: E402
from rlflow.trainers.ppo import PPOConfig, PPOTrainer  # noqa: E402
from tests.test_ppo import StepCounterEnv, ZeroActor, tiny_flow_config, toy_vector_env  # noqa: E402


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo appends compiler warnings to ./MUJOCO_LOG.TXT; keep that file out of the repository."""
    monkeypatch.chdir(tmp_path)


def hopper_policy(seed: int = 0) -> FlowPolicy:
    torch.manual_seed(seed)
    config = FlowPolicyConfig(obs_dim=11, act_dim=3, horizon=4, hidden_dims=[64, 64, 64], num_steps=4)
    return FlowPolicy(config).eval()


def batches_equal(a, b) -> bool:
    for item in dataclasses.fields(a):
        x, y = getattr(a, item.name), getattr(b, item.name)
        if not (torch.equal(x, y) and x.dtype == y.dtype if isinstance(x, torch.Tensor) else x == y):
            return False
    return True


# ------------------------------------------------------------------------------- chain sampling
@pytest.mark.parametrize("batch", [1, 5, 8, 16])
def test_flow_sampling_equals_the_per_step_loop_bit_for_bit(batch):
    """The reference: one velocity() call (time embedding included) and one Gaussian log-prob per step."""
    policy = hopper_policy()
    obs = torch.randn(batch, 11, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        fast = policy.sample(obs, generator=torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)
        times = policy.grid()
        x = policy._initial_noise(batch, generator)
        chain, log_probs = [x], []
        for k in range(4):
            t, t_next = times[k].expand(batch), times[k + 1].expand(batch)
            velocity = policy.velocity(x, t, obs)
            mean, std = policy.kernel.mean_and_std(x, velocity, t, t_next, obs)
            x = mean + std * torch.randn(x.shape, generator=generator)
            chain.append(x)
            log_probs.append(gaussian_log_prob(x, mean, std))
    assert torch.equal(fast.chain, torch.stack(chain, dim=1))
    assert torch.equal(fast.log_probs, torch.stack(log_probs, dim=1))
    # Re-scoring (the PPO update's path: all steps' rows in one batch) gives the sampled log-probs to float
    # rounding (as before this change: a batch of other rows can round a matrix product differently).
    torch.testing.assert_close(policy.log_prob(fast), fast.log_probs, rtol=0.0, atol=1e-5)


def test_deferred_scoring_with_mixed_ode_and_sde_steps():
    """Steps outside ``stochastic_steps`` are Euler steps with log-prob 0; the others are scored together."""
    policy = hopper_policy()
    obs = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([False, True, False, True])
    with torch.no_grad():
        traj = policy.sample(obs, stochastic_steps=mask, generator=torch.Generator().manual_seed(1))

        class PerStep(ReinFlowStep):  # no batched std: every step scored where it is drawn
            def chain_stds(self, cond, times, batch):
                return None

        slow = sample_chain(
            policy,
            PerStep(policy.noise_std),
            policy._initial_noise(6, g := torch.Generator().manual_seed(1)),
            policy.grid(),
            obs,
            stochastic_steps=mask,
            generator=g,
        )
    assert torch.equal(traj.chain, slow.chain) and torch.equal(traj.log_probs, slow.log_probs)
    assert (traj.log_probs[:, ~mask] == 0).all() and (traj.log_probs[:, mask] != 0).all()


# ------------------------------------------------------------------------------- split vector env
class RowWiseActor:
    """Acts on each observation alone, without noise: its rows do not depend on the batch."""

    def explore(self, obs, *, generator=None):
        scale = torch.tensor([1.0, 0.5, -0.7, 0.2])[None, :, None]
        action = torch.tanh(obs[:, None, :3] * scale)
        return ActorOutput(action=action, record=action, log_prob=action.sum(dim=(1, 2)))


def test_split_env_gives_the_unsplit_batch_on_the_toy_env():
    specs = [(3, 100), (None, 5), (4, 100), (None, 7), (2, 100)]
    reference = collect_gym_rollout(ZeroActor(2), toy_vector_env(specs, horizon=2), 9, seed=4)
    for sizes in ([3, 2], [2, 2, 1], [1] * 5):
        # toy_vector_env numbers its sub-envs from its spec list: each group gets its own slice.
        bounds = np.cumsum([0, *sizes])
        parts = [toy_vector_env(specs[a:b], horizon=2) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        batch = collect_gym_rollout(ZeroActor(2), SplitVectorEnv(parts), 9, seed=4)
        assert batches_equal(batch, reference), sizes


def test_split_env_gives_the_unsplit_batch_on_hopper_in_threads_and_processes():
    make = functools.partial(make_vector_env, "hopper", horizon=4, max_episode_steps=60)

    def make_async(num_envs: int):
        from rlflow.envs import make_env

        factory = functools.partial(make_env, "hopper", horizon=4, max_episode_steps=60)
        return gym.vector.AsyncVectorEnv(
            [factory] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )

    reference = collect_gym_rollout(RowWiseActor(), make(5), 40, seed=11)
    assert len(reference.episode_returns) > 5  # episodes end inside the block (time limit 60 env steps)
    for envs in (SplitVectorEnv.build(make, 5, groups=2), SplitVectorEnv.build(make_async, 5, groups=2)):
        try:
            assert batches_equal(collect_gym_rollout(RowWiseActor(), envs, 40, seed=11), reference)
        finally:
            envs.close()


def test_split_rollout_of_a_flow_policy_is_reproducible_with_the_true_episode_statistics():
    policy = hopper_policy()
    make = functools.partial(make_vector_env, "hopper", horizon=4, max_episode_steps=40)
    split, whole = SplitVectorEnv.build(make, 4, groups=2), make(4)

    def collect(envs):
        return collect_gym_rollout(policy, envs, 30, seed=5, generator=torch.Generator().manual_seed(0))

    first, again, unsplit = collect(split), collect(split), collect(whole)
    assert batches_equal(first, again)  # reproducible bit for bit
    # Same reset seeds: every sub-env starts where it starts in one vector env.
    assert torch.equal(first.observations[0], unsplit.observations[0])
    # The noise is drawn per half, so the decisions differ from the unsplit rollout's ...
    assert not torch.equal(first.records, unsplit.records)
    # ... and the episode statistics are the envs' true ones: each finished episode's return is the sum of
    # its chunks' rewards, its length the env steps it took (10 chunks of 4 under the 40-step limit at most).
    assert first.episode_returns and all(0 < length <= 40 for length in first.episode_lengths)
    rewards, ends = first.rewards.double().numpy(), first.episode_ends.numpy()
    returns, running = [], np.zeros(4)
    for t in range(29):  # not the last step: it is truncated for every env (the block ends there)
        running += rewards[t]
        for env in np.flatnonzero(ends[t]):
            returns.append(running[env])
            running[env] = 0.0
    # ``episode_returns`` lists finished episodes by step, then env: the order of this loop.
    assert returns
    np.testing.assert_allclose(returns, first.episode_returns[: len(returns)], rtol=1e-5)
    split.close()
    whole.close()


def test_a_nan_in_a_later_group_names_the_sub_env_of_the_whole_env():
    class NaNAfter(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, float("nan"), terminated, truncated, info

    def group(broken: bool):
        def factory(index: int):
            env = TimeLimit(StepCounterEnv(None), max_episode_steps=100)
            return lambda: wrap_env(NaNAfter(env) if broken and index == 1 else env, horizon=1)

        return gym.vector.SyncVectorEnv(
            [factory(i) for i in range(2)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )

    envs = SplitVectorEnv([group(False), group(True)])
    with pytest.raises(NonFiniteError, match=r"non-finite reward for env 3 \(of 4\) at rollout step 0"):
        collect_gym_rollout(ZeroActor(1), envs, 5, seed=0)
    envs.close()


# ------------------------------------------------------------------------------------ PPO option
def test_ppo_rollout_overlap_collects_from_the_same_initial_states_and_trains(tmp_path):
    overlapped = PPOTrainer(tiny_flow_config(tmp_path / "a", rollout_overlap=True, num_envs=4))
    plain = PPOTrainer(tiny_flow_config(tmp_path / "b", num_envs=4))
    assert isinstance(overlapped.envs, SplitVectorEnv) and overlapped.envs.num_envs == 4
    assert [group.num_envs for group in overlapped.envs.groups] == [2, 2]
    batch, reference = overlapped.collect(), plain.collect()
    assert batch.observations.shape == reference.observations.shape
    assert torch.equal(batch.observations[0], reference.observations[0])
    summary = PPOTrainer(tiny_flow_config(tmp_path / "c", rollout_overlap=True, num_envs=4)).train()
    assert summary["policy_dir"] == str(tmp_path / "c" / "policy")


def test_ppo_rollout_overlap_needs_two_envs(tmp_path):
    with pytest.raises(ConfigError, match="rollout_overlap .* num_envs >= 2"):
        tiny_flow_config(tmp_path, rollout_overlap=True, num_envs=1)
    assert PPOConfig().rollout_overlap is False  # off by default: it does not pay on one core
