"""Demonstration datasets: collect them from a saved policy, store them, and turn them into BC data.

The robotics pipeline is *Gaussian PPO -> collect demonstrations -> behaviour cloning of a flow policy
-> ReinFlow fine-tuning*. This module is the second and the start of the third step:

* :func:`collect_demonstrations` rolls a saved policy (``FlowPolicy`` or ``GaussianPolicy``) out in a
  MuJoCo vector env for an exact number of episodes and records **raw** (unnormalised) transitions;
* :class:`Demonstrations` holds them with D4RL's key names and saves / loads them as ``.npz``
  (:meth:`Demonstrations.save_npz`, :meth:`Demonstrations.load_npz`) or as a local Minari dataset
  (:func:`save_minari`, :func:`load_minari`);
* :func:`chunk_demonstrations` and :func:`bc_data_from_demonstrations` turn transitions into
  (observation, action chunk) pairs normalised to ``[-1, 1]`` for flow-matching behaviour cloning;
* :class:`CollectConfig` / :func:`collect` are the ``rlflow collect`` command.

Decisions worth knowing:

* **Action chunks during collection.** The env runs with horizon 1 so that every env step's raw
  observation is recorded, while a policy with ``horizon > 1`` still acts the way it was trained and
  will be evaluated: it is queried once per chunk and the chunk is executed open loop, one action per
  env step, exactly as :class:`rlflow.envs.ActionChunk` would (the rest of a chunk is discarded when
  the episode ends). Each recorded row is one env step: ``actions[t]`` is the action executed at
  ``observations[t]`` (not a chunk).
* **Which episodes are kept.** Episodes are assigned to the sub-envs up front (sub-env ``i`` runs
  ``episodes // num_envs`` episodes, plus one for the first ``episodes % num_envs``). Keeping the first
  ``episodes`` episodes to *finish* instead would over-represent short (failed) episodes.
* **End flags.** ``terminals`` marks true MDP terminations; ``timeouts`` marks time-limit truncations
  that are not also terminations, so the last row of every collected episode has exactly one of them.
* **Chunk padding.** :func:`chunk_demonstrations` pads chunks that run past the end of an episode by
  repeating that episode's last action (as DPPO / ReinFlow build their datasets), so every time step
  gives a training sample and chunks never mix two episodes.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlflow.data.datasets import FlowMatchingData
from rlflow.envs.normalization import Normalization
from rlflow.utils.checkpoint import atomic_file, to_builtin

__all__ = [
    "Demonstrations",
    "bc_data_from_demonstrations",
    "chunk_demonstrations",
    "load_demonstrations",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: ``policy`` value of ``rlflow collect`` that selects the task's scripted expert instead of a saved policy.
SCRIPTED_POLICY = "scripted"

# Written into every file's metadata so a later layout can be told apart.
DEMONSTRATIONS_FORMAT = "rlflow.Demonstrations"
DEMONSTRATIONS_VERSION = 1
# npz array names; the float/bool ones follow D4RL (``next_observations`` as in d4rl.qlearning_dataset).
ARRAY_KEYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminals",
    "timeouts",
    "episode_ids",
)
_METADATA_KEY = "metadata"
MINARI_HINT = 'install it with: pip install "minari[hdf5]"'


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def episode_runs(episode_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start row and length of each run of equal ids: ``(starts [E], lengths [E])`` in row order."""
    if episode_ids.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    boundaries = np.flatnonzero(episode_ids[1:] != episode_ids[:-1]) + 1
    starts = np.concatenate([[0], boundaries]).astype(np.int64)
    ends = np.concatenate([boundaries, [episode_ids.size]]).astype(np.int64)
    return starts, ends - starts


def _nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Indices of the rows (first axis) of a float array that hold a NaN or inf."""
    bad = ~np.isfinite(array)
    if bad.ndim > 1:
        bad = bad.reshape(bad.shape[0], -1).any(axis=1)
    return np.flatnonzero(bad)


@dataclass(eq=False)
class Demonstrations:
    """Transitions grouped by episode, raw (unnormalised), with D4RL's key names.

    Row ``t`` is one env step: the agent saw ``observations[t]``, executed ``actions[t]`` (clipped to
    the env's action bounds), got ``rewards[t]`` and reached ``next_observations[t]`` (the true next
    state, also at the end of an episode). Rows of an episode are contiguous and in time order.

    Attributes:
        observations: float ``[N, obs_dim]``.
        actions: float ``[N, act_dim]``, the env actions actually executed.
        rewards: float ``[N]``.
        next_observations: float ``[N, obs_dim]``; within an episode ``next_observations[t] ==
            observations[t + 1]``, at its last row the episode's final observation.
        terminals: bool ``[N]``, the MDP terminated after this step (no bootstrap).
        timeouts: bool ``[N]``, the episode was cut by a time limit after this step (and did not
            terminate).
        episode_ids: int ``[N]``; each id occupies one contiguous run of rows.
        metadata: JSON-ready dict (task, gym id, policy dir, deterministic flag, seed, episode returns
            and lengths, ...).

    Construction checks shapes, dtypes, finiteness and episode contiguity and raises a
    :class:`ValueError` naming the problem (and, for non-finite values, how many rows are affected).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_ids: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {name: np.asarray(getattr(self, name)) for name in ARRAY_KEYS}
        expected_ndim = {
            "observations": 2,
            "actions": 2,
            "rewards": 1,
            "next_observations": 2,
            "terminals": 1,
            "timeouts": 1,
            "episode_ids": 1,
        }
        for name, ndim in expected_ndim.items():
            if arrays[name].ndim != ndim:
                layout = "[N]" if ndim == 1 else "[N, dim]"
                raise ValueError(f"Demonstrations.{name} must be {layout}, got shape {arrays[name].shape}")
        num = arrays["observations"].shape[0]
        if num == 0:
            raise ValueError("Demonstrations must hold at least one transition, got 0 rows")
        mismatched = {name: a.shape[0] for name, a in arrays.items() if a.shape[0] != num}
        if mismatched:
            raise ValueError(
                f"Demonstrations arrays must all have N = {num} rows (as observations); got {mismatched}"
            )
        if arrays["next_observations"].shape != arrays["observations"].shape:
            raise ValueError(
                f"Demonstrations.next_observations has shape {arrays['next_observations'].shape}, "
                f"observations {arrays['observations'].shape}; they must match"
            )
        for name in ("observations", "actions", "rewards", "next_observations"):
            if not (
                np.issubdtype(arrays[name].dtype, np.floating)
                or np.issubdtype(arrays[name].dtype, np.integer)
            ):
                raise ValueError(f"Demonstrations.{name} must be numeric, got dtype {arrays[name].dtype}")
            if not np.issubdtype(arrays[name].dtype, np.floating):
                arrays[name] = arrays[name].astype(np.float32)
            bad = _nonfinite_rows(arrays[name])
            if bad.size:
                raise ValueError(
                    f"Demonstrations.{name} contain NaN or inf in {bad.size} of {num} rows (first at row "
                    f"{int(bad[0])}); clean the dataset (or drop those episodes) first"
                )
        for name in ("terminals", "timeouts"):
            flags = arrays[name]
            if flags.dtype != np.bool_:
                # 0/1 integers or floats (as some D4RL files store them) are accepted; anything else is not.
                if not (np.issubdtype(flags.dtype, np.number) and np.isin(flags, (0, 1)).all()):
                    raise ValueError(
                        f"Demonstrations.{name} must be booleans (or 0/1), got dtype {flags.dtype}"
                    )
                arrays[name] = flags.astype(bool)
        if not np.issubdtype(arrays["episode_ids"].dtype, np.integer):
            raise ValueError(
                f"Demonstrations.episode_ids must be integers, got dtype {arrays['episode_ids'].dtype}"
            )
        starts, _ = episode_runs(arrays["episode_ids"])
        num_unique = np.unique(arrays["episode_ids"]).size
        if starts.size != num_unique:
            raise ValueError(
                f"Demonstrations.episode_ids form {starts.size} runs but hold {num_unique} distinct ids: the "
                "rows of each episode must be contiguous (sort the rows by episode, keeping time order)"
            )
        if not isinstance(self.metadata, dict):
            raise ValueError(f"Demonstrations.metadata must be a dict, got {type(self.metadata).__name__}")
        for name, array in arrays.items():
            setattr(self, name, array)

    # ----------------------------------------------------------------------------------- properties

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def num_episodes(self) -> int:
        return int(episode_runs(self.episode_ids)[0].size)

    def episode_lengths(self) -> np.ndarray:
        """Rows per episode ``[E]`` (int64), in row order."""
        return episode_runs(self.episode_ids)[1]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted reward sum per episode ``[E]`` (float64), in row order."""
        starts, _ = episode_runs(self.episode_ids)
        return np.add.reduceat(self.rewards.astype(np.float64), starts)

    # ----------------------------------------------------------------------------------- persistence

    def save_npz(self, path: PathLike) -> Path:
        """Atomically write a compressed ``.npz`` (readable with ``np.load(path, allow_pickle=False)``).

        The arrays are stored under their attribute names; ``metadata`` as a one-element unicode array
        holding a JSON string (no pickled objects).

        Returns:
            ``path`` as a :class:`~pathlib.Path` (written as given: numpy's ``.npz`` suffix is not added).
        """
        path = Path(path)
        text = json.dumps(to_builtin(self.metadata), sort_keys=True, allow_nan=False)
        payload = {name: getattr(self, name) for name in ARRAY_KEYS}
        with atomic_file(path) as tmp:
            # A file object, not a path: np.savez would append ".npz" to the temporary's name.
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **payload, **{_METADATA_KEY: np.array([text])})
        logger.info("saved %d transitions (%d episodes) to %s", len(self), self.num_episodes, path)
        return path

    @classmethod
    def load_npz(cls, path: PathLike) -> Demonstrations:
        """Read a file written by :meth:`save_npz`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not an npz, lacks arrays (they are named), holds pickled objects,
                unreadable metadata, or inconsistent arrays (mismatched shapes, NaN rows, ...); the
                message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"demonstrations file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                contents = {key: npz[key] for key in npz.files}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npz file ({exc}); re-create it") from exc
        except ValueError as exc:  # e.g. "Object arrays cannot be loaded when allow_pickle=False"
            raise ValueError(f"{path} could not be read safely: {exc}") from exc
        missing = [key for key in (*ARRAY_KEYS, _METADATA_KEY) if key not in contents]
        if missing:
            raise ValueError(
                f"{path} lacks the array(s) {missing} (it has {sorted(contents)}); demonstrations files are "
                "written by `rlflow collect` / Demonstrations.save_npz"
            )
        extra = sorted(set(contents) - {*ARRAY_KEYS, _METADATA_KEY})
        if extra:
            logger.warning("%s: ignoring unknown arrays %s", path, extra)
        arrays = {key: contents[key] for key in ARRAY_KEYS}
        meta_array = contents[_METADATA_KEY]
        try:
            if meta_array.shape != (1,) or meta_array.dtype.kind != "U":
                raise ValueError(
                    f"expected a one-element string array, got {meta_array.dtype} {meta_array.shape}"
                )
            metadata = json.loads(str(meta_array[0]))
            if not isinstance(metadata, dict):
                raise ValueError(f"expected a JSON object, got {type(metadata).__name__}")
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: invalid '{_METADATA_KEY}' array: {exc}") from exc
        try:
            return cls(**arrays, metadata=metadata)
        except ValueError as exc:
            raise ValueError(f"invalid demonstrations in {path}: {exc}") from exc


def load_demonstrations(path: PathLike) -> Demonstrations:
    """Alias of :meth:`Demonstrations.load_npz`."""
    return Demonstrations.load_npz(path)


# ---------------------------------------------------------------------------------------------------------
# Chunking and behaviour-cloning data
# ---------------------------------------------------------------------------------------------------------


def chunk_demonstrations(demos: Demonstrations, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(observation, action chunk) pairs: one sample per time step.

    The target of step ``t`` is ``actions[t : t + horizon]`` of the same episode. A chunk that runs
    past the episode's last step is padded by repeating that last action (DPPO / ReinFlow do the
    same), so every step gives a sample and no chunk mixes two episodes.

    Args:
        demos: the transitions (raw or normalised: no scaling happens here).
        horizon: chunk length ``>= 1``.

    Returns:
        ``conditions [N, obs_dim]`` (the observations, same dtype) and ``targets [N, horizon, act_dim]``.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    starts, lengths = episode_runs(demos.episode_ids)
    # Last row of each row's episode, then clamp row + k to it: the padding by repetition.
    last_row = np.repeat(starts + lengths - 1, lengths)  # [N]
    index = np.arange(len(demos))[:, None] + np.arange(int(horizon))[None, :]  # [N, horizon]
    index = np.minimum(index, last_row[:, None])
    return demos.observations, demos.actions[index]


def bc_data_from_demonstrations(
    source: PathLike | Demonstrations, horizon: int
) -> tuple[FlowMatchingData, Normalization]:
    """Behaviour-cloning data from a demonstrations file, normalised to ``[-1, 1]`` by its min/max.

    Args:
        source: an ``.npz`` written by :meth:`Demonstrations.save_npz`, or a :class:`Demonstrations`.
        horizon: action chunk length of the policy to train.

    Returns:
        ``FlowMatchingData`` with float32 ``conditions [N, obs_dim]`` and ``targets [N, horizon,
        act_dim]`` (both in ``[-1, 1]``), and the :class:`Normalization` that maps raw data there. Save
        it with the pretrained policy (``extra_json={"normalization": normalization.to_dict()}``) so
        that fine-tuning and evaluation apply the same maps.
    """
    demos = source if isinstance(source, Demonstrations) else Demonstrations.load_npz(source)
    normalization = Normalization.from_data(demos.observations, demos.actions)
    conditions, targets = chunk_demonstrations(demos, horizon)
    data = FlowMatchingData(
        targets=torch.as_tensor(
            normalization.normalize_action(targets.astype(np.float64)), dtype=torch.float32
        ),
        conditions=torch.as_tensor(
            normalization.normalize_obs(conditions.astype(np.float64)), dtype=torch.float32
        ),
    )
    return data, normalization
