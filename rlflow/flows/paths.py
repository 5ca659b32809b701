"""The linear (rectified-flow) interpolation path and the flow-matching loss."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample times ``[B]`` (or a scalar) so they broadcast against ``like: [B, ...]``."""
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class PathSample:
    """A point on the path between noise ``x0`` and data ``x1`` at time ``t``."""

    x_t: Tensor  # [B, ...]  (1 - t) * x0 + t * x1
    t: Tensor  # [B]
    velocity: Tensor  # [B, ...]  d x_t / dt = x1 - x0, the flow-matching target


def linear_path(x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
    """Sample the linear path ``x_t = (1 - t) x0 + t x1`` (t = 0 noise, t = 1 data)."""
    if x0.shape != x1.shape:
        raise ValueError(f"noise and data shapes differ: {tuple(x0.shape)} vs {tuple(x1.shape)}")
    tt = expand_time(t, x0)
    return PathSample(x_t=(1.0 - tt) * x0 + tt * x1, t=t, velocity=x1 - x0)


def flow_matching_loss(
    predicted_velocity: Tensor, target_velocity: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mean squared velocity error: ``mean_b w_b * mean_elements ||v_pred - (x1 - x0)||^2``.

    The per-sample error is a mean over elements (so the loss scale does not depend on the action or
    image size); ``weights: [B]`` (e.g. reward weights for RWR) multiply per-sample errors.
    """
    per_sample = (
        (predicted_velocity - target_velocity).square().reshape(predicted_velocity.shape[0], -1).mean(1)
    )
    if weights is None:
        return per_sample.mean()
    return (weights * per_sample).mean()
