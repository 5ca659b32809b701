"""Bad input never hurts: no command deletes files it did not create, no NaN/inf reaches a checkpoint,
interrupted writes are cleaned up, and a NaN from an environment stops the run at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlflow.config import ConfigError, config_from_dict, load_yaml
from rlflow.errors import NonFiniteError
from rlflow.utils.checkpoint import (
    atomic_directory,
    atomic_update,
    check_finite_checkpoint,
    check_finite_loss,
    checkpoint_dir,
    checkpoint_to_resume,
    latest_checkpoint,
    list_checkpoints,
)
from rlflow.utils.run import RunLogger

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet(tmp_path, monkeypatch, one_thread):
    """MuJoCo writes ./MUJOCO_LOG.TXT; metric plots cost seconds of matplotlib and are not tested here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to compare a directory before and after."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def foreign_run_dir(path: Path) -> dict[str, bytes]:
    """A directory that is not a preference set: an earlier training run plus a user's own files."""
    (path / "checkpoints" / "step_00000004").mkdir(parents=True)
    (path / "checkpoints" / "step_00000004" / "training_state.pt").write_bytes(b"\x00state")
    (path / "policy").mkdir()
    (path / "policy" / "config.json").write_text('{"model_type": "flow"}\n')
    (path / "notes.txt").write_text("my notes\n")
    (path / "config.yaml").write_text("lr: 1.0  # the user's own config\n")
    return snapshot(path)


# ---------------------------------------------------------------------------------- 1. output directories
def _segment_config(output_dir: Path, **overrides: Any):
    from rlflow.data.segment_preferences import SegmentPreferencesConfig

    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        task="inverted_pendulum",
        sources=["random"],
        episodes=[2],
        num_envs=2,
        segment_length=2,
        stride=1,
        num_pairs=6,
    )
    settings.update(overrides)
    return SegmentPreferencesConfig(**settings)


def test_segment_preferences_refuse_a_foreign_directory_and_overwrite_replaces_only_their_files(tmp_path):
    pytest.importorskip("mujoco")
    from rlflow.data.preferences import load_preferences
    from rlflow.data.segment_preferences import build_segment_preferences

    run = tmp_path / "run"
    before = foreign_run_dir(run)
    with pytest.raises(ConfigError, match="choose an empty output_dir or set overwrite: true") as info:
        build_segment_preferences(_segment_config(run))
    assert str(run) in str(info.value) and "notes.txt" in str(info.value)
    assert snapshot(run) == before  # byte-identical: nothing written, nothing deleted

    build_segment_preferences(_segment_config(run, overwrite=True))
    after = snapshot(run)
    for name, content in before.items():
        if name != "config.yaml":  # the one file whose name this command writes
            assert after[name] == content, name
    assert after["config.yaml"] != before["config.yaml"]
    assert len(load_preferences(run)) == 6
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporaries left behind

    # Now it holds a preference set: replacing it needs overwrite (a finished dataset is not silently
    # regenerated), and still keeps the user's files.
    with pytest.raises(ConfigError, match="already holds a preference set.*set overwrite: true"):
        build_segment_preferences(_segment_config(run, num_pairs=4))
    build_segment_preferences(_segment_config(run, num_pairs=4, overwrite=True))
    assert len(load_preferences(run)) == 4
    assert (run / "notes.txt").read_bytes() == before["notes.txt"]
    assert (run / "checkpoints" / "step_00000004" / "training_state.pt").is_file()


def test_shapes_preferences_refuse_a_foreign_directory_before_loading_anything(tmp_path):
    from rlflow.worlds.shapes.preferences import BuildPreferencesConfig, build_preferences

    run = tmp_path / "run"
    before = foreign_run_dir(run)
    config = BuildPreferencesConfig(output_dir=str(run), model_path=str(tmp_path / "no_such_model"))
    with pytest.raises(ConfigError, match="choose an empty output_dir or set overwrite: true"):
        build_preferences(config)  # refused before the (missing) model is even looked at
    assert snapshot(run) == before
    with pytest.raises(ConfigError, match="is a file"):
        build_preferences(BuildPreferencesConfig(output_dir=str(run / "notes.txt")))


def test_save_preferences_keeps_other_files(tmp_path):
    from rlflow.data.preferences import load_preferences, save_preferences
    from tests.test_preferences import make_set

    out = tmp_path / "prefs"
    save_preferences(make_set(4), out)
    (out / "README.md").write_text("what this set is\n")
    save_preferences(make_set(3, seed=1), out)
    assert len(load_preferences(out)) == 3
    assert (out / "README.md").read_text() == "what this set is\n"


# ---------------------------------------------------------------------------------- 2. save_pretrained
def test_save_pretrained_keeps_the_users_files_and_replaces_its_own(tmp_path):
    from rlflow.policies import FlowPolicy, FlowPolicyConfig

    directory = tmp_path / "policy"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me\n")
    (directory / "eval").mkdir()
    (directory / "eval" / "summary.json").write_text("{}\n")
    torch.manual_seed(0)
    first = FlowPolicy(FlowPolicyConfig(obs_dim=3, act_dim=2, hidden_dims=[8]))
    first.save_pretrained(directory, extra_json={"normalization": {"kind": "identity"}})
    second = FlowPolicy(FlowPolicyConfig(obs_dim=3, act_dim=2, hidden_dims=[8]))
    second.save_pretrained(directory)

    assert (directory / "notes.txt").read_text() == "keep me\n"
    assert (directory / "eval" / "summary.json").read_text() == "{}\n"
    loaded = FlowPolicy.from_pretrained(directory)
    for key, value in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",  # the model card, replaced by each save
        "config.json",
        "eval",
        "model.safetensors",
        "normalization.json",  # an earlier save's file is not ours to judge: kept
        "notes.txt",
    ]


def test_atomic_update_replaces_own_entries_only_and_cleans_its_stale_temporaries(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "user.txt").write_text("user")
    (directory / "vae").mkdir()
    (directory / "vae" / "old.bin").write_text("old vae")
    stale = directory / ".rlflow-staging.tmp-0123456789ab"  # a write killed half-way
    stale.mkdir()
    lookalike = directory / ".rlflow-staging.tmp-notours"  # not our exact pattern
    lookalike.write_text("x")
    with atomic_update(directory, owned=("vae",)) as tmp:
        (tmp / "weights.bin").write_text("new")
        (tmp / "transformer").mkdir()
        (tmp / "transformer" / "w.bin").write_text("t")
    assert (directory / "user.txt").read_text() == "user"
    assert not (directory / "vae").exists()  # owned by the format but not written this time
    assert (directory / "transformer" / "w.bin").read_text() == "t"
    assert not stale.exists() and lookalike.exists()

    with pytest.raises(RuntimeError, match="boom"):  # a failing writer changes nothing
        with atomic_update(directory) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("boom")
    assert (directory / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [".rlflow-staging.tmp-notours", "transformer", "user.txt", "weights.bin"]
    )


def test_reward_model_save_pretrained_keeps_other_files(tmp_path):
    from rlflow.reward_models.learned import RewardModelConfig, build_reward_model, load_reward_model

    directory = tmp_path / "rm"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep")
    model = build_reward_model(RewardModelConfig(kind="segment", obs_dim=3, act_dim=1))
    model.save_pretrained(directory)
    assert (directory / "notes.txt").read_text() == "keep"
    assert isinstance(load_reward_model(directory), type(model))


def test_save_shapes_model_keeps_other_files(tmp_path):
    pytest.importorskip("diffusers")
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, load_shapes_model, save_shapes_model

    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "vae").mkdir()  # not from an earlier save of ours: not ours to delete
    (directory / "vae" / "mine.txt").write_text("user")
    (directory / "README.md").write_text("user")
    torch.manual_seed(0)
    model = build_shapes_model(tiny_shapes_config(image_size=8, patch_size=4))
    save_shapes_model(model, directory)
    save_shapes_model(model, directory)  # again, now over our own earlier save
    assert (directory / "README.md").read_text() == "user"
    assert (directory / "vae" / "mine.txt").read_text() == "user"
    assert isinstance(load_shapes_model(directory), type(model))


# ------------------------------------------------------------------------------- 3. finite checkpoints
def _pretrain_config(tmp_path: Path, **overrides: Any):
    from rlflow.trainers.pretrain import PretrainConfig

    data = load_yaml(REPO / "recipes" / "toy" / "flow_matching_2d.yaml")
    data.update(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        warmup_steps=0,
        batch_size=16,
        eval_steps=1000,
        eval_samples=64,
        num_threads=1,
        **overrides,
    )
    data["data"]["num_samples"] = 200
    return config_from_dict(PretrainConfig, data, source="test")


def test_a_diverged_update_never_becomes_the_latest_checkpoint(tmp_path, monkeypatch):
    """Step loop: an absurd learning rate after the step-2 checkpoint blows the weights up at step 3 (Adam
    moves each by ~1e30) with a finite loss; the step-3 checkpoint is refused, step 2 stays byte-identical
    and still resumes."""
    from rlflow.trainers.pretrain import PretrainTrainer

    PretrainTrainer(_pretrain_config(tmp_path, steps=2, save_steps=1)).train()
    good = latest_checkpoint(tmp_path / "run")
    assert good is not None and good.name == "step_00000002"
    before = snapshot(good)

    original = PretrainTrainer.resume

    def resume_with_an_absurd_lr(self, path):
        original(self, path)
        for group in self.optimizer.param_groups:
            group["lr"] = 1e30
        self.scheduler.base_lrs = [1e30] * len(self.scheduler.base_lrs)

    monkeypatch.setattr(PretrainTrainer, "resume", resume_with_an_absurd_lr)
    with pytest.raises(NonFiniteError) as info:
        PretrainTrainer(_pretrain_config(tmp_path, steps=4, save_steps=1)).train()
    message = str(info.value)
    assert "step 3" in message and "exploded weights" in message and "whose loss was finite" in message
    assert "lower the learning rate" in message
    assert "step_00000003 was not written" in message and "step_00000002 is untouched" in message
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1, 2]
    assert snapshot(good) == before
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(PretrainTrainer, "resume", original)  # the fix: a sane lr, resume from step 2
    resumed = PretrainTrainer(_pretrain_config(tmp_path, steps=3, save_steps=1))
    resumed.train()
    assert resumed.step == 3
    assert all(torch.isfinite(p).all() for p in resumed.policy.parameters())


def test_ppo_with_an_absurd_learning_rate_stops_before_its_checkpoint(tmp_path):
    pytest.importorskip("mujoco")
    from rlflow.trainers.ppo import PPOConfig, PPOTrainer

    def config(**overrides: Any) -> PPOConfig:
        data = load_yaml(REPO / "recipes" / "robotics" / "hopper_gaussian_ppo.yaml")
        data.update(
            task="inverted_pendulum",
            output_dir=str(tmp_path / "run"),
            report_to="none",
            num_envs=2,
            rollout_steps=16,
            update_epochs=1,
            minibatch_size=32,  # one update per iteration: the checkpoint directly follows it
            eval_steps=100,
            eval_episodes=1,
            max_episode_steps=20,
            save_steps=1,
            critic_warmup_iterations=0,
            lr_scheduler_type="constant",  # cosine would anneal the last iteration's lr to 0
            num_threads=1,
        )
        data.update(overrides)
        return config_from_dict(PPOConfig, data, source="test")

    PPOTrainer(config(iterations=1)).train()
    good = latest_checkpoint(tmp_path / "run")
    before = snapshot(good)
    with pytest.raises(NonFiniteError) as info:
        PPOTrainer(config(iterations=2, actor_lr=1e30)).train()  # PPO's lr comes from the config on resume
    message = str(info.value)
    assert "iteration 2" in message and "exploded weights" in message and "actor." in message
    assert "lower the learning rate" in message
    assert "environment" not in message.split("Likely cause")[1].split(";")[0]  # not blamed on the env
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
    assert snapshot(good) == before

    # With more minibatches the next loss is computed from the inf weights: stopped there, same diagnosis.
    with pytest.raises(NonFiniteError, match=r"PPO loss is (nan|inf) at iteration 2 .*weights exploded"):
        PPOTrainer(config(iterations=2, actor_lr=1e30, minibatch_size=8)).train()
    assert snapshot(good) == before


def test_iteration_loop_refuses_to_checkpoint_exploded_weights(tmp_path):
    """The online trainers' loop (RWR here): one minibatch, lr 1e30: the iteration-1 checkpoint is refused."""
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    from tests.test_rwr import tiny_rwr

    trainer = tiny_rwr(tmp_path, learning_rate=1e30, minibatch_size=16, iterations=2)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    assert "iteration 1" in message and "exploded weights" in message and "trainable." in message
    assert "train/loss=" in message and "lower the learning rate" in message
    assert list_checkpoints(tmp_path / "run") == []
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_check_finite_checkpoint_names_what_and_why(tmp_path):
    weights = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}}
    path = checkpoint_dir(tmp_path, 7)
    check_finite_checkpoint(path, where="step 7", weights={"model": {"a": torch.ones(2)}})  # fine

    with pytest.raises(NonFiniteError, match=r"step 7: NaN/inf in weights \(1\): model\.b.*loss was finite"):
        check_finite_checkpoint(path, where="step 7", weights=weights, losses={"train/loss": 0.5})
    with pytest.raises(NonFiniteError, match=r"train/loss=nan.*rewards.*kl_beta"):
        check_finite_checkpoint(path, where="step 7", weights=weights, losses={"train/loss": float("nan")})

    from dataclasses import dataclass

    @dataclass
    class Config:
        kl_beta: float = float("inf")

    with pytest.raises(NonFiniteError, match=r"config has non-finite values \(kl_beta=inf\)"):
        check_finite_checkpoint(path, where="step 7", weights=weights, config=Config())

    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    optimizer.param_groups[0]["lr"] = float("nan")  # what a NaN schedule does (Adam refuses it up front)
    with pytest.raises(NonFiniteError, match=r"param_groups\[0\]\.lr=nan.*learning rate is non-finite"):
        check_finite_checkpoint(path, where="step 7", weights={"model": layer}, optimizers={"opt": optimizer})
    assert not path.exists()

    check_finite_loss(torch.tensor(1.0), where="step 7", weights={"model": layer})
    with pytest.raises(NonFiniteError, match=r"loss is inf at step 7.*loss's inputs"):
        check_finite_loss(torch.tensor(float("inf")), where="step 7", weights={"model": layer})
    with torch.no_grad():
        layer.weight.fill_(1e30)
    with pytest.raises(NonFiniteError, match=r"weights exploded \(\|model\.weight\| reaches 1e\+30\)"):
        check_finite_loss(torch.tensor(float("nan")), where="step 7", weights={"model": layer})


# ------------------------------------------------------------------------- 4. stale temporary directories
def test_stale_checkpoint_temporaries_are_removed_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    with atomic_directory(checkpoint_dir(run, 2)) as tmp:
        (tmp / "weights.bin").write_text("good")
    root = run / "checkpoints"
    stale = [
        root / ".step_00000004.tmp-0123456789ab",  # killed while writing step 4
        root / ".step_00000002.old-abcdef012345",  # killed between the two renames of a replace
        root / ".step_00000001.del-00000000ffff",  # killed while pruning
    ]
    for path in stale:
        path.mkdir()
        (path / "weights.bin").write_text("partial")
    kept = [root / "notes.txt", root / ".step_00000004.tmp-mine", root / "step_00000003.tmp-0123456789ab"]
    kept[0].write_text("user")
    kept[1].mkdir()
    kept[2].write_text("not a hidden temporary of ours")

    assert checkpoint_to_resume(run, resume=True, main=False) == checkpoint_dir(run, 2)
    assert all(path.exists() for path in stale)  # only the main process cleans up
    assert checkpoint_to_resume(run, resume=True) == checkpoint_dir(run, 2)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert (checkpoint_dir(run, 2) / "weights.bin").read_text() == "good"


# ------------------------------------------------------------------------------ 5. NaN from environments
def _nan_env_setup():
    gym = pytest.importorskip("gymnasium")
    from gymnasium.spaces import Box
    from rlflow.envs.wrappers import wrap_env

    from rlflow.policies.actor import ActorOutput

    class CounterEnv(gym.Env):
        observation_space = Box(-np.inf, np.inf, (1,), np.float32)
        action_space = Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.array([0.0], dtype=np.float32), {}

        def step(self, action):
            self.t += 1
            return np.array([float(self.t)], dtype=np.float32), 1.0, False, False, {}

    class NaNAfter(gym.Wrapper):
        """Returns a NaN reward (or observation) from its ``at``-th step on."""

        def __init__(self, env, at: int, field: str):
            super().__init__(env)
            self.at, self.field, self.count = at, field, 0

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.count += 1
            if self.count >= self.at:
                if self.field == "reward":
                    reward = float("nan")
                else:
                    obs = np.full_like(obs, np.nan)
            return obs, reward, terminated, truncated, info

    def make_envs(field: str):
        def factory(index: int):
            env = CounterEnv()
            if index == 2:  # only the third sub-env misbehaves, at its 4th step
                env = NaNAfter(env, at=4, field=field)
            return lambda: wrap_env(gym.wrappers.TimeLimit(env, max_episode_steps=100), horizon=1)

        return gym.vector.SyncVectorEnv(
            [factory(i) for i in range(4)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )

    class ZeroActor:
        def explore(self, obs, *, generator=None):
            return ActorOutput(
                action=torch.zeros(obs.shape[0], 1, 1), record=obs.clone(), log_prob=torch.zeros(obs.shape[0])
            )

        def deterministic_action(self, obs, *, generator=None, requires_grad=False):
            return torch.zeros(obs.shape[0], 1, 1)

    return make_envs, ZeroActor


@pytest.mark.parametrize("field", ["reward", "observation"])
def test_a_nan_from_the_environment_stops_the_rollout_with_env_and_step(field):
    from rlflow.rollout import collect_gym_rollout, evaluate_episodes

    make_envs, ZeroActor = _nan_env_setup()
    envs = make_envs(field)
    with pytest.raises(
        NonFiniteError,
        match=rf"environment returned a non-finite {field} for env 2 \(of 4\) at rollout step 3",
    ):
        collect_gym_rollout(ZeroActor(), envs, 10, seed=0)
    envs.close()
    envs = make_envs(field)  # fresh wrappers: their step count starts again
    with pytest.raises(NonFiniteError, match=rf"non-finite {field} for env 2 \(of 4\) at evaluation step 3"):
        evaluate_episodes(ZeroActor(), envs, seed=0, deterministic=True)
    envs.close()


def test_a_nan_action_blames_the_policy_not_the_environment():
    from rlflow.policies.actor import ActorOutput
    from rlflow.rollout import collect_gym_rollout

    make_envs, _ = _nan_env_setup()
    envs = make_envs("reward")

    class BrokenActor:
        def explore(self, obs, *, generator=None):
            action = torch.zeros(obs.shape[0], 1, 1)
            action[1] = float("nan")
            return ActorOutput(action=action, record=obs.clone(), log_prob=torch.zeros(obs.shape[0]))

    with pytest.raises(
        NonFiniteError, match=r"policy produced a non-finite action for env 1 .* step 0.*not the environment"
    ):
        collect_gym_rollout(BrokenActor(), envs, 10, seed=0)
    envs.close()
