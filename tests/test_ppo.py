"""``rlflow ppo`` and its rollout engine: learning, ReinFlow smoke run, the first-ratio check, exact resume,
config errors, and ``collect_gym_rollout`` / ``evaluate_episodes`` on a hand-checkable toy env."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from gymnasium.spaces import Box  # noqa: E402
from gymnasium.wrappers import TimeLimit  # noqa: E402
from rlflow.envs.normalization import Normalization  # noqa: E402
from rlflow.envs.wrappers import wrap_env  # noqa: E402

from rlflow.config import ConfigError, config_from_dict, load_yaml  # noqa: E402
from rlflow.policies import FlowPolicy, FlowPolicyConfig  # noqa: E402
from rlflow.policies.actor import ActorOutput  # noqa: E402
from rlflow.policies.gaussian import GaussianPolicy, GaussianPolicyConfig  # noqa: E402
from rlflow.rollout import collect_gym_rollout, evaluate_episodes  # noqa: E402
from rlflow.trainers.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlflow.utils.checkpoint import read_json  # noqa: E402
from rlflow.utils.run import RunLogger, read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GAUSSIAN_RECIPE = REPO / "recipes" / "robotics" / "hopper_gaussian_ppo.yaml"


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo appends compiler warnings to ./MUJOCO_LOG.TXT; keep that file out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """Rendering the metric plots at the end of each run costs seconds of matplotlib; not tested here."""
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])


# ------------------------------------------------------------------------------------------ helpers
def gaussian_config(output_dir: Path, **overrides: Any) -> PPOConfig:
    """The Gaussian PPO recipe retargeted to inverted_pendulum, built in-process."""
    data = load_yaml(GAUSSIAN_RECIPE)
    data.update(task="inverted_pendulum", output_dir=str(output_dir), report_to="none")
    data.update(overrides)
    return config_from_dict(PPOConfig, data, source="test")


def tiny_gaussian_config(output_dir: Path, **overrides: Any) -> PPOConfig:
    settings = dict(
        num_envs=2,
        rollout_steps=16,
        iterations=4,
        update_epochs=2,
        minibatch_size=16,
        eval_steps=100,
        eval_episodes=2,
        max_episode_steps=50,
        save_steps=2,
        critic_warmup_iterations=1,
    )
    settings.update(overrides)
    return gaussian_config(output_dir, **settings)


def tiny_flow_config(output_dir: Path, **overrides: Any) -> PPOConfig:
    data: dict[str, Any] = dict(
        output_dir=str(output_dir),
        task="inverted_pendulum",
        policy_type="flow",
        num_threads=1,
        flow={"hidden_dims": [32, 32], "noise_hidden_dims": [16]},
        critic_hidden_dims=[32, 32],
        num_envs=2,
        rollout_steps=32,
        iterations=2,
        update_epochs=2,
        minibatch_size=32,
        critic_warmup_iterations=0,
        eval_steps=100,
        eval_episodes=2,
        max_episode_steps=50,
        report_to="none",
    )
    data.update(overrides)
    return config_from_dict(PPOConfig, data, source="test")


def differing_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the tensors that are not bitwise equal (or not in both modules)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(
        k for k in sa.keys() | sb.keys() if k not in sa or k not in sb or not torch.equal(sa[k], sb[k])
    )


# ---------------------------------------------------------------------------------- 1. learning
@pytest.mark.slow
def test_gaussian_ppo_learns_inverted_pendulum(tmp_path):
    config = gaussian_config(
        tmp_path / "run", rollout_steps=128, iterations=8, eval_steps=4, eval_episodes=5, minibatch_size=128
    )
    summary = PPOTrainer(config).train()

    saved = read_json(tmp_path / "run" / "summary.json", what="summary")
    for key in ("base_return_mean", "final_return_mean", "env_steps", "wall_seconds"):
        assert saved[key] == pytest.approx(summary[key]), key
    assert saved["base_return_mean"] > 0
    # Measured 24 -> 79 (the time limit is 1000): a clear improvement, with margin for platform noise.
    assert saved["final_return_mean"] >= 2.0 * saved["base_return_mean"], saved
    # Horizon 1: every decision is exactly one env step.
    assert saved["env_steps"] == config.iterations * config.num_envs * config.rollout_steps
    assert saved["wall_seconds"] > 0
    assert Path(saved["policy_dir"], "normalization.json").is_file()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(config.iterations + 1))
    assert [row["step"] for row in rows if "eval/return_mean" in row] == [0, 4, 8]
    assert rows[0]["eval/return_mean"] == saved["base_return_mean"]
    assert all(row["train/first_log_ratio_max"] < 1e-4 for row in rows[1:])


# ------------------------------------------------------------------------- 2. ReinFlow smoke run
def test_reinflow_smoke_run_first_ratio_noise_bounds_and_saved_policy(tmp_path):
    config = tiny_flow_config(tmp_path / "run", final_max_std=0.15)
    trainer = PPOTrainer(config)
    summary = trainer.train()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [row for row in rows if row["step"] > 0]
    assert [row["step"] for row in train_rows] == [1, 2]
    for row in train_rows:
        assert 0 <= row["train/first_log_ratio_max"] < 1e-4  # the ratio at the first minibatch is 1
        assert row["train/actor_updated"] == 1.0
        assert all(value is not None for value in row.values()), row  # no NaN/inf metrics
    # max_std anneals linearly from 0.24 to final_max_std over the run: 0.24 at the first iteration, 0.15
    # at the last one.
    assert [row["train/noise_max_std"] for row in train_rows] == pytest.approx([0.24, 0.15])

    policy_dir = tmp_path / "run" / "policy"
    assert summary["policy_dir"] == str(policy_dir)
    assert (policy_dir / "normalization.json").is_file()
    Normalization.load(policy_dir / "normalization.json")
    policy = FlowPolicy.from_pretrained(policy_dir)
    assert (policy.config.obs_dim, policy.config.act_dim, policy.config.kernel) == (4, 1, "reinflow")

    assert differing_weights(policy, trainer.actor) == []

    # The learned noise std stays inside [min_std, max_std], even far outside the observed states: for
    # the reloaded policy (the config's bounds) and the trained one (its last, annealed upper bound).
    obs = 10.0 * torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The saved config records the bound the policy was last trained with.
        assert policy.config.max_std == pytest.approx(0.15)
        for actor, max_std in ((policy, 0.15), (trainer.actor, 0.15)):
            for t in actor.grid():
                std = actor.noise_std(obs, t.expand(obs.shape[0]))
                assert config.min_std <= float(std.min()) and float(std.max()) <= max_std + 1e-6
    out = policy.explore(obs[:8], generator=torch.Generator().manual_seed(1))
    assert out.record.shape == (8, config.num_steps + 1, 4, 1) and torch.isfinite(out.log_prob).all()


# ------------------------------------------------------------------ 3. the first-ratio check bites
def _shift_velocity_weights(trainer: PPOTrainer) -> None:
    with torch.no_grad():
        trainer.actor.velocity_net.output.bias.add_(0.05)


def _shift_time_grid(trainer: PPOTrainer) -> None:
    trainer.actor.config.time_shift = 3.0  # re-scoring now uses a different grid from sampling


@pytest.mark.parametrize("sabotage", [_shift_velocity_weights, _shift_time_grid], ids=["weights", "grid"])
def test_first_update_ratio_check_catches_rescoring_mismatch(tmp_path, monkeypatch, sabotage):
    original_collect = PPOTrainer.collect

    def collect_then_sabotage(self):
        batch = original_collect(self)
        sabotage(self)
        return batch

    monkeypatch.setattr(PPOTrainer, "collect", collect_then_sabotage)
    trainer = PPOTrainer(tiny_flow_config(tmp_path / "run", iterations=1, eval_episodes=1))
    with pytest.raises(RuntimeError, match="first-update log-ratio"):
        trainer.train()


# ------------------------------------------------------------------------------------ 4. resume
@pytest.mark.parametrize("interrupt_at", [1, 2], ids=["before-first-checkpoint", "after-checkpoint"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, interrupt_at):
    """Interrupted in update ``interrupt_at`` (0-based; checkpoints every 2 iterations), then restarted by a
    NEW trainer on the same config: bitwise the uninterrupted run, with one metrics row per step."""
    reference = PPOTrainer(tiny_gaussian_config(tmp_path / "reference"))
    reference_summary = reference.train()

    original_update = PPOTrainer.update

    def interrupted_update(self, *args, **kwargs):
        if self.iteration == interrupt_at:
            raise KeyboardInterrupt
        return original_update(self, *args, **kwargs)

    monkeypatch.setattr(PPOTrainer, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        PPOTrainer(tiny_gaussian_config(tmp_path / "resumed")).train()
    monkeypatch.setattr(PPOTrainer, "update", original_update)
    steps = [row["step"] for row in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == list(range(interrupt_at + 1))

    resumed = PPOTrainer(tiny_gaussian_config(tmp_path / "resumed"))
    resumed_summary = resumed.train()

    assert differing_weights(resumed.actor, reference.actor) == []
    assert differing_weights(resumed.critic, reference.critic) == []
    for key in ("base_return_mean", "final_return_mean", "final_stochastic_return_mean", "env_steps"):
        assert resumed_summary[key] == reference_summary[key], key
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    reference_rows = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]  # no duplicated or missing steps
    for row, expected in zip(rows, reference_rows, strict=True):
        same = {k: v for k, v in row.items() if not k.startswith("time/")}
        assert same == {k: v for k, v in expected.items() if not k.startswith("time/")}
    # The run's wall clock carries over from the checkpoint, so it never goes backwards at the resume.
    wall = [row["time/wall_seconds"] for row in rows[1:]]
    assert wall == sorted(wall) and resumed_summary["wall_seconds"] >= wall[-1]


def test_rollout_blocks_start_from_fresh_initial_states(tmp_path):
    """Consecutive blocks must not replay the previous block's sub-env seeds (shifted by one env)."""
    trainer = PPOTrainer(tiny_gaussian_config(tmp_path / "run", num_envs=4, rollout_steps=1))
    starts = []
    for iteration in range(3):
        trainer.iteration = iteration
        starts.append(trainer.collect().observations[0])
    starts = torch.cat(starts)  # [3 * num_envs, obs_dim]
    assert len({tuple(row.tolist()) for row in starts}) == starts.shape[0]


# ----------------------------------------------------------------------- 5. config errors up front
@pytest.mark.parametrize("policy_type", ["gaussian", "flow"])
def test_pretrained_policy_with_wrong_obs_dim_is_a_config_error(tmp_path, policy_type):
    if policy_type == "gaussian":
        policy = GaussianPolicy(GaussianPolicyConfig(obs_dim=3, act_dim=1, hidden_dims=[8]))
    else:
        policy = FlowPolicy(FlowPolicyConfig(obs_dim=3, act_dim=1, hidden_dims=[8], noise_hidden_dims=[8]))
    policy.save_pretrained(tmp_path / "policy")
    config = tiny_gaussian_config(
        tmp_path / "run", policy_type=policy_type, pretrained=str(tmp_path / "policy")
    )
    with pytest.raises(ConfigError, match=r"obs_dim=3.*obs_dim=4"):
        PPOTrainer(config)
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_unknown_task_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no_such_task"):
        PPOTrainer(tiny_gaussian_config(tmp_path / "run", task="no_such_task"))


# ------------------------------------------------------------- 6./7. the rollout engine on a toy env
class StepCounterEnv(gym.Env):
    """Observation ``[t]`` (steps since reset); reward ``1 + e`` where ``e`` counts the automatic
    (unseeded) resets since the last seeded one, so each episode's return tells which episode it was.
    Terminates at step ``terminate_at`` (never if None); wrap in a TimeLimit to truncate."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, terminate_at: int | None = None) -> None:
        self.terminate_at = terminate_at
        self.observation_space = Box(-np.inf, np.inf, shape=(1,), dtype=np.float32)
        self.action_space = Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.t = 0
        self.episode = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.episode = 0 if seed is not None else self.episode + 1
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([float(self.t)], dtype=np.float32), 1.0 + self.episode, terminated, False, {}


def toy_vector_env(specs: list[tuple[int | None, int]], horizon: int) -> gym.vector.SyncVectorEnv:
    """One sub-env per ``(terminate_at, time_limit)``, wrapped like ``rlflow.envs.make_env`` does."""

    def factory(terminate_at: int | None, limit: int):
        return lambda: wrap_env(
            TimeLimit(StepCounterEnv(terminate_at), max_episode_steps=limit), horizon=horizon
        )

    return gym.vector.SyncVectorEnv(
        [factory(*spec) for spec in specs], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


class ZeroActor:
    """A trivial :class:`~rlflow.policies.actor.Actor`: all-zero chunks; counts its calls."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.calls = {"explore": 0, "deterministic_action": 0}

    def explore(self, obs, *, generator=None):
        self.calls["explore"] += 1
        action = torch.zeros(obs.shape[0], self.horizon, 1)
        return ActorOutput(action=action, record=obs.clone(), log_prob=torch.zeros(obs.shape[0]))

    def evaluate_actions(self, obs, record):
        return torch.zeros(obs.shape[0]), torch.zeros(obs.shape[0])

    def deterministic_action(self, obs, *, generator=None, requires_grad=False):
        self.calls["deterministic_action"] += 1
        return torch.zeros(obs.shape[0], self.horizon, 1)

    def stochastic_elements(self) -> int:
        return self.horizon


def column(batch_field: torch.Tensor) -> list[list[float]]:
    """A ``[T, N]`` or ``[T, N, 1]`` field as per-env lists over time."""
    return batch_field.reshape(batch_field.shape[0], batch_field.shape[1]).T.tolist()


def test_collect_keeps_true_final_observations_and_terminations_apart():
    # Env A terminates at step 3; env B never terminates but has a time limit of 4. One step per decision.
    envs = toy_vector_env([(3, 100), (None, 4)], horizon=1)
    batch = collect_gym_rollout(ZeroActor(1), envs, 7, seed=0)

    assert column(batch.observations) == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1, 2]]
    # At an episode end the TRUE final observation (3 / 4), not the reset one (0).
    assert column(batch.next_observations) == [[1, 2, 3, 1, 2, 3, 1], [1, 2, 3, 4, 1, 2, 3]]
    assert column(batch.terminated) == [[0, 0, 1, 0, 0, 1, 0], [0] * 7]
    # B's time limit at t=3, and the end of the block (t=6) for both, are truncations.
    assert column(batch.truncated) == [[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0, 1]]
    assert column(batch.rewards) == [[1, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 2, 2, 2]]
    assert torch.equal(batch.records, batch.observations)  # what the actor saw is what it re-scores
    assert batch.env_steps == 14
    assert batch.episode_returns == [3.0, 4.0, 6.0]  # A's 1st, B's 1st, A's 2nd (reward 2 per step)
    assert batch.episode_lengths == [3, 4, 3]
    envs.close()


def test_collect_with_action_chunks_counts_raw_steps_and_mid_chunk_ends():
    # Horizon 2. A terminates at step 3 (mid-chunk, twice: the second time on the block's last decision);
    # B is truncated by its time limit at step 5 (mid-chunk).
    envs = toy_vector_env([(3, 100), (None, 5)], horizon=2)
    batch = collect_gym_rollout(ZeroActor(2), envs, 4, seed=123)

    assert batch.actions.shape == (4, 2, 2, 1)
    assert column(batch.observations) == [[0, 2, 0, 2], [0, 2, 4, 0]]
    assert column(batch.next_observations) == [[2, 3, 2, 3], [2, 4, 5, 2]]
    assert column(batch.rewards) == [[2, 1, 4, 2], [2, 2, 1, 4]]
    assert column(batch.terminated) == [[0, 1, 0, 1], [0, 0, 0, 0]]
    # A's last decision terminated, so it is not also marked truncated; B's last decision is.
    assert column(batch.truncated) == [[0, 0, 0, 0], [0, 0, 1, 1]]
    assert batch.env_steps == (2 + 1 + 2 + 1) + (2 + 2 + 1 + 2)
    assert batch.episode_returns == [3.0, 5.0, 6.0]
    assert batch.episode_lengths == [3, 5, 3]  # env steps, not decisions
    envs.close()


@pytest.mark.parametrize("deterministic", [True, False])
def test_evaluate_episodes_returns_the_first_episode_of_each_env(deterministic):
    # A ends every decision (step 1), B is truncated at step 5 (mid-chunk), C terminates at step 4.
    envs = toy_vector_env([(1, 100), (None, 5), (4, 100)], horizon=2)
    actor = ZeroActor(2)
    episodes = evaluate_episodes(actor, envs, seed=7, deterministic=deterministic)
    returns, lengths = episodes.returns, episodes.lengths
    assert episodes.successes is None  # Hopper reports no success flag
    # A finished three episodes before B finished one; only its first (reward 1) counts.
    assert returns == [1.0, 5.0, 4.0]
    assert lengths == [1, 5, 4]
    used = "deterministic_action" if deterministic else "explore"
    assert actor.calls[used] == 3 and sum(actor.calls.values()) == 3
    # A second evaluation starts from a seeded reset: same result.
    assert evaluate_episodes(actor, envs, seed=7, deterministic=deterministic) == episodes
    envs.close()
