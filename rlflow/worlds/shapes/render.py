"""The shapes world's renderer: layouts that satisfy a prompt exactly, drawn into 32x32 RGB images.

Geometry guarantees (the verifier, :mod:`rlflow.worlds.shapes.verifier`, relies on them, so change both
together): every object is a solid shape of side ``MIN_SIZE..MAX_SIZE`` px (bounding box ``side x side``,
except a triangle of even side which may lose its 1-px apex row), at least ``BORDER`` px from the image
border; the bounding boxes of two objects are at least ``MIN_GAP`` px apart (so their pixels never touch,
even 8-connected); for ``A <relation> B`` the boxes are separated along the relation's axis, and the offset
between the centres along that axis is at least twice the offset across it (clearly "left of", never
diagonal). All randomness comes from the ``torch.Generator`` passed in, so results are reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlflow.worlds.shapes.prompts import (
    BORDER,
    COLORS,
    MAX_SIZE,
    MIN_GAP,
    MIN_IMAGE_SIZE,
    MIN_SIZE,
    SHAPES,
    PromptSpec,
    parse_prompt,
    sample_prompts,
)

__all__ = ["PlacedObject", "ShapesDataset", "draw_layouts", "render", "sample_layouts", "shapes_batches"]


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: top-left pixel ``(x, y)`` of its ``size x size`` box (x = column, y = row)."""

    color: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2.0, self.y + self.size / 2.0)


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Boxes (x, y, size) separated by at least MIN_GAP px along x or along y."""
    ax, ay, asz = a
    bx, by, bsz = b
    return (
        ax + asz + MIN_GAP <= bx
        or bx + bsz + MIN_GAP <= ax
        or ay + asz + MIN_GAP <= by
        or by + bsz + MIN_GAP <= ay
    )


def _relation_holds(relation: str, a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """``a <relation> b`` with a clear margin: separated along the axis, and not diagonal."""
    ax, ay, asz = a
    bx, by, bsz = b
    dx = (bx + bsz / 2) - (ax + asz / 2)  # > 0: b is right of a
    dy = (by + bsz / 2) - (ay + asz / 2)  # > 0: b is below a (rows grow downwards)
    if relation in ("left_of", "right_of"):
        sep = ax + asz + MIN_GAP <= bx if relation == "left_of" else bx + bsz + MIN_GAP <= ax
        return sep and abs(dy) * 2 <= abs(dx)
    sep = ay + asz + MIN_GAP <= by if relation == "above" else by + bsz + MIN_GAP <= ay
    return sep and abs(dx) * 2 <= abs(dy)


_ATTEMPTS = 32  # candidate layouts drawn per prompt at once; more are drawn in the (rare) case all fail


def _layout_one(
    spec: PromptSpec, draws: list[list[list[float]]], image_size: int
) -> list[PlacedObject] | None:
    """First candidate layout (of the pre-drawn uniforms ``draws[attempt][object] = [u_size, u_x, u_y]``)
    that satisfies the spec's geometry, or None."""
    kinds = [(o.color, o.shape) for o in spec.objects for _ in range(o.count)]
    for attempt in draws:
        boxes: list[tuple[int, int, int]] = []
        for u_size, u_x, u_y in attempt[: len(kinds)]:
            size = MIN_SIZE + min(int(u_size * (MAX_SIZE - MIN_SIZE + 1)), MAX_SIZE - MIN_SIZE)
            span = image_size - 2 * BORDER - size + 1  # number of valid top-left positions
            x = BORDER + min(int(u_x * span), span - 1)
            y = BORDER + min(int(u_y * span), span - 1)
            boxes.append((x, y, size))
        if not all(_apart(p, q) for p, q in itertools.combinations(boxes, 2)):
            continue
        if spec.relation is not None:
            # A random pair satisfies a given relation only ~8% of the time, but the four relations are
            # mutually exclusive and map onto each other by swapping the two objects and/or transposing
            # the image; sizes and positions are i.i.d., so taking the one variant (if any) that
            # satisfies the asked relation keeps the distribution unbiased and accepts ~4x as often.
            a, b = boxes
            a_t, b_t = (a[1], a[0], a[2]), (b[1], b[0], b[2])
            variants = ((a, b), (b, a), (a_t, b_t), (b_t, a_t))
            boxes = next((list(v) for v in variants if _relation_holds(spec.relation, *v)), [])
            if not boxes:
                continue
        return [PlacedObject(c, s, *box) for (c, s), box in zip(kinds, boxes, strict=True)]
    return None


def _as_specs(prompts: Sequence[str | PromptSpec]) -> list[PromptSpec]:
    if isinstance(prompts, (str, PromptSpec)):
        raise TypeError("pass a sequence of prompts, not a single prompt")
    return [p if isinstance(p, PromptSpec) else parse_prompt(p) for p in prompts]


def sample_layouts(
    prompts: Sequence[str | PromptSpec], generator: torch.Generator | None = None, *, image_size: int = 32
) -> list[list[PlacedObject]]:
    """Random object placements satisfying each prompt (sizes, non-overlap, relations); see module doc."""
    if image_size < MIN_IMAGE_SIZE:
        # Smaller images may not fit three large objects (or a clear relation): fail loudly, not by looping.
        raise ValueError(
            f"image_size must be >= {MIN_IMAGE_SIZE} for objects of side {MIN_SIZE}-{MAX_SIZE} px, got {image_size}"
        )
    specs = _as_specs(prompts)
    max_objects = 3
    # One batched draw for all prompts (the Python search below is then pure arithmetic on floats).
    draws = torch.rand(
        len(specs), _ATTEMPTS, max_objects, 3, generator=generator, dtype=torch.float64
    ).tolist()
    layouts = []
    for spec, spec_draws in zip(specs, draws, strict=True):
        layout = _layout_one(spec, spec_draws, image_size)
        for _ in range(1000):  # acceptance is >~10% per attempt, so this loop virtually never runs
            if layout is not None:
                break
            more = torch.rand(_ATTEMPTS, max_objects, 3, generator=generator, dtype=torch.float64).tolist()
            layout = _layout_one(spec, more, image_size)
        if layout is None:
            raise RuntimeError(f"could not place the objects of {spec.text!r} in a {image_size}px image")
        layouts.append(layout)
    return layouts


_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_COLOR_NAMES = list(COLORS)


def draw_layouts(layouts: Sequence[Sequence[PlacedObject]], *, image_size: int = 32) -> Tensor:
    """Rasterise layouts into ``[B, 3, H, W]`` images in [0, 1] (all objects of the batch at once).

    Shapes in box-relative pixel-centre coordinates ``(u, v)`` in ``(0, size)``: a square fills the box, a
    circle is the inscribed disk, a triangle is isosceles with its apex at the top middle and its base on
    the bottom row (fill ratios of the box ~1, ~0.79 and ~0.5-0.6, which the verifier uses).
    """
    batch = len(layouts)
    images = torch.zeros(batch, 3, image_size, image_size)
    objects = [(b, o) for b, layout in enumerate(layouts) for o in layout]
    if not objects:
        return images
    b_idx = torch.tensor([b for b, _ in objects])
    x0 = torch.tensor([o.x for _, o in objects], dtype=torch.float32)[:, None, None]
    y0 = torch.tensor([o.y for _, o in objects], dtype=torch.float32)[:, None, None]
    size = torch.tensor([o.size for _, o in objects], dtype=torch.float32)[:, None, None]
    shape = torch.tensor([_SHAPE_INDEX[o.shape] for _, o in objects])[:, None, None]
    color = torch.tensor([COLORS[o.color] for _, o in objects])
    centres = torch.arange(image_size, dtype=torch.float32) + 0.5
    u = centres[None, None, :] - x0  # [N, 1, W]
    v = centres[None, :, None] - y0  # [N, H, 1]
    inside_box = (u > 0) & (u < size) & (v > 0) & (v < size)
    half = size / 2
    circle = (u - half) ** 2 + (v - half) ** 2 <= half**2
    # The +0.25 keeps a 1-px apex for odd sides (the centre pixel of the top row is inside).
    triangle = inside_box & ((u - half).abs() <= v / 2 + 0.25)
    masks = torch.where(shape == 0, circle, torch.where(shape == 1, inside_box, triangle)).float()
    # Objects never overlap, so summing them reproduces the palette colours exactly.
    images.index_add_(0, b_idx, masks[:, None] * color[:, :, None, None])
    return images


def render(
    prompts: Sequence[str | PromptSpec], generator: torch.Generator | None = None, *, image_size: int = 32
) -> Tensor:
    """Images ``[B, 3, image_size, image_size]`` in [0, 1] that satisfy each prompt (black background)."""
    return draw_layouts(sample_layouts(prompts, generator, image_size=image_size), image_size=image_size)


# ----------------------------------------------------------------------------------------------
# Pretraining data
# ----------------------------------------------------------------------------------------------


def shapes_batches(
    batch_size: int,
    generator: torch.Generator | None = None,
    *,
    image_size: int = 32,
    categories: Sequence[str] | None = None,
) -> Iterator[tuple[Tensor, list[str]]]:
    """Endless fresh batches ``(images [B, 3, H, W] in [-1, 1], prompts)`` for pretraining.

    Images are mapped to [-1, 1] (the usual diffusion data range); rewards take [0, 1], so map samples
    back with ``(x.clamp(-1, 1) + 1) / 2`` before scoring them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    while True:
        prompts = sample_prompts(batch_size, generator, categories=categories)
        images = render(prompts, generator, image_size=image_size)
        yield images * 2.0 - 1.0, prompts


class ShapesDataset(torch.utils.data.Dataset):
    """A fixed, pre-rendered dataset of ``size`` (image in [-1, 1], prompt) pairs, reproducible from ``seed``.

    Images are stored as uint8 (exact: palette values are 0 or 1), 3 KB each at 32x32, so 100k
    examples take ~300 MB. For unlimited fresh data use :func:`shapes_batches` instead.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        *,
        image_size: int = 32,
        categories: Sequence[str] | None = None,
        chunk_size: int = 1024,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        generator = torch.Generator().manual_seed(seed)
        self.prompts: list[str] = sample_prompts(size, generator, categories=categories)
        chunks = [
            (render(self.prompts[i : i + chunk_size], generator, image_size=image_size) * 255)
            .round()
            .to(torch.uint8)
            for i in range(0, size, chunk_size)
        ]
        self.images: Tensor = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.images[index].float() / 127.5 - 1.0, self.prompts[index]
