"""Meta-World manipulation tasks: ids, reward modes, placements, scripted demonstrations, bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("metaworld")

from rlflow.envs import make_env, make_vector_env, resolve_task  # noqa: E402
from rlflow.envs.manipulation import (  # noqa: E402
    MANIPULATION_TASKS,
    MetaWorldTask,
    scripted_expert,
)

from rlflow.config import ConfigError  # noqa: E402
from rlflow.data.collect import collect_demonstrations  # noqa: E402


@pytest.mark.parametrize(
    ("name", "gym_id"),
    [
        ("button_press", "rlflow/button-press-v3"),
        ("Pick_Place_dense", "rlflow/pick-place-dense-v3"),
        ("rlflow/reach-v3", "rlflow/reach-v3"),
        ("peg-insert-side-v3", "rlflow/peg-insert-side-v3"),
        ("hopper", "Hopper-v5"),
    ],
)
def test_task_names_resolve_to_registered_ids(name, gym_id):
    assert resolve_task(name) == gym_id
    assert gym_id in gym.registry


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ConfigError) as info:
        resolve_task("buton_press")
    message = str(info.value)
    assert "'buton_press'" in message and all(name in message for name in MANIPULATION_TASKS)
    assert "hopper" in message
    with pytest.raises(ConfigError):
        resolve_task("rlflow/no-such-task-v3")


def _run_expert(env: gym.Env, seed: int, noise: float = 0.0) -> tuple[list[float], list[bool], list[dict]]:
    expert = scripted_expert(env.unwrapped.task_name)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rewards, terminations, infos = [], [], []
    while True:
        action = np.clip(expert(obs[None])[0] + noise * rng.standard_normal(4), -1, 1)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(float(reward))
        terminations.append(terminated)
        infos.append(info)
        if terminated or truncated:
            return rewards, terminations, infos


def test_sparse_reward_is_one_on_success_and_ends_the_episode():
    env = gym.make(resolve_task("button_press"))
    assert env.observation_space.shape == (39,) and env.action_space.shape == (4,)
    rewards, terminations, infos = _run_expert(env, seed=0)
    assert terminations[-1] and not any(terminations[:-1])
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert infos[-1]["success"] == 1.0 and infos[-1]["is_success"] is True
    assert len(rewards) < 200  # the expert finishes well inside the time limit
    env.close()


def test_shaped_reward_runs_to_the_time_limit_and_success_is_sticky():
    env = gym.make(resolve_task("button_press_dense"), max_episode_steps=120)
    rewards, terminations, infos = _run_expert(env, seed=0)
    assert len(rewards) == 120 and not any(terminations)  # truncated at the limit, never terminated
    assert 0.0 <= min(rewards) and max(rewards) <= 10.0 and len(set(rewards)) > 10
    first = next(i for i, info in enumerate(infos) if info["success"])
    assert all(info["is_success"] for info in infos[first:])
    assert not any(info["is_success"] for info in infos[:first])
    env.close()


def test_placements_are_fresh_per_reset_and_reproducible_by_seed():
    env = gym.make(resolve_task("pick_place"))
    goal = lambda obs: obs[-3:].copy()  # noqa: E731
    first = env.reset(seed=3)[0]
    again = env.reset(seed=3)[0]
    other = env.reset(seed=4)[0]
    next_episode = env.reset()[0]
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(goal(first), goal(other)) and not np.allclose(goal(other), goal(next_episode))
    assert np.abs(goal(first)).sum() > 0  # the goal is observed (not clipped away)
    env.close()

    fixed = gym.make(resolve_task("pick_place"), fixed_goal=True, goal_seed=5)
    goals = [goal(fixed.reset(seed=seed)[0]) for seed in range(3)]
    np.testing.assert_array_equal(goals[0], goals[1])
    np.testing.assert_array_equal(goals[0], goals[2])
    fixed.close()


def test_noise_makes_the_expert_fail_and_episodes_end_at_the_limit():
    env = gym.make(resolve_task("button_press"))
    rewards, terminations, _ = _run_expert(env, seed=0, noise=3.0)
    assert len(rewards) == 200 and sum(rewards) == 0.0 and not any(terminations)
    env.close()


def test_frames_are_the_corner_camera_turned_upright():
    env = MetaWorldTask("button-press-v3", render_mode="rgb_array", width=64, height=48)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 10
    # MuJoCo's offscreen buffer of the corner cameras is upside down; the env turns it by 180 degrees
    # (checked by eye: docs/images/manipulation_tasks.png, written by benchmarks/manipulation.py --task-images).
    raw = env.unwrapped_metaworld.render()
    np.testing.assert_array_equal(frame, raw[::-1, ::-1])
    env.close()


def test_wrapped_vector_env_reports_success_in_final_info():
    envs = make_vector_env("button_press", 2, horizon=4, seed=0, max_episode_steps=8)
    envs.reset(seed=0)
    for _ in range(2):
        _, _, _, truncated, infos = envs.step(np.zeros((2, 4, 4), dtype=np.float32))
    assert truncated.all()
    final = infos["final_info"]
    assert final["_is_success"].all() and not final["is_success"].any()
    np.testing.assert_array_equal(final["episode"]["l"], [8, 8])
    envs.close()
    assert make_env("drawer_open", horizon=2).action_space.shape == (2, 4)


def test_scripted_collection_records_noisy_expert_episodes(tmp_path):
    kwargs = dict(episodes=4, num_envs=2, seed=1, max_episode_steps=150)
    clean = collect_demonstrations("scripted", "button_press", **kwargs)
    noisy = collect_demonstrations("scripted", "button_press", action_noise_std=0.5, **kwargs)
    again = collect_demonstrations("scripted", "button_press", action_noise_std=0.5, **kwargs)
    assert clean.obs_dim == 39 and clean.act_dim == 4 and clean.num_episodes == 4
    assert clean.episode_returns().tolist() == [1.0] * 4 and clean.terminals.sum() == 4
    assert noisy.metadata["policy_type"] == "scripted_expert" and noisy.metadata["action_noise_std"] == 0.5
    np.testing.assert_array_equal(noisy.actions, again.actions)  # seeded
    assert np.abs(noisy.actions).max() <= 1.0
    # Noise moves the executed actions away from the expert's at the same observation.
    expert = scripted_expert("button-press-v3")
    assert np.abs(noisy.actions - expert(noisy.observations.astype(np.float64))).mean() > 0.2
    assert np.abs(clean.actions - expert(clean.observations.astype(np.float64))).max() < 1e-5


def test_scripted_policy_for_a_task_without_expert_is_refused():
    with pytest.raises(ConfigError, match="no scripted expert.*saved policy directory"):
        collect_demonstrations("scripted", "hopper", episodes=1)


def test_evaluation_and_rollouts_report_success_with_an_interval():
    from pathlib import Path

    import torch

    from rlflow.policies.loading import load_policy
    from rlflow.rollout import collect_gym_rollout, evaluate_episodes

    root = Path(__file__).resolve().parents[1]
    policy, normalization = load_policy(root / "recipes/manipulation/artifacts/button_press_bc_flow")
    envs = make_vector_env("button_press", 6, horizon=4, normalization=normalization)
    episodes = evaluate_episodes(
        policy, envs, seed=0, deterministic=True, generator=torch.Generator().manual_seed(0)
    )
    # Sparse reward: the return of an episode is its success.
    assert episodes.successes == episodes.returns and set(episodes.successes) <= {0.0, 1.0}
    metrics = episodes.metrics(prefix="eval/")
    assert metrics["eval/success_rate"] == np.mean(episodes.successes)
    assert (
        0
        <= metrics["eval/success_ci95_low"]
        <= metrics["eval/success_rate"]
        <= metrics["eval/success_ci95_high"]
    )
    batch = collect_gym_rollout(policy, envs, 60, seed=0, generator=torch.Generator().manual_seed(0))
    assert len(batch.episode_successes) == len(batch.episode_returns) > 0
    assert batch.episode_successes == batch.episode_returns
    envs.close()


def test_scripted_demonstrations_round_trip_through_minari(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    from rlflow.data.minari_io import load_minari, save_minari

    demos = collect_demonstrations("scripted", "drawer_open", episodes=2, num_envs=2, max_episode_steps=40)
    save_minari(demos, "rlflow/drawer-open-test-v0", data_path=tmp_path)
    loaded = load_minari("rlflow/drawer-open-test-v0", data_path=tmp_path)
    np.testing.assert_array_equal(loaded.observations, demos.observations)
    np.testing.assert_array_equal(loaded.actions, demos.actions)
    # The dataset names the env by its registered id, so Minari can rebuild it (string entry point).
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    dataset = minari.load_dataset("rlflow/drawer-open-test-v0")
    assert dataset.spec.env_spec.id == "rlflow/drawer-open-v3"
    env = dataset.recover_environment()
    assert env.reset(seed=0)[0].shape == (39,)
    env.close()


def test_a_policy_for_another_task_is_refused_naming_both_shapes(tmp_path):
    from pathlib import Path

    from rlflow.evaluate import EvalConfig, evaluate
    from rlflow.trainers.ppo import PPOConfig, PPOTrainer

    root = Path(__file__).resolve().parents[1]
    hopper = str(root / "recipes/robotics/artifacts/hopper_medium_flow")
    with pytest.raises(ConfigError, match=r"obs_dim=11, act_dim=3.*'button_press' \(obs_dim=39, act_dim=4\)"):
        evaluate(EvalConfig(policy=hopper, task="button_press", episodes=1, output_dir=str(tmp_path / "eval")))
    with pytest.raises(ConfigError, match=r"hopper_medium_flow \(obs_dim=11, act_dim=3\).*obs_dim=39, act_dim=4"):
        PPOTrainer(PPOConfig(task="button_press", pretrained=hopper, output_dir=str(tmp_path / "ppo")))
