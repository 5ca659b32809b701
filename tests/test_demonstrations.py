"""rlflow.data.demonstrations: collection from a saved policy, npz / Minari storage, chunking, BC data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from rlflow.envs import Normalization  # noqa: E402

from rlflow.config import ConfigError  # noqa: E402
from rlflow.data import FlowMatchingData  # noqa: E402
from rlflow.data.collect import CollectConfig, collect, collect_demonstrations  # noqa: E402
from rlflow.data.demonstrations import Demonstrations, bc_data_from_demonstrations, chunk_demonstrations  # noqa: E402
from rlflow.data.minari_io import load_minari, save_minari  # noqa: E402
from rlflow.policies.gaussian import GaussianPolicy, GaussianPolicyConfig  # noqa: E402
from rlflow.utils.checkpoint import CheckpointError  # noqa: E402

TASK = "inverted_pendulum"  # obs_dim 4, act_dim 1, actions in [-3, 3]
OBS_DIM, ACT_DIM, ACT_BOUND = 4, 1, 3.0


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo appends compiler warnings to ./MUJOCO_LOG.TXT; keep that file out of the repository."""
    monkeypatch.chdir(tmp_path)


def _save_policy(directory: Path, *, horizon: int = 1, init_log_std: float = 1.0, seed: int = 0) -> Path:
    """A tiny Gaussian policy with identity statistics. A large std makes some actions hit the bounds."""
    torch.manual_seed(seed)
    config = GaussianPolicyConfig(
        obs_dim=OBS_DIM, act_dim=ACT_DIM, horizon=horizon, hidden_dims=[8], init_log_std=init_log_std
    )
    policy = GaussianPolicy(config)
    normalization = Normalization.identity(OBS_DIM, [-ACT_BOUND], [ACT_BOUND])
    return policy.save_pretrained(directory, extra_json={"normalization": normalization.to_dict()})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return _save_policy(tmp_path_factory.mktemp("policy") / "policy")


@pytest.fixture(scope="module")
def demos(policy_dir, tmp_path_factory) -> Demonstrations:
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("mujoco_log"))
    try:
        return collect_demonstrations(policy_dir, TASK, episodes=3, num_envs=2, seed=3, max_episode_steps=25)
    finally:
        os.chdir(cwd)


def _synthetic() -> Demonstrations:
    """Two episodes, lengths 3 (id 7) and 2 (id 2); action of row t is [t, 10 t]."""
    rows = np.arange(5, dtype=np.float32)
    return Demonstrations(
        observations=np.stack([rows, -rows], axis=1),
        actions=np.stack([rows, 10 * rows], axis=1),
        rewards=np.ones(5, dtype=np.float32),
        next_observations=np.stack([rows + 1, -rows - 1], axis=1),
        terminals=np.array([False, False, True, False, False]),
        timeouts=np.array([False, False, False, False, True]),
        episode_ids=np.array([7, 7, 7, 2, 2]),
    )


# ------------------------------------------------------------------------------------------- collection


def test_collect_shapes_boundaries_and_bounds(demos):
    n = len(demos)
    assert demos.observations.shape == (n, OBS_DIM) and demos.next_observations.shape == (n, OBS_DIM)
    assert demos.actions.shape == (n, ACT_DIM)
    assert (
        demos.rewards.shape
        == demos.terminals.shape
        == demos.timeouts.shape
        == demos.episode_ids.shape
        == (n,)
    )
    assert demos.terminals.dtype == np.bool_ and demos.timeouts.dtype == np.bool_

    # Exactly the requested episodes, contiguous, ids 0..2.
    assert demos.num_episodes == 3
    assert sorted(np.unique(demos.episode_ids).tolist()) == [0, 1, 2]
    lengths = demos.episode_lengths()
    assert lengths.sum() == n and (lengths <= 25).all()

    # Every episode's last row (and only it) carries exactly one end flag; timeouts only at the limit.
    ends = np.cumsum(lengths) - 1
    flag = demos.terminals.astype(int) + demos.timeouts.astype(int)
    assert (flag[ends] == 1).all()
    assert flag.sum() == 3
    assert (lengths[demos.timeouts[ends]] == 25).all()

    # Within an episode the next observation is the following row's observation.
    inner = np.setdiff1d(np.arange(n), ends)
    np.testing.assert_array_equal(demos.next_observations[inner], demos.observations[inner + 1])

    # Recorded actions are the executed, clipped ones; with std e * 3 some are clipped to the bounds.
    assert demos.actions.min() >= -ACT_BOUND and demos.actions.max() <= ACT_BOUND
    assert np.isin(np.abs(demos.actions), [ACT_BOUND]).any()


def test_collect_metadata_matches_rewards(demos, policy_dir):
    meta = demos.metadata
    assert meta["task"] == TASK and meta["gym_id"] == "InvertedPendulum-v5"
    assert meta["policy_dir"] == str(Path(policy_dir).resolve())
    assert meta["deterministic"] is False and meta["seed"] == 3 and meta["max_episode_steps"] == 25
    np.testing.assert_allclose(meta["episode_returns"], demos.episode_returns(), rtol=1e-6)
    assert meta["episode_lengths"] == demos.episode_lengths().tolist()
    json.dumps(meta)  # JSON-ready


def test_collect_is_reproducible_and_chunked_policies_act_open_loop(tmp_path, demos, policy_dir):
    again = collect_demonstrations(policy_dir, TASK, episodes=3, num_envs=2, seed=3, max_episode_steps=25)
    np.testing.assert_array_equal(again.observations, demos.observations)
    np.testing.assert_array_equal(again.actions, demos.actions)

    # horizon 3, deterministic: the policy is queried at t = 0, 3, 6, ... of each episode and the
    # chunk's actions are executed (and recorded) one per env step.
    chunked_dir = _save_policy(tmp_path / "chunked", horizon=3, init_log_std=-1.0, seed=1)
    chunked = collect_demonstrations(
        chunked_dir, TASK, episodes=2, num_envs=2, deterministic=True, max_episode_steps=8
    )
    policy = GaussianPolicy.from_pretrained(chunked_dir)
    starts = np.concatenate([[0], np.cumsum(chunked.episode_lengths())[:-1]])
    for start, length in zip(starts, chunked.episode_lengths(), strict=True):
        for offset in range(0, length, 3):
            row = start + offset
            with torch.no_grad():
                mean = policy.deterministic_action(torch.as_tensor(chunked.observations[row : row + 1]))[0]
            expected = np.clip(mean.numpy() * ACT_BOUND, -ACT_BOUND, ACT_BOUND)  # identity statistics
            executed = chunked.actions[row : min(row + 3, start + length)]
            np.testing.assert_allclose(executed, expected[: len(executed)], rtol=1e-5, atol=1e-6)


def test_collect_rejects_mismatched_or_unknown_policies(tmp_path, policy_dir):
    with pytest.raises(ConfigError, match="does not fit task"):
        collect_demonstrations(policy_dir, "hopper", episodes=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "something_else", "config": {}}))
    with pytest.raises(CheckpointError, match="model_type='something_else'"):
        collect_demonstrations(bad, TASK, episodes=1)
    with pytest.raises(ValueError, match="episodes must be"):
        collect_demonstrations(policy_dir, TASK, episodes=0)


# ------------------------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path, demos):
    path = demos.save_npz(tmp_path / "sub" / "demos.npz")
    with np.load(path, allow_pickle=False) as raw:  # plain arrays only, no pickles
        assert "metadata" in raw.files
    loaded = Demonstrations.load_npz(path)
    for name in (
        "observations",
        "actions",
        "rewards",
        "next_observations",
        "terminals",
        "timeouts",
        "episode_ids",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(demos, name))
        assert getattr(loaded, name).dtype == getattr(demos, name).dtype
    assert loaded.metadata == demos.metadata


def _write_npz(path: Path, demos: Demonstrations, **changes) -> Path:
    arrays = {
        name: getattr(demos, name)
        for name in (
            "observations",
            "actions",
            "rewards",
            "next_observations",
            "terminals",
            "timeouts",
            "episode_ids",
        )
    }
    arrays["metadata"] = np.array([json.dumps({"task": "x"})])
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_errors(tmp_path):
    demos = _synthetic()
    missing = tmp_path / "nothing.npz"
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        Demonstrations.load_npz(missing)
    with pytest.raises(ValueError, match=r"lacks the array\(s\) \['timeouts', 'episode_ids'\]"):
        Demonstrations.load_npz(_write_npz(tmp_path / "a.npz", demos, timeouts=None, episode_ids=None))
    with pytest.raises(ValueError, match="must all have N = 5 rows.*'actions': 4"):
        Demonstrations.load_npz(_write_npz(tmp_path / "b.npz", demos, actions=demos.actions[:4]))
    nan_obs = demos.observations.copy()
    nan_obs[[1, 3], 0] = np.nan
    with pytest.raises(
        ValueError, match=r"observations contain NaN or inf in 2 of 5 rows \(first at row 1\)"
    ):
        Demonstrations.load_npz(_write_npz(tmp_path / "c.npz", demos, observations=nan_obs))
    with pytest.raises(ValueError, match="contiguous"):
        Demonstrations.load_npz(_write_npz(tmp_path / "d.npz", demos, episode_ids=np.array([7, 2, 7, 2, 2])))
    with pytest.raises(ValueError, match="invalid 'metadata'"):
        Demonstrations.load_npz(_write_npz(tmp_path / "e.npz", demos, metadata=np.array(["{not json"])))
    with pytest.raises(ValueError, match="could not be read safely"):
        Demonstrations.load_npz(
            _write_npz(tmp_path / "f.npz", demos, metadata=np.array([{"a": 1}], dtype=object))
        )
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="g.npz"):
        Demonstrations.load_npz(garbage)


# ------------------------------------------------------------------------------------------- chunking / BC


def test_chunking_by_hand():
    conditions, targets = chunk_demonstrations(_synthetic(), 3)
    np.testing.assert_array_equal(conditions, _synthetic().observations)
    a = _synthetic().actions  # row t -> [t, 10 t]
    expected = np.stack(
        [
            [a[0], a[1], a[2]],
            [a[1], a[2], a[2]],  # padded with the episode's last action
            [a[2], a[2], a[2]],
            [a[3], a[4], a[4]],  # never reaches into the other episode
            [a[4], a[4], a[4]],
        ]
    )
    assert targets.shape == (5, 3, 2)
    np.testing.assert_array_equal(targets, expected)
    _, single = chunk_demonstrations(_synthetic(), 1)
    np.testing.assert_array_equal(single[:, 0], a)
    with pytest.raises(ValueError, match="horizon"):
        chunk_demonstrations(_synthetic(), 0)


def test_bc_data_is_normalised(tmp_path, demos):
    path = demos.save_npz(tmp_path / "demos.npz")
    data, normalization = bc_data_from_demonstrations(path, horizon=4)
    assert isinstance(data, FlowMatchingData)
    assert data.targets.shape == (len(demos), 4, ACT_DIM) and data.conditions.shape == (len(demos), OBS_DIM)
    assert data.targets.dtype == torch.float32 and data.conditions.dtype == torch.float32
    assert data.targets.abs().max() <= 1.0 + 1e-6 and data.conditions.abs().max() <= 1.0 + 1e-6
    assert data.conditions.amin(0).allclose(torch.tensor(-1.0)) and data.conditions.amax(0).allclose(
        torch.tensor(1.0)
    )
    assert normalization == Normalization.from_data(demos.observations, demos.actions)
    # Denormalising gives back the raw chunk.
    _, raw_targets = chunk_demonstrations(demos, 4)
    np.testing.assert_allclose(normalization.denormalize_action(data.targets.numpy()), raw_targets, atol=1e-5)


# ------------------------------------------------------------------------------------------- CLI entry


def test_collect_entry_writes_npz_and_summary(tmp_path, policy_dir):
    with pytest.raises(ConfigError, match="nothing would be written"):
        CollectConfig(policy=str(policy_dir), task=TASK)
    with pytest.raises(ConfigError, match="'episodes' must be >= 1, got 0"):
        CollectConfig(policy=str(policy_dir), task=TASK, episodes=0, output="x.npz")
    output = tmp_path / "out" / "demos.npz"
    summary = collect(
        CollectConfig(
            policy=str(policy_dir),
            task=TASK,
            episodes=2,
            num_envs=4,
            max_episode_steps=10,
            output=str(output),
        )
    )
    loaded = Demonstrations.load_npz(output)
    assert summary["episodes"] == loaded.num_episodes == 2
    assert summary["transitions"] == len(loaded)
    assert summary["return_mean"] == pytest.approx(float(np.mean(loaded.metadata["episode_returns"])))
    assert summary["output"] == str(output) and summary["minari_path"] is None


# ------------------------------------------------------------------------------------------- Minari


def test_minari_round_trip(tmp_path, demos):
    pytest.importorskip("minari")
    pytest.importorskip("h5py")
    before = os.environ.get("MINARI_DATASETS_PATH")
    root = tmp_path / "minari"
    path = save_minari(demos, "rlflow/pendulum-test-v0", data_path=root)
    assert path == (root / "rlflow" / "pendulum-test-v0").resolve() and path.is_dir()
    assert os.environ.get("MINARI_DATASETS_PATH") == before  # restored
    loaded = load_minari("rlflow/pendulum-test-v0", data_path=root)
    for name in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(demos, name))
    np.testing.assert_array_equal(loaded.episode_lengths(), demos.episode_lengths())
    assert loaded.metadata["episode_returns"] == demos.metadata["episode_returns"]
    assert loaded.metadata["gym_id"] == "InvertedPendulum-v5"
    assert loaded.metadata["source"] == "minari:rlflow/pendulum-test-v0"

    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        dataset = minari.load_dataset("rlflow/pendulum-test-v0")
        assert dataset.total_episodes == 3 and dataset.total_steps == len(demos)
        assert dataset.spec.env_spec.max_episode_steps == 25  # the collection's time limit
        first = next(iter(dataset.iterate_episodes()))
        assert first.observations.shape == (len(first) + 1, OBS_DIM)  # Minari's N + 1 observations
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before

    with pytest.raises(FileExistsError, match="already exists"):
        save_minari(demos, "rlflow/pendulum-test-v0", data_path=root)
    with pytest.raises(ValueError, match="Malformed dataset ID"):
        save_minari(demos, "no version", data_path=root)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_minari("rlflow/absent-v0", data_path=root)
