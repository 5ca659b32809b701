"""PNG plots of training curves and 2-D sample clouds.

matplotlib is imported lazily, and figures are rendered with the Agg canvas directly (no ``pyplot``), so
plotting never changes the process-wide matplotlib backend and works headless and from any thread.
PNGs are written atomically.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlflow.utils.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["metric_group", "plot_metric_curves", "save_image_grid", "scatter_2d"]

PathLike = str | os.PathLike[str]

# Metrics whose name has no "prefix/" are plotted together under this group.
_UNGROUPED = "other"


def metric_group(name: str) -> str:
    """The plot group of a metric: its prefix before the first ``/`` (``"train/loss"`` -> ``"train"``)."""
    prefix, sep, _ = name.partition("/")
    return prefix if sep and prefix else _UNGROUPED


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure
    return fig


def _save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def _safe_filename(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group) or _UNGROUPED


def plot_metric_curves(rows: Sequence[dict[str, Any]], out_dir: PathLike) -> list[Path]:
    """One PNG per metric group (``out_dir/<prefix>.png``) with one subplot per metric against step.

    Args:
        rows: metric rows as written to ``metrics.jsonl``: ``{"step": int, "<prefix>/<name>": float | None}``.
            Missing metrics and ``None`` (non-finite) values leave gaps in the curves.
        out_dir: created if needed.

    Returns:
        The written PNG paths, in order of first appearance of each group (empty if no metrics).
    """
    # Collect every metric's (step, value) series in one pass; dicts keep first-appearance order.
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            if key == "step":
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(step))
            values.append(math.nan if value is None else float(value))
    groups: dict[str, list[str]] = {}
    for key in series:
        groups.setdefault(metric_group(key), []).append(key)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for group, keys in groups.items():
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = _new_figure(4.2 * ncols, 3.0 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            steps, values = series[key]
            x, y = np.asarray(steps), np.asarray(values)
            # Markers only for short curves, where lines alone would hide individual points.
            ax.plot(x, y, marker="o" if len(x) <= 50 else None, markersize=3, linewidth=1.2)
            if not np.isfinite(y).any():
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        path = out / f"{_safe_filename(group)}.png"
        _save_png(fig, path)
        written.append(path)
    return written


def _as_points(name: str, value: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = (
        value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)
    )
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"scatter_2d: {name} must have shape [N, 2], got {tuple(arr.shape)}")
    return arr


def scatter_2d(
    samples: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    path: PathLike,
    *,
    title: str,
    labels: tuple[str, str] = ("model samples", "data"),
) -> Path:
    """Side-by-side scatter plots of model samples ``[N, 2]`` and reference data ``[M, 2]``; saves a PNG.

    Both panels share the same axis limits and an equal aspect ratio so shapes compare directly. The
    limits cover all reference points and the central 99 % of the samples (plus a margin), so a few
    diverged samples cannot squash the picture; non-finite samples are dropped.

    Returns:
        ``Path(path)``.
    """
    pts = _as_points("samples", samples)
    ref = _as_points("reference", reference)
    pts = pts[np.isfinite(pts).all(axis=1)]
    ref = ref[np.isfinite(ref).all(axis=1)]

    extents = []
    if len(ref):
        extents += [ref.min(axis=0), ref.max(axis=0)]
    if len(pts):
        extents += [np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)]
    if extents:
        stacked = np.stack(extents)
        lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    else:
        lo, hi = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    # Square window around the centre so the equal aspect does not leave one panel mostly empty.
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6) * 1.08

    fig = _new_figure(9.0, 4.6)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, data, label, color in zip(axes, (pts, ref), labels, ("tab:blue", "tab:orange"), strict=True):
        # Smaller, more transparent markers for big clouds so density stays visible.
        size = 4.0 if len(data) <= 2000 else 1.5
        ax.scatter(data[:, 0], data[:, 1], s=size, alpha=0.5, color=color, linewidths=0, rasterized=True)
        ax.set_title(f"{label} (n={len(data)})", fontsize=10)
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    out = Path(path)
    _save_png(fig, out)
    return out


def save_image_grid(
    images01: torch.Tensor | np.ndarray,
    captions: Sequence[str],
    path: PathLike,
    *,
    ncols: int | None = None,
    title: str | None = None,
    caption_colors: Sequence[str] | None = None,
    panel_inches: float = 1.6,
) -> Path:
    """A PNG grid of RGB images ``[N, 3, H, W]`` in ``[0, 1]``, each titled with its caption.

    Captions are wrapped to the panel width (prompts of text-to-image models are long). ``caption_colors``
    (matplotlib colours, one per image) can mark e.g. verifier-correct samples green and wrong ones red.
    Images are drawn without interpolation so individual pixels of small images stay visible.

    Returns:
        ``Path(path)``.
    """
    import textwrap

    arr = (
        images01.detach().float().cpu().numpy()
        if isinstance(images01, torch.Tensor)
        else np.asarray(images01, dtype=np.float32)
    )
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"save_image_grid: images must have shape [N, 3, H, W], got {tuple(arr.shape)}")
    count = arr.shape[0]
    if count == 0:
        raise ValueError("save_image_grid: no images to plot")
    if isinstance(captions, str) or len(captions) != count:
        got = "a single string" if isinstance(captions, str) else f"{len(captions)} captions"
        raise ValueError(f"save_image_grid: expected one caption per image ({count}), got {got}")
    if caption_colors is not None and len(caption_colors) != count:
        raise ValueError(
            f"save_image_grid: expected one caption colour per image ({count}), got {len(caption_colors)}"
        )
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"save_image_grid: images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
            "map [-1, 1] model outputs with (x.clamp(-1, 1) + 1) / 2"
        )
    pixels = np.clip(arr, 0.0, 1.0).transpose(0, 2, 3, 1)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)

    cols = ncols if ncols is not None else min(count, 8)
    if cols < 1:
        raise ValueError(f"save_image_grid: ncols must be >= 1, got {ncols}")
    rows = math.ceil(count / cols)
    # ~2 short lines of caption above each panel; characters per line scale with the panel width.
    fig = _new_figure(panel_inches * cols, (panel_inches + 0.45) * rows + (0.4 if title else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False)
    width = max(12, int(panel_inches * 14))
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= count:
            continue
        ax.imshow(pixels[i], interpolation="nearest")
        color = caption_colors[i] if caption_colors is not None else "black"
        ax.set_title(textwrap.fill(captions[i], width), fontsize=6.5, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    out = Path(path)
    _save_png(fig, out)
    return out
