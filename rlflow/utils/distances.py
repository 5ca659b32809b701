"""Sample-based distances between point clouds ``x: [N, D]`` and ``y: [M, D]``.

Used to evaluate generative models on toy distributions: both functions are differentiable in ``x`` and
``y`` and run on whatever device the inputs live on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["mmd_rbf", "sliced_wasserstein"]


def _check_pair(x: Tensor, y: Tensor, min_points: int) -> torch.dtype:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"expected point clouds of shape [N, D] and [M, D], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"point dimensions differ: x is {tuple(x.shape)}, y is {tuple(y.shape)}")
    if x.shape[0] < min_points or y.shape[0] < min_points:
        raise ValueError(
            f"need at least {min_points} point(s) in each cloud, got {x.shape[0]} and {y.shape[0]}"
        )
    dtype = torch.promote_types(x.dtype, y.dtype)
    # Integer or half inputs are computed in float32: sorting / exp need the precision.
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    return dtype


def _quantile_coupling(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact monotone coupling of two 1-D empirical distributions with ``n`` and ``m`` atoms.

    Both quantile functions are step functions, constant between the levels ``i/n`` and ``j/m``.
    Merging both sets of levels gives intervals on which both are constant, so evaluating them at the
    interval midpoints and weighting by the interval lengths integrates ``(F^-1(q) - G^-1(q))^2`` exactly.

    Returns:
        ``(index_into_sorted_x [K], index_into_sorted_y [K], weights [K] float64)`` with ``K <= n + m``
        and ``weights.sum() == 1``.
    """
    if n == m:
        idx = torch.arange(n)
        return idx, idx, torch.full((n,), 1.0 / n, dtype=torch.float64)
    # float64 so that equal levels (i/n == j/m) compare exactly equal and yield zero-width intervals.
    upper = torch.cat(
        [torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(1, m + 1, dtype=torch.float64) / m]
    )
    upper = upper.sort().values
    lower = torch.cat([upper.new_zeros(1), upper[:-1]])
    widths = upper - lower
    keep = widths > 0
    mids = ((lower + upper) / 2)[keep]
    ix = (mids * n).floor().long().clamp_(max=n - 1)
    iy = (mids * m).floor().long().clamp_(max=m - 1)
    return ix, iy, widths[keep]


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced 2-Wasserstein distance between ``x: [N, D]`` and ``y: [M, D]``.

    ``SW2 = sqrt( E_theta[ W2^2(theta . x, theta . y) ] )`` with ``theta`` uniform on the unit sphere,
    estimated with ``num_projections`` random directions. Each 1-D ``W2^2`` is exact for the empirical
    distributions (sorted samples when ``N == M``, quantiles at the merged levels otherwise).

    For ``N(m1, I)`` vs ``N(m2, I)`` in ``D`` dimensions, ``SW2^2 -> |m1 - m2|^2 / D`` (plus a small
    positive finite-sample bias). In 1-D the projections are ``+-1`` and this is the exact ``W2``.

    Memory is ``O((N + M) * num_projections)``; everything is vectorised over projections.

    Args:
        generator: draws the projection directions (on the generator's device), for reproducible values.

    Returns:
        A 0-dim tensor (dtype float32, or float64 if an input is float64).
    """
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    dtype = _check_pair(x, y, min_points=1)
    x, y = x.to(dtype), y.to(dtype)
    n, d = x.shape
    m = y.shape[0]

    draw_device = generator.device if generator is not None else x.device
    theta = torch.randn(d, num_projections, generator=generator, device=draw_device, dtype=dtype).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)  # [D, P] unit columns

    px = (x @ theta).sort(dim=0).values  # [N, P]
    py = (y @ theta).sort(dim=0).values  # [M, P]
    ix, iy, w = _quantile_coupling(n, m)
    ix, iy, w = ix.to(x.device), iy.to(x.device), w.to(device=x.device, dtype=dtype)
    w2_sq = (w[:, None] * (px[ix] - py[iy]).square()).sum(dim=0)  # [P]
    return w2_sq.mean().sqrt()


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> Tensor:
    """Unbiased estimate of the squared MMD between ``x: [N, D]`` and ``y: [M, D]`` (N, M >= 2).

    Kernel: ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths``. The unbiased estimator
    excludes the diagonal of the within-set kernel matrices, so it is centred on the true MMD^2 and can
    be slightly *negative* when both samples come from the same distribution.

    Memory is ``O(N^2 + M^2 + N M)``: subsample very large clouds (e.g. to a few thousand points).

    Returns:
        A 0-dim tensor.
    """
    if len(bandwidths) == 0 or any(h <= 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths!r}")
    dtype = _check_pair(x, y, min_points=2)
    x, y = x.to(dtype), y.to(dtype)
    n, m = x.shape[0], y.shape[0]

    def sq_dists(a: Tensor, b: Tensor) -> Tensor:
        # |a|^2 + |b|^2 - 2 a.b as one matmul; clamp the tiny negatives produced by cancellation.
        return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * a @ b.T).clamp_min_(0.0)

    # All three distance matrices in one flat vector [N^2 + M^2 + N M], so each bandwidth costs a few
    # large element-wise kernels instead of three sets of small ones.
    d = torch.cat([sq_dists(x, x).flatten(), sq_dists(y, y).flatten(), sq_dists(x, y).flatten()])
    # Clamp exponents just above log(smallest normal float): far-apart pairs would otherwise produce
    # subnormal results, which are 10-100x slower on CPUs; the clamp changes values by < 1e-37.
    floor = math.log(torch.finfo(dtype).tiny) + 1.0
    k = torch.zeros_like(d)
    # A loop over the handful of bandwidths (not over data) keeps peak memory at ~3 flat vectors.
    for h in bandwidths:
        k = k + torch.exp((d * (-0.5 / (h * h))).clamp_min(floor))
    k_xx = k[: n * n].view(n, n)
    k_yy = k[n * n : n * n + m * m].view(m, m)
    k_xy = k[n * n + m * m :]
    # Off-diagonal means: the diagonal k(a, a) terms are what makes the plain V-statistic biased.
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * k_xy.mean()
