"""Preference-based reward learning for robotics: segment cutting, the simulated rater, the learned-reward
env wrapper, ``rlflow ppo`` with ``learned_reward``, and a tiny end-to-end run on InvertedPendulum-v5."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from rlflow.envs.learned_reward import (  # noqa: E402
    LearnedRewardWrapper,
    absorbing_offset,
    absorbing_offset_from_preferences,
    make_learned_reward_vector_env,
)
from rlflow.reward_models.learned import (  # noqa: E402
    RewardModelConfig,
    SegmentRewardModel,
    load_reward_model,
    save_reward_model,
)

from rlflow.config import ConfigError, config_from_dict, load_yaml  # noqa: E402
from rlflow.data.preferences import PreferenceSet, load_preferences  # noqa: E402
from rlflow.data.segment_preferences import (  # noqa: E402
    SegmentPreferencesConfig,
    build_segment_preferences,
    cut_segments,
    label_pairs,
    noiseless_ceiling,
    rater_probabilities,
)
from rlflow.trainers.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rlflow.utils.run import RunLogger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GAUSSIAN_RECIPE = REPO / "recipes" / "robotics" / "hopper_gaussian_ppo.yaml"


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo writes ./MUJOCO_LOG.TXT; plots cost seconds of matplotlib and are not tested here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])


# ------------------------------------------------------------------------------------------ helpers
class LinearStepReward(nn.Module):
    """A fake segment reward model with a known step reward: r(obs, act) = sum(obs) + 2 * sum(act)."""

    def __init__(self, obs_dim: int, act_dim: int, dimensions: tuple[str, ...] = ("return",)):
        super().__init__()
        self.config = SimpleNamespace(
            kind="segment", obs_dim=obs_dim, act_dim=act_dim, dimensions=list(dimensions)
        )

    def step_rewards(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        r = obs.sum(-1) + 2.0 * act.sum(-1)
        return torch.stack([r * (k + 1) for k in range(len(self.config.dimensions))], dim=-1)


def tiny_ppo_config(output_dir: Path, **overrides: Any) -> PPOConfig:
    data = load_yaml(GAUSSIAN_RECIPE)
    data.update(
        task="inverted_pendulum",
        output_dir=str(output_dir),
        report_to="none",
        num_envs=2,
        rollout_steps=16,
        iterations=2,
        update_epochs=1,
        minibatch_size=16,
        eval_steps=100,
        eval_episodes=2,
        max_episode_steps=50,
        save_steps=100,
        critic_warmup_iterations=0,
    )
    data.update(overrides)
    return config_from_dict(PPOConfig, data, source="test")


# ------------------------------------------------------------------------------- 1. segment cutting
def _two_episodes() -> dict[str, np.ndarray]:
    """Episode 0 terminates after 4 steps (rewards 1..4); episode 1 is truncated after 3 (10, 20, 30).
    obs_dim = 1 (obs = row index), act_dim = 1 (act = 100 + row index); final obs = 50 + episode."""
    rows = np.arange(7)
    return dict(
        observations=rows[:, None].astype(np.float32),
        actions=(100 + rows)[:, None].astype(np.float32),
        rewards=np.array([1, 2, 3, 4, 10, 20, 30], np.float32),
        next_observations=np.array([1, 2, 3, 50, 5, 6, 51], np.float32)[:, None],
        terminals=np.array([0, 0, 0, 1, 0, 0, 0], bool),
        episode_ids=np.array([0, 0, 0, 0, 1, 1, 1]),
    )


def test_cut_segments_pads_terminations_and_drops_truncations():
    steps, returns, real = cut_segments(**_two_episodes(), length=2, stride=1)
    # Episode 0: starts 0..3 (start 3 runs into the absorbing state); episode 1: starts 0, 1 (2 would cross
    # the truncation).
    assert returns.tolist() == [1 + 2, 2 + 3, 3 + 4, 4 + 0, 10 + 20, 20 + 30]
    assert real.tolist() == [2, 2, 2, 1, 2, 2]
    assert steps.shape == (6, 2, 2)
    assert steps[0].tolist() == [[0, 100], [1, 101]]  # (obs, act) per step
    assert steps[3].tolist() == [[3, 103], [50, 0]]  # absorbing: the true final obs, a zero action
    assert steps[5].tolist() == [[5, 105], [6, 106]]


def test_cut_segments_without_absorbing_and_with_stride():
    _, returns, _ = cut_segments(**_two_episodes(), length=2, stride=1, absorbing=False)
    assert returns.tolist() == [3, 5, 7, 30, 50]
    _, returns, _ = cut_segments(**_two_episodes(), length=2, stride=2)
    assert returns.tolist() == [3, 7, 30]  # starts 0, 2 of episode 0; start 0 of episode 1
    _, returns, real = cut_segments(**_two_episodes(), length=5, stride=1)
    assert returns.tolist() == [10, 9, 7, 4] and real.tolist() == [4, 3, 2, 1]  # episode 1 is too short


def test_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"episodes has 1 entries for 2 sources"):
        SegmentPreferencesConfig(sources=["random", "random"], episodes=[3])
    with pytest.raises(ConfigError, match=r"'rater_theta' must be >= 1"):
        SegmentPreferencesConfig(sources=["random"], episodes=[3], rater_theta=0.5)
    config = SegmentPreferencesConfig(
        output_dir=str(tmp_path / "p"),
        task="inverted_pendulum",
        sources=["random", "no/such/policy"],
        episodes=[2, 2],
    )
    with pytest.raises(ConfigError, match=r"sources\[1\]: 'no/such/policy' is not a saved policy directory"):
        build_segment_preferences(config)


# ----------------------------------------------------------------------------------------- 2. rater
def test_rater_probabilities_closed_form():
    a, b = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 2.0])
    probs = rater_probabilities(a, b, scale=2.0, theta=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    log_theta = math.log(1.5)
    expected_a = [sig(2 - log_theta), sig(-log_theta), sig(-3 - log_theta)]
    expected_b = [sig(-2 - log_theta), sig(-log_theta), sig(3 - log_theta)]
    assert probs[:, 0].tolist() == pytest.approx(expected_a)
    assert probs[:, 1].tolist() == pytest.approx(expected_b)
    assert probs.sum(-1).tolist() == pytest.approx([1, 1, 1])
    assert probs[1, 2].item() == pytest.approx(0.5 / 2.5)  # equal scores: P(tie) = (theta - 1) / (theta + 1)
    # The same model the reward trainer fits (Rao-Kupper / VideoReward ties) on scaled scores.
    from rlflow.reward_models.losses import bt_ties_probabilities

    assert probs.float() == pytest.approx(bt_ties_probabilities(2 * a, 2 * b, 1.5).float(), abs=1e-6)
    assert rater_probabilities(a, b, scale=2.0, theta=1.0)[:, 2].abs().max() < 1e-12  # theta 1: no ties
    with pytest.raises(ValueError, match="theta must be >= 1"):
        rater_probabilities(a, b, scale=1.0, theta=0.5)


def test_sampled_labels_follow_the_probabilities_and_the_ceiling():
    n = 20000
    ra, rb = torch.full((n,), 0.3), torch.zeros(n)
    labels, probs = label_pairs(ra, rb, scale=2.0, theta=1.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / n
    assert freq.tolist() == pytest.approx(probs[0].tolist(), abs=0.015)
    # Ceiling by hand: decided labels agree with the true order with P(A) / (P(A) + P(B)).
    ceiling = noiseless_ceiling(ra, rb, labels)
    assert ceiling["accuracy"] == pytest.approx((probs[0, 0] / (probs[0, 0] + probs[0, 1])).item(), abs=0.015)
    hand = noiseless_ceiling(
        torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([0, 1, 0, 2])
    )
    assert hand == {"accuracy": pytest.approx((1 + 0 + 0.5) / 3), "decided_pairs": 3}


# ----------------------------------------------------------------------------------------- 3. wrapper
def test_wrapper_replaces_the_reward_and_keeps_the_true_one():
    env = gym.wrappers.RecordEpisodeStatistics(gym.make("InvertedPendulum-v5"))
    model = LinearStepReward(4, 1, dimensions=("return", "other"))
    wrapped = LearnedRewardWrapper(env, model, head="other", scale=0.5, offset=1.0)
    obs, _ = wrapped.reset(seed=0)
    total_true, total_learned = 0.0, 0.0
    for _ in range(200):
        action = np.array([5.0], np.float32)  # outside the bounds [-3, 3]: the env executes 3
        learned = 0.5 * (2 * (obs.sum() + 2 * 3.0) - 1.0)  # head "other" doubles r
        obs, reward, term, trunc, info = wrapped.step(action)
        assert reward == pytest.approx(learned, rel=1e-5, abs=1e-5)
        assert info["learned_reward"] == reward and info["true_reward"] in (0.0, 1.0)
        total_true += info["true_reward"]
        total_learned += reward
        if term or trunc:
            break
    assert term  # pushing one way topples the pendulum
    assert info["episode"]["r"] == pytest.approx(total_true)  # episode statistics stay true
    assert total_learned != pytest.approx(total_true)


def test_vector_env_with_learned_reward_reports_true_returns_batched_or_not():
    from rlflow.envs.tasks import identity_normalization

    results = {}
    for batched in (True, False):
        envs = make_learned_reward_vector_env(
            "inverted_pendulum",
            2,
            LinearStepReward(4, 1),
            horizon=2,
            normalization=identity_normalization("inverted_pendulum"),
            offset=-10.0,  # every learned step reward is then >= 10 - |obs| - 6 > 0 near upright
            seed=0,
            batched=batched,
        )
        envs.reset(seed=0)
        rewards, returns = [], []
        actions = np.linspace(-1, 1, 60 * 2 * 2).reshape(60, 2, 2, 1).astype(np.float32)
        for t in range(60):
            _, reward, _, _, infos = envs.step(actions[t])
            rewards.append(np.asarray(reward, dtype=np.float64))
            final = infos.get("final_info")
            if isinstance(final, dict) and "episode" in final:
                returns += final["episode"]["r"][final["_episode"]].tolist()
        envs.close()
        results[batched] = (np.stack(rewards), returns)
    # One batched model call per vector step gives the per-step wrapper's chunk sums.
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    assert results[True][1] == results[False][1]
    returns = results[True][1]
    assert returns and all(r == int(r) and 0 < r < 60 for r in returns)  # true alive counts (+1 per step)
    assert (results[True][0] > 0).all()


def test_absorbing_offset_is_the_mean_reward_of_final_obs_with_zero_action():
    final = np.array([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    assert absorbing_offset(LinearStepReward(4, 1), final) == pytest.approx((3 + 4) / 2)
    # From a preference set: only the padded steps (all-zero action) count.
    a = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 0.5], [0.0, 0.0, 0.0, 1.0, 0.0]]])
    b = torch.tensor([[[1.0, 1.0, 1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0, 0.0]]])
    pairs = PreferenceSet(
        kind="segment",
        dimensions=["return"],
        prompts=[""],
        a=a,
        b=b,
        labels=torch.tensor([[0]]),
        meta={"obs_dim": 4, "act_dim": 1},
    )
    assert absorbing_offset_from_preferences(LinearStepReward(4, 1), pairs) == pytest.approx((1 + 8) / 2)
    no_padding = pairs.select(torch.tensor([0]))
    no_padding.a[..., 4] = 1.0
    no_padding.b[..., 4] = 1.0
    with pytest.raises(ValueError, match="no absorbing steps"):
        absorbing_offset_from_preferences(LinearStepReward(4, 1), no_padding)


# --------------------------------------------------------------------------------------------- 4. PPO
def test_ppo_learned_reward_with_wrong_dims_is_a_config_error(tmp_path):
    hopper_model = SegmentRewardModel(
        RewardModelConfig(kind="segment", dimensions=["return"], obs_dim=11, act_dim=3)
    )
    path = save_reward_model(hopper_model, tmp_path / "hopper_rm")
    with pytest.raises(ConfigError, match=r"obs_dim=11, act_dim=3.*obs_dim=4, act_dim=1"):
        PPOTrainer(tiny_ppo_config(tmp_path / "run", learned_reward=str(path)))
    pendulum = SegmentRewardModel(
        RewardModelConfig(kind="segment", dimensions=["return"], obs_dim=4, act_dim=1)
    )
    path = save_reward_model(pendulum, tmp_path / "pendulum_rm")
    with pytest.raises(ConfigError, match="unknown reward model head"):
        PPOTrainer(tiny_ppo_config(tmp_path / "run", learned_reward=str(path), learned_reward_head="speed"))


# -------------------------------------------------------------------------------------- 5. end to end
def test_end_to_end_preferences_reward_model_and_ppo_on_inverted_pendulum(tmp_path):
    from rlflow.trainers.reward_model import RewardModelTrainConfig
    from rlflow.trainers.reward_model import train as train_reward_model

    prefs = tmp_path / "prefs"
    summary = build_segment_preferences(
        SegmentPreferencesConfig(
            output_dir=str(prefs),
            task="inverted_pendulum",
            sources=["random"],
            episodes=[48],
            num_envs=4,
            segment_length=5,
            stride=1,
            num_pairs=240,
            rater_scale=3.0,
            rater_theta=1.2,
        )
    )
    pairs = load_preferences(prefs)
    assert pairs.kind == "segment" and pairs.dimensions == ["return"] and len(pairs) == 240
    assert pairs.a.shape[1:] == (5, 4 + 1) and pairs.meta["obs_dim"] == 4 and pairs.meta["act_dim"] == 1
    assert summary["padded_segments"] > 0 and summary["segment_return_std"] > 0
    assert 0.5 < summary["noiseless_order_accuracy"] <= 1.0
    assert summary["expected_ceiling"]["without_ties"] == pytest.approx(
        summary["noiseless_order_accuracy"], abs=0.1
    )
    assert (
        abs(summary["label_fraction_a"] + summary["label_fraction_b"] + summary["label_fraction_tie"] - 1)
        < 1e-9
    )

    rm_config = config_from_dict(
        RewardModelTrainConfig,
        dict(
            data_dir=str(prefs),
            output_dir=str(tmp_path / "rm"),
            loss="bt_ties",
            theta=1.2,
            heldout_fraction=0.25,
            steps=300,
            batch_size=32,
            learning_rate=3e-3,
            warmup_steps=10,
            eval_steps=300,
            save_steps=300,
            logging_steps=100,
            report_to="none",
            plot_curves=False,
            num_threads=1,
        ),
        source="test",
    )
    rm_summary = train_reward_model(rm_config)
    # Held-out decided-pair accuracy: chance is 0.5, the noiseless-order ceiling ~0.85; measured 0.78.
    assert rm_summary["accuracy"] > 0.65, rm_summary

    # The model prefers staying alive: its alive steps score above the absorbing state after a fall.
    offset = absorbing_offset_from_preferences(rm_summary["model_dir"], prefs)
    padded = (pairs.a[..., 4] == 0).reshape(-1)
    steps = pairs.a.reshape(-1, 5)[~padded]
    model = load_reward_model(rm_summary["model_dir"])
    with torch.no_grad():
        assert model.step_rewards(steps[:, :4], steps[:, 4:]).mean().item() > offset

    ppo = PPOTrainer(
        tiny_ppo_config(
            tmp_path / "ppo", learned_reward=rm_summary["model_dir"], learned_reward_offset=offset
        )
    )
    wrapper = ppo.envs.envs[0]
    while not isinstance(wrapper, LearnedRewardWrapper):
        wrapper = wrapper.env
    assert wrapper.offset == pytest.approx(offset)
    result = ppo.train()
    assert result["final_return_mean"] > 0  # evaluation reports true returns (+1 per alive step)
    assert math.isfinite(result["final_return_mean"])
