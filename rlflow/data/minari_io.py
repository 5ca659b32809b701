"""Demonstrations as local Minari datasets, through Minari's public API (``DataCollector`` is not needed:
the transitions are already recorded): :func:`save_minari` and :func:`load_minari`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlflow.data.demonstrations import ARRAY_KEYS, MINARI_HINT, Demonstrations, PathLike, episode_runs
from rlflow.utils.checkpoint import to_builtin

__all__ = ["load_minari", "save_minari"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Minari
# ---------------------------------------------------------------------------------------------------------


def import_minari() -> Any:
    try:
        import minari
    except ImportError as exc:
        raise ImportError(f"Minari datasets need the optional package minari; {MINARI_HINT}") from exc
    return minari


@contextlib.contextmanager
def minari_root(data_path: PathLike | None) -> Iterator[None]:
    """Point Minari at ``data_path`` (its datasets root) for the duration of the block.

    Minari reads its root from ``MINARI_DATASETS_PATH`` on every call (default ``~/.minari/datasets``);
    there is no argument for it, so the variable is set and restored. Not thread-safe.
    """
    if data_path is None:
        yield
        return
    key = "MINARI_DATASETS_PATH"
    previous = os.environ.get(key)
    os.environ[key] = os.fspath(Path(data_path).resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def save_minari(
    demos: Demonstrations,
    dataset_id: str,
    *,
    data_path: PathLike | None = None,
    env: str | None = None,
    algorithm_name: str | None = None,
    author: str | None = None,
    description: str | None = None,
) -> Path:
    """Write ``demos`` as a new local Minari dataset (HDF5; nothing is uploaded).

    Each episode gets ``len + 1`` observations (Minari's layout: the final observation is appended from
    ``next_observations``). rlflow's metadata is kept in the dataset's metadata as the JSON string
    ``rlflow_metadata``, so :func:`load_minari` restores it.

    Args:
        demos: the transitions.
        dataset_id: ``(namespace/)name-v<version>``, e.g. ``"rlflow/hopper-medium-v0"``; must not exist yet.
        data_path: Minari's datasets root; ``None`` uses ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``.
        env: gymnasium id recorded as the dataset's environment; ``None`` uses ``metadata["gym_id"]``
            (with the collection's ``max_episode_steps``), or records unbounded Box spaces if absent.
        algorithm_name, author, description: Minari metadata (defaults describe the collection).

    Returns:
        The dataset's directory.

    Raises:
        ImportError: minari is not installed (the message says how to install it).
        FileExistsError: a dataset with this id already exists under the root.
    """
    minari = import_minari()
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        parse_dataset_id(dataset_id)
    except ValueError as exc:
        raise ValueError(f"{exc} (e.g. 'rlflow/hopper-medium-v0')") from exc
    metadata = demos.metadata
    gym_id = env if env is not None else metadata.get("gym_id")
    starts, lengths = episode_runs(demos.episode_ids)
    buffers = []
    for index, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        stop = start + length
        buffers.append(
            EpisodeBuffer(
                id=index,  # Minari requires sequential ids from 0
                observations=np.concatenate(
                    [demos.observations[start:stop], demos.next_observations[stop - 1 : stop]]
                ),
                actions=demos.actions[start:stop],
                rewards=demos.rewards[start:stop],
                terminations=demos.terminals[start:stop],
                truncations=demos.timeouts[start:stop],
                infos={},
            )
        )
    spaces: dict[str, Any] = {}
    if gym_id is not None:
        env_spec = gym.spec(gym_id)
        if env is None and metadata.get("max_episode_steps") is not None:
            env_spec = dataclasses.replace(env_spec, max_episode_steps=int(metadata["max_episode_steps"]))
        spaces["env"] = env_spec
        # The recorded arrays are float32; MuJoCo's observation Box is float64. Declaring float32 spaces
        # with the env's bounds keeps Minari's spaces consistent with the stored data.
        probe = gym.make(env_spec)
        try:
            obs_space, act_space = probe.observation_space, probe.action_space
            spaces["observation_space"] = gym.spaces.Box(
                obs_space.low.astype(np.float32), obs_space.high.astype(np.float32), dtype=np.float32
            )
            spaces["action_space"] = gym.spaces.Box(
                act_space.low.astype(np.float32), act_space.high.astype(np.float32), dtype=np.float32
            )
        finally:
            probe.close()
    else:
        spaces["observation_space"] = gym.spaces.Box(-np.inf, np.inf, (demos.obs_dim,), dtype=np.float32)
        spaces["action_space"] = gym.spaces.Box(-np.inf, np.inf, (demos.act_dim,), dtype=np.float32)
    algorithm_name = algorithm_name or f"rlflow.collect ({metadata.get('policy_type', 'policy')})"
    if description is None:
        returns = demos.episode_returns()
        description = (
            f"{demos.num_episodes} episodes ({len(demos)} transitions) of {gym_id or 'an unknown env'} "
            f"collected by rlflow from {metadata.get('policy_dir', 'an unknown policy')} "
            f"(deterministic={metadata.get('deterministic')}, seed={metadata.get('seed')}); "
            f"return {returns.mean():.1f} +- {returns.std():.1f}."
        )
    with minari_root(data_path):
        path = get_dataset_path(dataset_id)
        if path.exists():
            raise FileExistsError(
                f"a Minari dataset {dataset_id!r} already exists at {path}; choose a new id or version"
            )
        try:
            dataset = _create_minari_dataset(
                minari, dataset_id, buffers, spaces, algorithm_name, author, description
            )
            dataset.storage.update_metadata(
                {"rlflow_metadata": json.dumps(to_builtin(metadata), sort_keys=True)}
            )
        except BaseException:
            # Minari creates the directory first: do not leave a half-written dataset that blocks the id.
            # It did not exist before this call (checked above), so only what Minari just wrote goes.
            shutil.rmtree(path, ignore_errors=True)
            raise
    logger.info("saved Minari dataset %s (%d episodes) to %s", dataset_id, demos.num_episodes, path)
    return path


def _create_minari_dataset(
    minari: Any,
    dataset_id: str,
    buffers: list[Any],
    spaces: dict[str, Any],
    algorithm_name: str | None,
    author: str | None,
    description: str,
) -> Any:
    """``minari.create_dataset_from_buffers`` without its warnings about unset provenance fields."""
    with warnings.catch_warnings():
        # Minari nags about provenance fields (author, e-mail, code link, eval env) that a local
        # dataset need not have.
        warnings.filterwarnings("ignore", message=r"`\w+` is set to None", category=UserWarning)
        return minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            algorithm_name=algorithm_name,
            author=author,
            description=description,
            **spaces,
        )


def load_minari(
    dataset_id: str, *, data_path: PathLike | None = None, download: bool = False
) -> Demonstrations:
    """Read a local Minari dataset (e.g. one written by :func:`save_minari`, or ``mujoco/hopper/medium-v0``
    fetched with ``minari download``) as :class:`Demonstrations`.

    Minari stores ``len + 1`` observations per episode: rows use the first ``len`` as ``observations``
    and the last ``len`` as ``next_observations``. ``timeouts`` are truncations that are not also
    terminations. Episode ids are Minari's.

    Args:
        dataset_id: the Minari id.
        data_path: Minari's datasets root (``None``: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).
        download: let Minari download a missing dataset from its hub (needs network access).

    Raises:
        ImportError: minari is not installed.
        FileNotFoundError: the dataset is not there (and ``download`` is false).
        ValueError: the dataset's observations or actions are not flat arrays (Dict / Tuple spaces).
    """
    minari = import_minari()
    with minari_root(data_path):
        try:
            dataset = minari.load_dataset(dataset_id, download=download)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc} (Minari's root: data_path or $MINARI_DATASETS_PATH; `minari download {dataset_id}` "
                "fetches hub datasets)"
            ) from exc
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*ARRAY_KEYS,)}
        for episode in dataset.iterate_episodes():
            obs, actions = episode.observations, episode.actions
            if not isinstance(obs, np.ndarray) or not isinstance(actions, np.ndarray):
                raise ValueError(
                    f"Minari dataset {dataset_id!r} has structured (Dict/Tuple) observations or actions; "
                    "rlflow needs flat Box arrays"
                )
            num = len(episode)
            if obs.shape[0] != num + 1:
                raise ValueError(
                    f"Minari dataset {dataset_id!r}, episode {episode.id}: {obs.shape[0]} observations for "
                    f"{num} steps (expected {num + 1})"
                )
            terminations = np.asarray(episode.terminations, dtype=bool)
            parts["observations"].append(obs[:-1].reshape(num, -1))
            parts["next_observations"].append(obs[1:].reshape(num, -1))
            parts["actions"].append(actions.reshape(num, -1))
            parts["rewards"].append(np.asarray(episode.rewards))
            parts["terminals"].append(terminations)
            parts["timeouts"].append(np.asarray(episode.truncations, dtype=bool) & ~terminations)
            parts["episode_ids"].append(np.full(num, int(episode.id), dtype=np.int64))
        raw_meta = dataset.storage.metadata
        env_spec = dataset.spec.env_spec
    if not parts["rewards"]:
        raise ValueError(f"Minari dataset {dataset_id!r} has no episodes")
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    metadata: dict[str, Any] = {}
    stored = raw_meta.get("rlflow_metadata")
    if isinstance(stored, str):
        with contextlib.suppress(json.JSONDecodeError):
            metadata.update(json.loads(stored))
    metadata.update(
        {
            "source": f"minari:{dataset_id}",
            "minari_version": str(getattr(minari, "__version__", "unknown")),
        }
    )
    if env_spec is not None:
        metadata.setdefault("gym_id", env_spec.id)
    demos = Demonstrations(**arrays, metadata=metadata)
    demos.metadata.setdefault("episode_returns", demos.episode_returns().tolist())
    demos.metadata.setdefault("episode_lengths", demos.episode_lengths().tolist())
    return demos
