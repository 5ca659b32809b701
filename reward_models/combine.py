"""Weighted combinations of named rewards, and the registry that builds them from a config mapping.

A recipe names its rewards with weights::

    rewards:
      shapes_verifier: 1.0
      jpeg_compressibility: {weight: 0.1, quality: 90}
      remote: {url: "http://127.0.0.1:8765", weight: 1.0, timeout_s: 10}
      aesthetic: {type: remote, url: "http://10.0.0.7:8765"}    # any name, with an explicit type

:func:`build_rewards` turns that into a :class:`WeightedRewards`, whose call returns a
:class:`RewardOutput`: the weighted total (what GRPO normalises into advantages) and every raw component
(what trainers log as ``rewards/<name>/mean``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rlflow.config import ConfigError
from rlflow.worlds.shapes.oracle import ShapesOracle
from rlflow.worlds.shapes.verifier import ShapesVerifier

from .base import RewardOutput, as_reward_vector
from .image_rewards import Brightness, Colorfulness, JpegCompressibility
from .learned import LearnedReward
from .remote import RemoteReward

__all__ = ["REWARDS", "RewardOutput", "WeightedRewards", "build_reward", "build_rewards"]


RewardFactory = Callable[..., Callable[[Tensor, Sequence[str]], Any]]

REWARDS: dict[str, RewardFactory] = {
    "shapes_verifier": ShapesVerifier,
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": lambda **kwargs: JpegCompressibility(sign=-1.0, **kwargs),
    "colorfulness": Colorfulness,
    "brightness": Brightness,
    "remote": RemoteReward,
    "learned": LearnedReward,
    "shapes_oracle": ShapesOracle,
}
"""Reward name -> factory (keyword arguments from the config) returning a reward callable."""


class WeightedRewards:
    """``total = sum_i weights[i] * components[i](images, prompts)``, keeping every component for logging.

    A component may return a Tensor [B], anything ``torch.as_tensor`` accepts, or a :class:`RewardOutput`
    (its ``total`` is used). Components run in the order given.
    """

    def __init__(self, components: Mapping[str, Callable[..., Any]], weights: Mapping[str, float]) -> None:
        if not components:
            raise ValueError("WeightedRewards needs at least one reward component")
        if set(components) != set(weights):
            raise ValueError(
                f"reward weights must name exactly the components: components {sorted(components)}, "
                f"weights {sorted(weights)}"
            )
        for name, weight in weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {name!r} must be a finite number, got {weight!r}")
        self.components: dict[str, Callable[..., Any]] = dict(components)
        self.weights: dict[str, float] = {name: float(weights[name]) for name in components}

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> RewardOutput:
        batch = images.shape[0]
        values = {
            name: as_reward_vector(fn(images, prompts), name, batch) for name, fn in self.components.items()
        }
        total = torch.zeros(batch, dtype=torch.float32)
        for name, value in values.items():
            total += self.weights[name] * value
        return RewardOutput(total=total, components=values)

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g} * {name}" for name, w in self.weights.items())
        return f"WeightedRewards({terms})"


def build_reward(name: str, **kwargs: Any) -> Callable[..., Any]:
    """One reward from the registry; unknown names and bad arguments raise ``ConfigError`` (a ValueError)."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments {sorted(kwargs)} for reward {name!r}: {exc}") from None


def build_rewards(spec: Mapping[str, float | Mapping[str, Any]]) -> WeightedRewards:
    """Build a :class:`WeightedRewards` from ``{name: weight}`` or ``{name: {weight: w, type: t, **kwargs}}``.

    ``type`` (default: the name itself) picks the factory in :data:`REWARDS`; the remaining keys are its
    keyword arguments; ``weight`` defaults to 1.
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"rewards must be a non-empty mapping such as {{'shapes_verifier': 1.0}}, got {spec!r}; "
            f"known rewards: {', '.join(sorted(REWARDS))}"
        )
    components: dict[str, Callable[..., Any]] = {}
    weights: dict[str, float] = {}
    for name, entry in spec.items():
        if isinstance(entry, Mapping):
            kwargs = dict(entry)
            weight = kwargs.pop("weight", 1.0)
            kind = kwargs.pop("type", name)
        elif isinstance(entry, (int, float)) and not isinstance(entry, bool):
            weight, kind, kwargs = entry, name, {}
        else:
            raise ConfigError(
                f"reward {name!r}: expected a weight or a mapping {{weight: ..., <argument>: ...}}, got {entry!r}"
            )
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ConfigError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        components[name] = build_reward(kind, **kwargs)
        weights[name] = float(weight)
    if weights and not any(weights.values()):
        raise ConfigError(
            f"every reward weight is 0 ({weights}): every sample would score 0 and nothing would be learned; "
            "give at least one reward a non-zero weight"
        )
    return WeightedRewards(components, weights)
