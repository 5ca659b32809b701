"""rlflow.envs: normalisation, action chunks, episode statistics, task factories, SAME_STEP vector infos, video."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from gymnasium.spaces import Box  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402
from gymnasium.wrappers import TimeLimit  # noqa: E402
from rlflow.envs.normalization import Normalization  # noqa: E402
from rlflow.envs.tasks import TASKS, env_dims, make_env, make_vector_env, resolve_task  # noqa: E402
from rlflow.envs.wrappers import ActionChunk, NormalizedObsAction, wrap_env  # noqa: E402

from rlflow.utils.checkpoint import CheckpointError  # noqa: E402


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo appends compiler warnings to ./MUJOCO_LOG.TXT; keep that file out of the repository."""
    monkeypatch.chdir(tmp_path)


class CountingEnv(gym.Env):
    """Deterministic toy env: the t-th step (t = 1, 2, ...) gives reward t and observation [t, 0].

    It terminates at step ``terminate_at`` (never if None) and records every action it receives, so
    tests can check which actions of a chunk were executed.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, terminate_at: int | None = 6) -> None:
        self.terminate_at = terminate_at
        self.observation_space = Box(-np.inf, np.inf, shape=(2,), dtype=np.float64)
        self.action_space = Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.t = 0
        self.actions: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.t = 0
        self.actions = []
        return np.array([0.0, 0.0]), {}

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action, copy=True))
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return np.array([float(self.t), 0.0]), float(self.t), terminated, False, {"t": self.t}


def _chunk(horizon: int, act_dim: int = 2, value: float = 0.0) -> np.ndarray:
    return np.full((horizon, act_dim), value, dtype=np.float32)


def _stats_from_rollout(task: str, steps: int = 20) -> Normalization:
    """Normalization from a short random rollout of the raw env (a stand-in for a dataset)."""
    env = gym.make(resolve_task(task))
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    observations, actions = [obs], []
    for _ in range(steps):
        action = env.action_space.sample()
        obs, _, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return Normalization.from_data(np.stack(observations), np.stack(actions))


# ----------------------------------------------------------------------------------------- normalization


def test_normalization_maps_data_range_to_unit_interval_and_round_trips():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 100.0]) + 7.0
    act = rng.uniform(-3.0, 2.0, size=(50, 3))
    norm = Normalization.from_data(obs, act)
    assert (norm.obs_dim, norm.act_dim) == (5, 3)
    n_obs = norm.normalize_obs(obs)
    assert n_obs.shape == obs.shape and n_obs.dtype == np.float64
    np.testing.assert_allclose(n_obs.min(axis=0), -1.0, atol=1e-12)
    np.testing.assert_allclose(n_obs.max(axis=0), 1.0, atol=1e-12)
    # Matches the textbook formula.
    np.testing.assert_allclose(
        n_obs, 2 * (obs - norm.obs_low) / (norm.obs_high - norm.obs_low) - 1, atol=1e-12
    )
    np.testing.assert_allclose(norm.denormalize_obs(n_obs), obs, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(
        norm.denormalize_action(norm.normalize_action(act)), act, rtol=1e-14, atol=1e-14
    )
    np.testing.assert_allclose(
        norm.normalize_action(norm.denormalize_action(act)), act, rtol=1e-14, atol=1e-14
    )
    # Leading dims and torch tensors (dtype and device kept).
    batch = torch.as_tensor(act.reshape(5, 10, 3), dtype=torch.float32)
    out = norm.normalize_action(batch)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (5, 10, 3)
    torch.testing.assert_close(norm.denormalize_action(out), batch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), norm.normalize_action(act).reshape(5, 10, 3), atol=1e-6)
    # float32 numpy keeps float32.
    assert norm.normalize_obs(obs.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="last dimension is 5"):
        norm.normalize_obs(np.zeros((2, 4)))


def test_identity_normalization_is_exact_for_observations():
    norm = Normalization.identity(4, act_low=[-0.4, -2.0], act_high=[0.4, 2.0])
    obs = np.random.default_rng(1).normal(size=(8, 4)) * 50
    assert np.array_equal(norm.normalize_obs(obs), obs)
    assert np.array_equal(norm.denormalize_obs(obs), obs)
    np.testing.assert_array_equal(norm.denormalize_action(np.array([1.0, -1.0])), [0.4, -2.0])


def test_constant_dimensions_do_not_divide_by_zero():
    obs = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    act = np.array([[0.0], [0.0]])
    norm = Normalization.from_data(obs, act)
    n = norm.normalize_obs(obs)
    assert np.all(np.isfinite(n))
    np.testing.assert_array_equal(n[:, 1], 0.0)  # the constant value maps to 0
    # Other values are only shifted (scale 1), and still invert exactly.
    np.testing.assert_array_equal(norm.normalize_obs(np.array([2.0, 7.5])), [0.0, 2.5])
    np.testing.assert_array_equal(norm.denormalize_obs(norm.normalize_obs(obs)), obs)
    np.testing.assert_array_equal(norm.normalize_action(np.array([[0.0], [1.0]])), [[0.0], [1.0]])


def test_normalization_validation_errors():
    with pytest.raises(ValueError, match="obs_low has 3 entries but obs_high has 2"):
        Normalization(obs_low=[0, 0, 0], obs_high=[1, 1], act_low=[0], act_high=[1])
    with pytest.raises(ValueError, match="swapped"):
        Normalization(obs_low=[1.0], obs_high=[0.0], act_low=[0], act_high=[1])
    with pytest.raises(ValueError, match="non-finite"):
        Normalization(obs_low=[-np.inf], obs_high=[0.0], act_low=[0], act_high=[1])
    with pytest.raises(ValueError, match=r"\[N, dim\]"):
        Normalization.from_data(np.zeros(5), np.zeros((5, 1)))


def test_normalization_save_load_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(2)
    norm = Normalization.from_data(rng.normal(size=(10, 3)), rng.normal(size=(10, 2)))
    path = tmp_path / "norm" / "normalization.json"
    norm.save(path)
    loaded = Normalization.load(path)
    assert loaded == norm  # bit-exact: JSON floats round-trip float64
    assert loaded.obs_low.dtype == np.float64

    missing = tmp_path / "missing.json"
    with pytest.raises(CheckpointError, match="missing.json"):
        Normalization.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(path.read_text()[:25])
    with pytest.raises(CheckpointError, match="corrupt.json"):
        Normalization.load(corrupt)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lr": 3e-4}))
    with pytest.raises(CheckpointError, match="other.json"):
        Normalization.load(other)
    bad_lengths = tmp_path / "bad_lengths.json"
    data = json.loads(path.read_text())
    data["act_high"] = data["act_high"][:1]
    bad_lengths.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad_lengths\.json.*act_low has 2 entries but act_high has 1"):
        Normalization.load(bad_lengths)


# ----------------------------------------------------------------------------------------- wrappers


def test_chunk_termination_stops_early_and_sums_rewards():
    env = wrap_env(CountingEnv(terminate_at=6), horizon=4)
    assert env.action_space.shape == (4, 2)
    np.testing.assert_array_equal(env.action_space.low, -np.ones((4, 2)))
    env.reset(seed=0)
    chunk = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert (reward, terminated, truncated, info["chunk_steps"]) == (1 + 2 + 3 + 4, False, False, 4)
    assert "episode" not in info
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert (reward, terminated, truncated, info["chunk_steps"]) == (5 + 6, True, False, 2)
    np.testing.assert_array_equal(obs, [6.0, 0.0])
    assert info["t"] == 6  # the last inner step's info is passed through
    assert info["episode"]["r"] == 21 and info["episode"]["l"] == 6
    # Actions were executed in order and the rest of the second chunk was discarded.
    executed = env.unwrapped.actions
    assert len(executed) == 6
    np.testing.assert_array_equal(np.stack(executed), np.concatenate([chunk, chunk[:2]]))


def test_chunk_truncation_stops_early():
    env = wrap_env(TimeLimit(CountingEnv(terminate_at=None), max_episode_steps=5), horizon=4)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(_chunk(4))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (10, False, False, 4)
    _, reward, terminated, truncated, info = env.step(_chunk(4))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (5, False, True, 1)
    assert info["episode"]["r"] == 15 and info["episode"]["l"] == 5


def test_chunk_rejects_wrong_shapes():
    env = wrap_env(CountingEnv(), horizon=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="horizon"):
        ActionChunk(CountingEnv(), 0)


def test_normalized_wrapper_maps_observations_and_clips_actions():
    norm = Normalization(obs_low=[0.0, 0.0], obs_high=[10.0, 0.0], act_low=[-2.0, 0.0], act_high=[2.0, 4.0])
    inner = CountingEnv(terminate_at=None)
    env = wrap_env(inner, horizon=1, normalization=norm)
    assert env.observation_space.dtype == np.float32 and env.action_space.shape == (1, 2)
    np.testing.assert_array_equal(env.action_space.low, [[-1.0, -1.0]])
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32
    np.testing.assert_allclose(obs, [-1.0, 0.0])
    obs, reward, *_ = env.step(np.array([[0.75, -1.0]], dtype=np.float32))
    np.testing.assert_allclose(obs, [2 * 1 / 10 - 1, 0.0], rtol=1e-6)
    assert reward == 1.0  # rewards are never normalised
    # 0.75 -> 1.5 in data units, clipped to the env's bound 1.0; -1 -> 0.
    np.testing.assert_allclose(inner.actions[-1], [1.0, 0.0])
    assert inner.actions[-1].dtype == np.float32
    with pytest.raises(ValueError, match="obs_dim=2"):
        NormalizedObsAction(CountingEnv(), Normalization.identity(3, [-1.0, -1.0], [1.0, 1.0]))


# ----------------------------------------------------------------------------------------- tasks


def test_resolve_task_and_dims():
    assert resolve_task("hopper") == "Hopper-v5"
    assert resolve_task("Hopper-v5") == "Hopper-v5"
    assert resolve_task("WALKER2D") == "Walker2d-v5"
    with pytest.raises(ValueError, match="humanoid"):
        resolve_task("Pendulum-v1")
    assert env_dims("hopper") == (11, 3)
    assert env_dims("HalfCheetah-v5") == (17, 6)


def test_lazy_package_exports():
    import rlflow.envs

    assert rlflow.envs.Normalization is Normalization
    assert rlflow.envs.make_env is make_env
    with pytest.raises(AttributeError):
        _ = rlflow.envs.not_a_thing


# check_env's advice to check env.unwrapped and its remarks on the infinite bounds of the MuJoCo
# observation spaces are expected: the point is to check the wrapped env.
@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")
@pytest.mark.parametrize("task", sorted(TASKS))
def test_check_env_every_task(task, monkeypatch):
    # gymnasium's RecordEpisodeStatistics reports wall-clock time in info["episode"]["t"]; check_env's
    # determinism test compares infos of two identically seeded runs, so freeze that clock.
    import gymnasium.wrappers.common

    monkeypatch.setattr(gymnasium.wrappers.common.time, "perf_counter", lambda: 0.0)
    norm = _stats_from_rollout(task)
    env = make_env(task, horizon=4, normalization=norm)
    obs_dim, act_dim = env_dims(task)
    assert env.observation_space.shape == (obs_dim,)
    assert env.action_space.shape == (4, act_dim)
    check_env(env, skip_render_check=True)
    env.close()


def test_hopper_chunk_reward_equals_sum_of_raw_rewards_until_it_falls():
    """Same seed and actions: chunk rewards are the raw per-step sums, and the fall ends a chunk early."""
    horizon = 4
    # Full-strength random torques topple the hopper within a few dozen steps.
    actions = np.sign(np.random.default_rng(3).uniform(-1, 1, size=(200, horizon, 3))).astype(np.float32)
    raw = gym.make("Hopper-v5")
    raw.reset(seed=5)
    env = make_env("hopper", horizon=horizon)
    env.reset(seed=5)
    total_steps, raw_return = 0, 0.0
    for chunk in actions:
        expected, executed = 0.0, 0
        for action in chunk:
            raw_obs, r, raw_terminated, raw_truncated, _ = raw.step(action)
            expected += float(r)
            executed += 1
            if raw_terminated or raw_truncated:
                break
        obs, reward, terminated, truncated, info = env.step(chunk)
        assert reward == expected
        assert info["chunk_steps"] == executed
        assert (terminated, truncated) == (raw_terminated, raw_truncated)
        np.testing.assert_array_equal(obs, raw_obs)
        total_steps += executed
        raw_return += expected
        if terminated or truncated:
            break
    assert terminated and not truncated, "the hopper was expected to fall"
    assert executed < horizon, "with this seed the fall happens inside a chunk"
    assert info["episode"]["l"] == total_steps
    assert info["episode"]["r"] == pytest.approx(raw_return, rel=1e-12)


# ----------------------------------------------------------------------------------------- vector env


def test_vector_same_step_layout_when_one_sub_env_finishes():
    """Pins the infos layout documented in rlflow.envs.tasks (gymnasium's SAME_STEP + our wrappers)."""
    factories = [lambda: wrap_env(CountingEnv(terminate_at=6), horizon=4)]
    factories.append(lambda: wrap_env(CountingEnv(terminate_at=100), horizon=4))
    envs = gym.vector.SyncVectorEnv(factories, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    actions = np.zeros((2, 4, 2), dtype=np.float32)
    _, _, _, _, infos = envs.step(actions)
    assert "final_info" not in infos and "final_obs" not in infos
    np.testing.assert_array_equal(infos["chunk_steps"], [4, 4])

    obs, rewards, terminations, truncations, infos = envs.step(actions)
    np.testing.assert_array_equal(rewards, [5 + 6, 5 + 6 + 7 + 8])
    np.testing.assert_array_equal(terminations, [True, False])
    np.testing.assert_array_equal(truncations, [False, False])
    # Sub-env 0 was reset in the same step: obs[0] is the new episode's first observation.
    np.testing.assert_array_equal(obs[0], [0.0, 0.0])
    np.testing.assert_array_equal(obs[1], [8.0, 0.0])
    # final_obs: object array with the true last observation of the finished sub-env only.
    assert infos["final_obs"].dtype == object and infos["final_obs"].shape == (2,)
    np.testing.assert_array_equal(infos["final_obs"][0], [6.0, 0.0])
    assert infos["final_obs"][1] is None
    np.testing.assert_array_equal(infos["_final_obs"], [True, False])
    np.testing.assert_array_equal(infos["_final_info"], [True, False])
    final = infos["final_info"]
    np.testing.assert_array_equal(final["_episode"], [True, False])
    assert final["episode"]["r"][0] == 21 and final["episode"]["l"][0] == 6
    np.testing.assert_array_equal(final["episode"]["_r"], [True, False])
    np.testing.assert_array_equal(final["episode"]["_l"], [True, False])
    np.testing.assert_array_equal(final["chunk_steps"], [2, 0])
    np.testing.assert_array_equal(final["_chunk_steps"], [True, False])
    # Top level: the running sub-env's info; the finished one contributes its reset info only.
    assert "episode" not in infos
    np.testing.assert_array_equal(infos["_chunk_steps"], [False, True])
    assert infos["chunk_steps"][1] == 4
    env_steps = np.where(infos["_final_info"], final["chunk_steps"], infos["chunk_steps"])
    np.testing.assert_array_equal(env_steps, [2, 4])
    envs.close()


def test_hopper_vector_env_true_returns_and_reproducibility():
    norm = _stats_from_rollout("hopper")
    envs = make_vector_env("hopper", 2, horizon=4, normalization=norm, seed=7, max_episode_steps=10)
    again = make_vector_env("hopper", 2, horizon=4, normalization=norm, seed=7, max_episode_steps=10)
    assert envs.single_action_space.shape == (4, 3)
    obs, _ = envs.reset()
    np.testing.assert_array_equal(obs, again.reset()[0])
    assert obs.shape == (2, 11) and obs.dtype == np.float32
    actions = np.random.default_rng(0).uniform(-1, 1, size=(3, 2, 4, 3)).astype(np.float32)
    returns = np.zeros(2)
    for k in range(3):
        obs, rewards, _, truncations, infos = envs.step(actions[k])
        returns += rewards
        other = again.step(actions[k])
        np.testing.assert_array_equal(obs, other[0])
    # 10 env steps with chunks of 4: the third chunk executes 2 steps and truncates both sub-envs.
    np.testing.assert_array_equal(truncations, [True, True])
    final = infos["final_info"]
    np.testing.assert_array_equal(final["chunk_steps"], [2, 2])
    np.testing.assert_array_equal(final["episode"]["l"], [10, 10])
    np.testing.assert_allclose(final["episode"]["r"], returns, rtol=1e-12)  # raw (unnormalised) return
    for i in range(2):
        # The true final observation (normalised like every observation) differs from the reset one.
        assert infos["final_obs"][i].shape == (11,)
        assert not np.allclose(infos["final_obs"][i], obs[i])
    envs.close()
    again.close()


# ----------------------------------------------------------------------------------------- video


def _skip_without_rendering() -> None:
    import rlflow.envs.video  # noqa: F401  (sets MUJOCO_GL=egl unless chosen already)

    try:
        probe = gym.make("Hopper-v5", render_mode="rgb_array", width=32, height=32)
        probe.reset(seed=0)
        probe.render()
        probe.close()
    except Exception as exc:  # no EGL/OSMesa on this machine: nothing to test
        pytest.skip(f"MuJoCo cannot render here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {exc}")


def _robot_centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """Centre of the robot's (brown-orange) pixels as fractions of width and height; None: not in frame."""
    rgb = frame.astype(int)
    mask = (rgb[..., 0] > rgb[..., 1] + 30) & (rgb[..., 0] > rgb[..., 2] + 60)
    ys, xs = np.nonzero(mask)
    if len(xs) < 5:
        return None
    return float(xs.mean()) / frame.shape[1], float(ys.mean()) / frame.shape[0]


def test_rendered_frames_follow_the_robot():
    """rgb_array frames come from MuJoCo's tracking camera on the torso: a robot 5 m down the track is
    still in the middle of the frame (gymnasium's own free camera loses the hopper after ~1.5 m)."""
    import mujoco
    from rlflow.envs.tasks import make_raw_env

    _skip_without_rendering()
    env = make_env("hopper", render_mode="rgb_array", width=96, height=96)
    env.reset(seed=0)
    start = _robot_centroid(env.render())
    base = env.unwrapped
    viewer = base.mujoco_renderer.viewer
    torso = mujoco.mj_name2id(base.model, mujoco.mjtObj.mjOBJ_BODY, "torso")
    assert viewer.cam.type == mujoco.mjtCamera.mjCAMERA_TRACKING and viewer.cam.trackbodyid == torso
    base.data.qpos[0] += 5.0  # the hopper's x: 5 m forward
    mujoco.mj_forward(base.model, base.data)
    # MuJoCo 3.3 smooths a tracking camera's look-at point (it moves a fifth of the way per frame), so after
    # a 5 m jump it takes a few dozen frames to arrive; a walking robot moves a few cm per frame.
    for _ in range(60):
        later = _robot_centroid(env.render())
    assert viewer.cam.type == mujoco.mjtCamera.mjCAMERA_TRACKING  # not reset to a free camera per frame
    assert viewer.cam.lookat[0] == pytest.approx(base.data.subtree_com[torso][0], abs=1e-3)
    assert start is not None and later is not None
    assert abs(later[0] - 0.5) < 0.1 and abs(later[0] - start[0]) < 0.05
    env.close()

    # An explicit camera choice is left alone; non-rendering envs are untouched.
    fixed = make_raw_env("hopper", render_mode="rgb_array", width=32, height=32, camera_id=-1)
    assert fixed.unwrapped.mujoco_renderer.camera_id == -1
    fixed.close()
    plain = make_raw_env("hopper")
    assert plain.unwrapped.mujoco_renderer.camera_id == -1
    plain.close()


# Software EGL renders ~0.15 s per frame on a small CPU machine, hence the short mp4 clip.
@pytest.mark.parametrize(("suffix", "steps"), [(".gif", 30), (".mp4", 10)])
def test_record_video_writes_a_file(tmp_path, suffix, steps):
    from rlflow.envs.video import record_video

    _skip_without_rendering()
    if suffix == ".mp4":
        pytest.importorskip("imageio_ffmpeg")
    path = tmp_path / f"hopper{suffix}"
    result = record_video(
        "hopper", lambda obs: np.zeros((2, 3)), path, horizon=2, max_steps=steps, width=64, height=64
    )
    assert result["lengths"] == [steps]
    assert result["frames"] == steps + 1  # the reset frame + one per env step (not per chunk)
    assert len(result["returns"]) == 1 and np.isfinite(result["returns"][0])
    assert path.is_file() and path.stat().st_size > 0


def test_record_video_is_not_rendered_twice_for_the_same_policy(tmp_path, caplog):
    from rlflow.envs.video import record_video, sidecar_path

    _skip_without_rendering()
    path = tmp_path / "videos" / "final.gif"
    kwargs = {"horizon": 1, "max_steps": 5, "width": 32, "height": 32}
    first = record_video(
        "hopper", lambda obs: np.zeros((1, 3)), path, fingerprint={"policy": "abc"}, **kwargs
    )
    assert "skipped" not in first and first["frames"] == 6
    assert json.loads(sidecar_path(path).read_text())["fingerprint"]["policy"] == "abc"
    assert not list(path.parent.glob(".*partial*"))  # the temporary file was moved into place
    written = path.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="rlflow.envs.video"):
        again = record_video("hopper", lambda obs: 1 / 0, path, fingerprint={"policy": "abc"}, **kwargs)
    assert again == {**first, "skipped": True} and path.stat().st_mtime_ns == written
    assert "not rendering it again" in caplog.text
    # Another policy, or other render settings, render again.
    other = record_video("hopper", lambda obs: np.ones((1, 3)), path, fingerprint={"policy": "xyz"}, **kwargs)
    assert "skipped" not in other
    longer = record_video(
        "hopper",
        lambda obs: np.ones((1, 3)),
        path,
        fingerprint={"policy": "xyz"},
        **{**kwargs, "max_steps": 6},
    )
    assert "skipped" not in longer and longer["frames"] == 7


def test_an_interrupted_video_leaves_no_file(tmp_path):
    from rlflow.envs.video import record_video

    _skip_without_rendering()
    path = tmp_path / "final.gif"
    calls = []

    def act(obs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return np.zeros((1, 3))

    with pytest.raises(KeyboardInterrupt):
        record_video("hopper", act, path, max_steps=10, width=32, height=32, fingerprint={"policy": "a"})
    assert not path.exists() and not list(tmp_path.glob("*final*"))
