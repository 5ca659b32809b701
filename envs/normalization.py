"""Min-max normalisation of observations and actions to ``[-1, 1]`` (ReinFlow / DPPO convention).

ReinFlow pre-trains its flow policies on demonstration data whose observations and actions were scaled
per dimension to ``[-1, 1]`` with the dataset's minimum and maximum, and fine-tunes them in an
environment that applies exactly the same maps. :class:`Normalization` holds those statistics, applies
the maps to numpy arrays or torch tensors of any leading shape, and saves / loads them as JSON next to a
checkpoint so that evaluation uses the statistics the policy was trained with.

The map for one dimension with data range ``[low, high]`` is::

    normalize(x)   = 2 * (x - low) / (high - low) - 1  =  (x - center) / half_range
    denormalize(y) = y * half_range + center
    center = (high + low) / 2,  half_range = (high - low) / 2

It is evaluated in the ``center`` / ``half_range`` form because that form is bit-exact for the identity
statistics (``low=-1, high=1`` gives ``center=0, half_range=1``) and keeps round trips within one or two
ulps otherwise.

Constant dimensions (``high == low``, e.g. a joint that never moved in the dataset) would divide by
zero; they use ``half_range = 1`` instead, i.e. they are only shifted: ``normalize(x) = x - low``, which
is ``0`` for the value seen in the data and stays finite (and exactly invertible) for any other value.

This module imports no gymnasium / MuJoCo, so statistics can be computed and saved without the extra.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from rlflow.utils.checkpoint import CheckpointError, read_json, write_json

__all__ = ["Normalization"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

# Written into the JSON file so that a file of another kind (or a future layout) is recognised as such.
_FORMAT = "rlflow.envs.Normalization"
_VERSION = 1
_FIELDS = ("obs_low", "obs_high", "act_low", "act_high")


def _as_vector(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 1-D numpy array (a copy), or ValueError naming the field."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.array(value, dtype=np.float64)  # np.array copies: the dataclass owns its arrays
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Normalization.{name} must be a 1-D array of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"Normalization.{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"Normalization.{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"Normalization.{name} has non-finite entries at indices {np.flatnonzero(~np.isfinite(arr)).tolist()}; "
            "min-max statistics must be finite (use Normalization.identity for unbounded observations)"
        )
    return arr


def _center_and_scale(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``center`` and ``half_range``; constant dimensions get a half range of 1 (see module doc)."""
    center = (high + low) / 2.0
    half_range = (high - low) / 2.0
    half_range = np.where(half_range > 0, half_range, 1.0)
    return center, half_range


def _apply(x: ArrayT, center: np.ndarray, scale: np.ndarray, *, inverse: bool, what: str) -> ArrayT:
    """``(x - center) / scale`` (or ``x * scale + center`` when ``inverse``) over the last axis of ``x``.

    Args:
        x: numpy array or torch tensor ``[..., dim]``.
        center, scale: float64 ``[dim]``.

    Returns:
        Same type and shape as ``x``. Floating inputs keep their dtype (and device); integer inputs are
        promoted to float64 (numpy) or torch's default float dtype (torch).
    """
    dim = center.shape[0]
    if isinstance(x, torch.Tensor):
        if x.ndim == 0 or x.shape[-1] != dim:
            raise ValueError(
                f"{what}: expected a tensor whose last dimension is {dim}, got shape {tuple(x.shape)}"
            )
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        c = torch.as_tensor(center, dtype=dtype, device=x.device)
        s = torch.as_tensor(scale, dtype=dtype, device=x.device)
        xf = x.to(dtype)
        return xf * s + c if inverse else (xf - c) / s
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[-1] != dim:
        raise ValueError(f"{what}: expected an array whose last dimension is {dim}, got shape {arr.shape}")
    out_dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    # Compute in float64 (the statistics' precision) and cast back, so float32 inputs are not degraded
    # by float32 statistics.
    a64 = arr.astype(np.float64, copy=False)
    out = a64 * scale + center if inverse else (a64 - center) / scale
    return out.astype(out_dtype, copy=False)


@dataclass(eq=False)
class Normalization:
    """Per-dimension min-max statistics mapping observations and actions to ``[-1, 1]``.

    Attributes:
        obs_low, obs_high: float64 ``[obs_dim]``, the observation range that maps to ``[-1, 1]``.
        act_low, act_high: float64 ``[act_dim]``, the action range that maps to ``[-1, 1]``.

    Inputs are converted to float64 1-D copies on construction; ``high >= low`` and finiteness are
    checked, and a :class:`ValueError` names any violation (mismatched lengths included). Treat an
    instance as immutable: the maps' centers and scales are precomputed on construction.
    """

    obs_low: np.ndarray
    obs_high: np.ndarray
    act_low: np.ndarray
    act_high: np.ndarray

    def __post_init__(self) -> None:
        for name in _FIELDS:
            setattr(self, name, _as_vector(getattr(self, name), name))
        for kind in ("obs", "act"):
            low: np.ndarray = getattr(self, f"{kind}_low")
            high: np.ndarray = getattr(self, f"{kind}_high")
            if low.shape != high.shape:
                raise ValueError(
                    f"Normalization.{kind}_low has {low.shape[0]} entries but {kind}_high has {high.shape[0]}; "
                    "both bounds must describe the same dimensions"
                )
            bad = np.flatnonzero(high < low)
            if bad.size:
                raise ValueError(
                    f"Normalization.{kind}_high < {kind}_low at indices {bad.tolist()}; were the bounds swapped?"
                )
        # Precomputed once: every env step normalises an observation and denormalises an action.
        self._obs_center, self._obs_scale = _center_and_scale(self.obs_low, self.obs_high)
        self._act_center, self._act_scale = _center_and_scale(self.act_low, self.act_high)

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def from_data(cls, observations: Any, actions: Any) -> Normalization:
        """Statistics from a dataset.

        Args:
            observations: ``[N, obs_dim]`` array-like (numpy, torch, nested lists).
            actions: ``[M, act_dim]`` array-like (usually ``M == N``, but not required).

        Returns:
            Per-dimension min / max over the rows. Constant columns give ``low == high`` (see module doc).
        """
        stats = {}
        for name, data in (("observations", observations), ("actions", actions)):
            if isinstance(data, torch.Tensor):
                data = data.detach().cpu().numpy()
            arr = np.asarray(data, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
                raise ValueError(
                    f"Normalization.from_data: {name} must be a non-empty [N, dim] array, got shape {arr.shape}"
                )
            if not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"Normalization.from_data: {name} contain NaN or inf; clean the dataset first"
                )
            stats[name] = (arr.min(axis=0), arr.max(axis=0))
        (obs_low, obs_high), (act_low, act_high) = stats["observations"], stats["actions"]
        return cls(obs_low=obs_low, obs_high=obs_high, act_low=act_low, act_high=act_high)

    @classmethod
    def identity(cls, obs_dim: int, act_low: Any, act_high: Any) -> Normalization:
        """Statistics for an environment without a dataset.

        Observations pass through unchanged (``low=-1, high=1`` is exactly the identity map); actions
        in ``[-1, 1]`` are mapped onto the environment's action bounds ``[act_low, act_high]`` (its Box).

        Args:
            obs_dim: observation size.
            act_low, act_high: ``[act_dim]`` finite action bounds.
        """
        if int(obs_dim) < 1:
            raise ValueError(f"Normalization.identity: obs_dim must be >= 1, got {obs_dim}")
        ones = np.ones(int(obs_dim), dtype=np.float64)
        return cls(obs_low=-ones, obs_high=ones, act_low=act_low, act_high=act_high)

    # ----------------------------------------------------------------------------------- properties

    @property
    def obs_dim(self) -> int:
        """Number of observation dimensions."""
        return int(self.obs_low.shape[0])

    @property
    def act_dim(self) -> int:
        """Number of action dimensions."""
        return int(self.act_low.shape[0])

    # ----------------------------------------------------------------------------------- maps

    def normalize_obs(self, obs: ArrayT) -> ArrayT:
        """Raw observation ``[..., obs_dim]`` -> normalised (``[-1, 1]`` inside the data range; not clipped)."""
        return _apply(obs, self._obs_center, self._obs_scale, inverse=False, what="normalize_obs")

    def denormalize_obs(self, obs: ArrayT) -> ArrayT:
        """Inverse of :meth:`normalize_obs`: ``[..., obs_dim]`` normalised -> raw."""
        return _apply(obs, self._obs_center, self._obs_scale, inverse=True, what="denormalize_obs")

    def normalize_action(self, action: ArrayT) -> ArrayT:
        """Raw action ``[..., act_dim]`` -> normalised (``[-1, 1]`` inside the data range; not clipped)."""
        return _apply(action, self._act_center, self._act_scale, inverse=False, what="normalize_action")

    def denormalize_action(self, action: ArrayT) -> ArrayT:
        """Inverse of :meth:`normalize_action`: ``[..., act_dim]`` normalised -> raw (not clipped)."""
        return _apply(action, self._act_center, self._act_scale, inverse=True, what="denormalize_action")

    # ----------------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists of floats; Python's float repr round-trips float64 exactly)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            **{name: getattr(self, name).tolist() for name in _FIELDS},
        }

    def save(self, path: PathLike) -> None:
        """Atomically write the statistics to ``path`` as JSON."""
        write_json(path, self.to_dict())
        logger.debug("saved normalization statistics to %s", path)

    @classmethod
    def load(cls, path: PathLike) -> Normalization:
        """Read statistics written by :meth:`save`.

        Raises:
            CheckpointError: the file is missing, is not JSON, or is not a normalization file.
            ValueError: the file's bounds are inconsistent (mismatched lengths, ``high < low``, ...);
                the message names the file.
        """
        data = read_json(path, what="normalization statistics")
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CheckpointError(
                f"{path} is not an rlflow normalization file (expected a JSON object with "
                f"format={_FORMAT!r}); point to the normalization.json saved with the policy"
            )
        if data.get("version") != _VERSION:
            raise CheckpointError(
                f"{path} has normalization format version {data.get('version')!r}, this rlflow reads version "
                f"{_VERSION}; re-save it with this version"
            )
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise CheckpointError(
                f"{path} lacks the field(s) {missing}; the file is incomplete — regenerate it"
            )
        try:
            return cls(**{name: data[name] for name in _FIELDS})
        except ValueError as exc:
            raise ValueError(f"invalid normalization statistics in {path}: {exc}") from exc

    # ----------------------------------------------------------------------------------- comparison

    def __eq__(self, other: object) -> bool:
        # The dataclass-generated __eq__ would compare arrays with ``==`` and fail on truthiness.
        if not isinstance(other, Normalization):
            return NotImplemented
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for n in _FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable
