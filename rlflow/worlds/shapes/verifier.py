"""A programmatic GenEval-style verifier for the built-in shapes world (``rlflow.worlds.shapes``).

Pipeline (vectorised over the whole batch in torch; the only per-image Python is prompt parsing, cached):

1. **Segment** every palette colour: a pixel belongs to colour ``c`` when its RGB distance to ``c`` is below
   ``color_threshold`` (< 0.5, and palette colours are >= 1 apart, so colours never compete for a pixel).
2. **Connected components** (8-connected) of every (image, colour) mask by iterative label propagation: each
   masked pixel starts with a unique label and repeatedly takes the max over its 3x3 neighbourhood (a
   ``max_pool2d``) restricted to the mask, until nothing changes (iterations = the largest component's
   geodesic diameter, ~10 for solid shapes). Only (image, colour) planes with any masked pixel are processed.
3. **Describe** each component (area, bounding box, bbox-relative vertical centroid) with scatter
   reductions; drop components smaller than ``min_area`` px (noise, anti-aliasing fringes).
4. **Classify** the shape from the fill ratio ``area / bbox area`` (square ~1, circle ~0.79, triangle
   ~0.6 at these sizes), the vertical centroid (an apex-up triangle is bottom-heavy: ~0.63 of its
   height vs 0.5 for the symmetric shapes), with an ``other`` class for blobs that fit none (they count
   as extra objects).
5. **Check** the prompt: per object, its colour appears / its colour+shape appears / its count is exact;
   the relation (GenEval's rule on the bounding-box centres of the largest instance of each object);
   no detected object of a kind the prompt does not name.

``__call__`` returns the partial-credit score (the fraction of satisfied checks); ``evaluate`` also returns
GenEval-style ``correct`` and the individual checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlflow.worlds.shapes.prompts import COLORS, SHAPES, parse_prompt

__all__ = ["ShapesVerifier", "connected_components"]

_NUM_COLORS = len(COLORS)
_NUM_KINDS = len(SHAPES) + 1  # + "other": a blob of a palette colour that is no recognisable shape
_OTHER = len(SHAPES)
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_CHECKS = ("correct", "colors_present", "objects_present", "counts_correct", "relation_correct", "no_extra")
_RELATION_AXIS_SIGN = {"left_of": (0, -1.0), "right_of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def connected_components(masks: Tensor) -> Tensor:
    """8-connected component labels of boolean ``masks [N, H, W]``: 0 off the mask, else a label > 0
    shared by exactly the pixels of one component (the largest flat index + 1 in it)."""
    n, h, w = masks.shape
    # int16 halves the memory traffic of the hot loop (labels <= H * W must fit: images up to 181 px).
    dtype = torch.int16 if h * w < torch.iinfo(torch.int16).max else torch.int32
    seeds = torch.arange(1, h * w + 1, dtype=dtype, device=masks.device).view(1, h, w)
    labels = torch.where(masks, seeds, torch.zeros((), dtype=dtype, device=masks.device))
    if masks.numel() == 0:
        return labels.long()
    zero = torch.zeros((), dtype=dtype, device=masks.device)
    for _ in range(h * w):  # the bound is never reached: a component's diameter is < H * W
        # 3x3 max as two separable 3-tap maxima over shifted views (several times faster on CPU than
        # max_pool2d, which has no integer kernel); zero padding never wins a max against a label.
        p = F.pad(labels, (1, 1, 1, 1))
        rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
        grown = torch.where(
            masks, torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:]), zero
        )
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


@dataclass
class ShapesVerifier:
    """Reward for the shapes world: the fraction of a prompt's checks an image satisfies, in [0, 1].

    Checks per object group of the prompt: its colour is present, its colour+shape is present, its count
    is exact; plus, for position prompts, the relation; plus "no extra objects" (credited only when at least
    one asked-for object is present, so a blank image scores 0). ``evaluate`` gives ``correct`` (every count
    exact, relation right, no extras: GenEval's accuracy) and the individual checks.
    """

    color_threshold: float = 0.45
    """Max RGB (Euclidean, [0, 1] scale) distance from a palette colour for a pixel to count as that colour
    (just under half the palette spacing: a 3x3-blurred edge still thresholds back to the original shape)."""
    min_area: int = 12
    """Components with fewer pixels are ignored (the smallest rendered object, a side-7 triangle, has 31)."""
    position_threshold: float = 0.1
    """GenEval's margin: offsets are shrunk by this fraction of the two objects' summed bbox sizes."""

    def __post_init__(self) -> None:
        if self.min_area < 1:
            raise ValueError(f"min_area must be >= 1, got {self.min_area}")
        self._palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
        gaps = torch.cdist(self._palette, self._palette) + torch.eye(_NUM_COLORS) * 1e9
        limit = float(gaps.min()) / 2
        if not 0 < self.color_threshold < limit:
            # A larger threshold would let one pixel match two palette colours.
            raise ValueError(f"color_threshold must be in (0, {limit:g}), got {self.color_threshold}")
        # Every palette colour is a corner of the RGB cube: the nearest corner (rounding each channel) is
        # then the only palette candidate, which is ~4x cheaper than distances to all colours.
        self._corners = bool(((self._palette == 0) | (self._palette == 1)).all())
        corner_to_color = torch.full((8,), -1, dtype=torch.long)
        if self._corners:
            bits = (self._palette * torch.tensor([4.0, 2.0, 1.0])).sum(dim=1).long()
            corner_to_color[bits] = torch.arange(_NUM_COLORS)
        self._corner_to_color = corner_to_color

    def _nearest_color(self, images: Tensor) -> Tensor:
        """``[B, H, W]`` index of the palette colour within ``color_threshold`` of each pixel, or -1."""
        if self._corners:
            corner = images.round()
            dist2 = ((images - corner) ** 2).sum(dim=1)
            bits = (corner[:, 0] * 4 + corner[:, 1] * 2 + corner[:, 2]).long()
            code = self._corner_to_color.to(images.device)[bits]
        else:  # general palettes: distance to every colour (colours are >= 2 * threshold apart)
            palette = self._palette.to(images.device)
            all_dist2 = ((images.unsqueeze(1) - palette.view(1, _NUM_COLORS, 3, 1, 1)) ** 2).sum(dim=2)
            dist2, code = all_dist2.min(dim=1)
        return torch.where(dist2 < self.color_threshold**2, code, torch.full_like(code, -1))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.evaluate(images, prompts)["score"]

    # ------------------------------------------------------------------------------------------

    def detect(self, images: Tensor) -> dict[str, Tensor]:
        """Components of all images: per component ``image``, ``color``, ``kind`` (shape index, or
        ``len(SHAPES)`` for other), ``area``, ``center`` [n, 2] (bbox centre, x then y), ``size`` [n, 2]
        (bbox width, height), ``fill`` and ``vcentroid``; only components with ``area >= min_area``."""
        b, _, h, w = images.shape
        device = images.device
        code = self._nearest_color(images.float())  # [B, H, W]: palette index, or -1
        # One plane per (image, colour) that has any pixel of that colour; plane p = image p // C.
        offsets = torch.arange(b, device=device).view(b, 1, 1) * (_NUM_COLORS + 1)
        hist = torch.bincount((code + 1 + offsets).flatten(), minlength=b * (_NUM_COLORS + 1))
        present = hist.view(b, _NUM_COLORS + 1)[:, 1:] > 0  # [B, C]
        active = present.flatten().nonzero().flatten()
        masks = code[active // _NUM_COLORS] == (active % _NUM_COLORS).view(-1, 1, 1)
        labels = connected_components(masks)
        plane, ys, xs = labels.nonzero(as_tuple=True)
        # One id per (plane, label): unique gives every component a dense index.
        keys = plane * (h * w + 1) + labels[plane, ys, xs]
        uniq, comp = torch.unique(keys, return_inverse=True)
        n = uniq.numel()
        area = torch.zeros(n, device=device).index_add_(0, comp, torch.ones_like(xs, dtype=torch.float32))
        fx, fy = xs.float(), ys.float()
        sum_y = torch.zeros(n, device=device).index_add_(0, comp, fy)

        def reduce(values: Tensor, op: str, init: float) -> Tensor:
            return torch.full((n,), init, device=device).scatter_reduce_(0, comp, values, op)

        x0, x1 = reduce(fx, "amin", float(w)), reduce(fx, "amax", -1.0)
        y0, y1 = reduce(fy, "amin", float(h)), reduce(fy, "amax", -1.0)
        width, height = x1 - x0 + 1, y1 - y0 + 1
        fill = area / (width * height)
        # Mean pixel-centre row, measured from the bbox top, as a fraction of the bbox height.
        vcentroid = (sum_y / area + 0.5 - y0) / height
        aspect = width / height
        comp_plane = uniq // (h * w + 1)
        square_ish = (aspect > 0.75) & (aspect < 1.34)
        symmetric = (vcentroid - 0.5).abs() < 0.06
        kind = torch.full((n,), _OTHER, dtype=torch.long, device=device)
        # Circles go down to fill 0.5: a blurred small disk thresholds to a diamond-like blob (~0.6).
        kind[square_ish & symmetric & (fill >= 0.5) & (fill < 0.9)] = _SHAPE_INDEX["circle"]
        kind[square_ish & symmetric & (fill >= 0.9)] = _SHAPE_INDEX["square"]
        kind[square_ish & (vcentroid > 0.56) & (fill >= 0.4) & (fill < 0.8)] = _SHAPE_INDEX["triangle"]
        plane_id = active[comp_plane]
        keep = area >= self.min_area
        return {
            "image": (plane_id // _NUM_COLORS)[keep],
            "color": (plane_id % _NUM_COLORS)[keep],
            "kind": kind[keep],
            "area": area[keep],
            "center": torch.stack([(x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2], dim=1)[keep],
            "size": torch.stack([width, height], dim=1)[keep],
            "fill": fill[keep],
            "vcentroid": vcentroid[keep],
        }

    def evaluate(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Score a batch. Returns CPU tensors of shape [B]:

        ``score`` (float32, the reward), ``correct`` (bool), and the checks (bool, all True when not
        applicable): ``colors_present``, ``objects_present``, ``counts_correct``, ``relation_correct``,
        ``no_extra``; plus ``num_detected`` (long: components of a palette colour above ``min_area``).
        """
        # Imported here: rlflow.reward_models registers this reward, so it imports this module.
        from rlflow.reward_models.base import check_reward_inputs

        check_reward_inputs(images, prompts, type(self).__name__)
        batch = images.shape[0]
        device = images.device
        specs = [parse_prompt(p) for p in prompts]
        if batch == 0:
            empty_bool = torch.zeros(0, dtype=torch.bool)
            return {
                "score": torch.zeros(0),
                "num_detected": torch.zeros(0, dtype=torch.long),
                **{k: empty_bool for k in _CHECKS},
            }
        # Up to two object groups per prompt, padded (valid = False) for single-group prompts.
        slots = [[*s.objects, *s.objects[:1]][:2] for s in specs]
        obj_color = torch.tensor([[_COLOR_INDEX[o.color] for o in sl] for sl in slots], device=device)
        obj_shape = torch.tensor([[_SHAPE_INDEX[o.shape] for o in sl] for sl in slots], device=device)
        obj_count = torch.tensor([[o.count for o in sl] for sl in slots], device=device)
        obj_valid = torch.tensor([[True, len(s.objects) == 2] for s in specs], device=device)
        rel = [_RELATION_AXIS_SIGN.get(s.relation or "", (0, 0.0)) for s in specs]
        has_rel = torch.tensor([s.relation is not None for s in specs], device=device)
        rel_axis = torch.tensor([a for a, _ in rel], device=device)
        rel_sign = torch.tensor([sg for _, sg in rel], device=device)

        det = self.detect(images)
        groups = _NUM_COLORS * _NUM_KINDS
        group = det["image"] * groups + det["color"] * _NUM_KINDS + det["kind"]
        counts = torch.bincount(group, minlength=batch * groups).view(batch, _NUM_COLORS, _NUM_KINDS)
        rows = torch.arange(batch, device=device)[:, None]
        found = counts[rows, obj_color, obj_shape]  # [B, 2]
        color_found = counts.sum(dim=2)[rows, obj_color]  # any shape of that colour

        color_ok = (color_found > 0) | ~obj_valid
        present = (found > 0) | ~obj_valid
        count_ok = (found == obj_count) | ~obj_valid

        # Extra objects: any detected component whose (colour, kind) is not one the prompt names.
        named = torch.zeros(batch, _NUM_COLORS, _NUM_KINDS, dtype=torch.bool, device=device)
        named[rows.expand(batch, 2)[obj_valid], obj_color[obj_valid], obj_shape[obj_valid]] = True
        no_extra = (counts * ~named).flatten(1).sum(dim=1) == 0

        relation_ok = self._relations(det, batch, obj_color, obj_shape, rel_axis, rel_sign) | ~has_rel

        n_checks = 3 * obj_valid.sum(dim=1) + has_rel.long() + 1
        any_present = ((found > 0) & obj_valid).any(dim=1)
        satisfied = (
            (color_ok & obj_valid).sum(dim=1)
            + (present & obj_valid).sum(dim=1)
            + (count_ok & obj_valid).sum(dim=1)
            + (relation_ok & has_rel).long()
            + (no_extra & any_present).long()
        )
        score = satisfied.float() / n_checks.float()
        counts_correct = count_ok.all(dim=1)
        out = {
            "score": score,
            "correct": counts_correct & relation_ok & no_extra,
            "colors_present": color_ok.all(dim=1),
            "objects_present": present.all(dim=1),
            "counts_correct": counts_correct,
            "relation_correct": relation_ok,
            "no_extra": no_extra,
            "num_detected": counts.flatten(1).sum(dim=1),
        }
        return {k: v.cpu() for k, v in out.items()}

    def _relations(
        self,
        det: dict[str, Tensor],
        batch: int,
        obj_color: Tensor,
        obj_shape: Tensor,
        rel_axis: Tensor,
        rel_sign: Tensor,
    ) -> Tensor:
        """Whether ``object 0 <relation> object 1`` holds, using the largest component of each (GenEval)."""
        device = obj_color.device
        groups = batch * _NUM_COLORS * _NUM_KINDS
        group = (det["image"] * _NUM_COLORS + det["color"]) * _NUM_KINDS + det["kind"]
        n = group.numel()
        # Largest component per group, ties broken by index: encode (area, index) in one integer key.
        key = det["area"].long() * (n + 1) + torch.arange(n, device=device)
        best = torch.full((groups,), -1, dtype=torch.long, device=device).scatter_reduce_(
            0, group, key, "amax"
        )
        best_idx = torch.where(best >= 0, best % (n + 1), torch.full_like(best, -1))
        slot_group = (
            torch.arange(batch, device=device)[:, None] * _NUM_COLORS + obj_color
        ) * _NUM_KINDS + obj_shape
        idx = best_idx[slot_group]  # [B, 2], -1 where the object was not found
        found = (idx >= 0).all(dim=1)
        safe = idx.clamp(min=0)
        if n == 0:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        center, size = det["center"][safe], det["size"][safe]  # [B, 2, 2]
        offset = center[:, 0] - center[:, 1]  # subject minus reference, (x, y); y grows downwards
        margin = self.position_threshold * (size[:, 0] + size[:, 1])
        revised = (offset.abs() - margin).clamp(min=0) * offset.sign()
        norm = offset.norm(dim=1).clamp(min=1e-6)
        direction = revised / norm[:, None]
        along = direction.gather(1, rel_axis[:, None]).squeeze(1) * rel_sign
        return found & (along > 0.5)
