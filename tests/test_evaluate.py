"""`rlflow eval`: returns of a saved policy, a video, and clear errors for a policy/task mismatch."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from rlflow.envs import identity_normalization  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.evaluate import EvalConfig, evaluate  # noqa: E402
from rlflow.policies import FlowPolicy, FlowPolicyConfig  # noqa: E402


def _saved_flow_policy(tmp_path, obs_dim=4, act_dim=1):
    policy = FlowPolicy(FlowPolicyConfig(obs_dim=obs_dim, act_dim=act_dim, horizon=2, hidden_dims=[16]))
    extra = {"normalization": identity_normalization("inverted_pendulum").to_dict()} if obs_dim == 4 else None
    return policy.save_pretrained(tmp_path / "run" / "policy", extra_json=extra)


def test_eval_writes_returns_video_and_summary(tmp_path):
    policy_dir = _saved_flow_policy(tmp_path)
    summary = evaluate(EvalConfig(policy=str(policy_dir), task="inverted_pendulum", episodes=3, video=True))
    out = tmp_path / "run" / "eval"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["episodes"] == 3 and len(saved["returns"]) == 3 and len(saved["stochastic_returns"]) == 3
    # InvertedPendulum-v5 pays 1 per step survived and 0 for the step that drops the pole, so an untrained
    # policy's return (its episodes all terminate) is its length minus one.
    assert saved["return_mean"] == pytest.approx(saved["length_mean"] - 1)
    assert summary["return_mean"] == saved["return_mean"]
    assert (out / "rollout.mp4").stat().st_size > 0
    # Same seed, same numbers.
    again = evaluate(EvalConfig(policy=str(policy_dir), task="inverted_pendulum", episodes=3, video=False))
    assert again["returns"] == summary["returns"]


def test_eval_rejects_a_policy_for_another_task(tmp_path):
    policy_dir = _saved_flow_policy(tmp_path, obs_dim=11, act_dim=3)
    with pytest.raises(ConfigError, match="obs_dim=11.*inverted_pendulum.*obs_dim=4"):
        evaluate(EvalConfig(policy=str(policy_dir), task="inverted_pendulum", episodes=1, video=False))
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate(EvalConfig(policy=str(policy_dir), task="pong", episodes=1, video=False))


def test_eval_reproduces_the_training_final_evaluation(tmp_path, caplog):
    """`rlflow eval` seeds its episodes like `rlflow ppo`'s evaluations: with the run's seed and episode
    count its returns are the training's final ones, and the log says so (or names the options to pass)."""
    from rlflow.config import config_from_dict
    from rlflow.trainers.ppo import PPOConfig, PPOTrainer

    run_dir = tmp_path / "run"
    config = config_from_dict(
        PPOConfig,
        dict(
            output_dir=str(run_dir),
            task="inverted_pendulum",
            seed=3,
            num_threads=1,
            flow={"hidden_dims": [16], "noise_hidden_dims": [8]},
            critic_hidden_dims=[16],
            num_envs=2,
            rollout_steps=8,
            iterations=1,
            update_epochs=1,
            minibatch_size=16,
            critic_warmup_iterations=0,
            eval_episodes=3,
            max_episode_steps=40,
            report_to="none",
        ),
        source="test",
    )
    trained = PPOTrainer(config).train()
    policy = str(run_dir / "policy")
    common = dict(policy=policy, task="inverted_pendulum", max_episode_steps=40, video=False)
    with caplog.at_level("INFO", logger="rlflow.evaluate"):
        summary = evaluate(EvalConfig(seed=3, episodes=3, **common))
    assert summary["return_mean"] == trained["final_return_mean"]
    assert summary["stochastic_return_mean"] == trained["final_stochastic_return_mean"]
    assert "the same seeds and episodes as the final evaluation" in caplog.text
    assert caplog.records[-1].getMessage().startswith("done: evaluated")
    caplog.clear()
    with caplog.at_level("INFO", logger="rlflow.evaluate"):
        evaluate(EvalConfig(seed=0, episodes=10, **common))
    assert "NOT those of the final evaluation" in caplog.text
    assert "--seed 3 --episodes 3 to reproduce it" in caplog.text
