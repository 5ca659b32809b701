"""Reward-model augmentation in the shapes world: renderer comparisons whose winner is known by construction
(:func:`pretraining_batch`, used by ``rlflow reward-model``'s ``pretrain_steps``), sampler-like defects
(:func:`degrade_images`) and label-preserving symmetries (:func:`symmetry_augment`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PRETRAIN_OBJECTIVES",
    "PretrainBatch",
    "degrade_images",
    "perturb_prompts",
    "pretraining_batch",
    "symmetry_augment",
]

# ---------------------------------------------------------------------------------------------------------
# Pretraining on the shapes world's renderer (no judge involved)
# ---------------------------------------------------------------------------------------------------------
#
# Real reward models start from a pretrained image-text backbone (CLIP, a VLM) and are fine-tuned on a few
# thousand preferences. The shapes world's analogue: unlimited (image, prompt) pairs from the renderer,
# with comparisons whose winner is known by construction, never by asking the oracle or the verifier:
#
# * "match" (alignment-like heads): render(p) beats render(p') under prompt p, where p' is p with one
#   thing changed (a colour, a shape, a count, the relation, the colours of two objects swapped, or
#   another prompt altogether). Both images get the same degradation strength, so only content differs.
# * "clean" (quality-like heads): the same render, lightly vs more heavily degraded (blur -> muddy
#   edges, colour noise, stray speckles), under the same prompt.

PRETRAIN_OBJECTIVES = ("match", "clean")


def _perturb_one(spec: Any, kind: float, pick: float, other: str) -> str:
    """One prompt changed in one respect (``kind``/``pick`` in [0, 1) choose what and how)."""
    from rlflow.worlds.shapes.prompts import COLORS, RELATIONS, SHAPES, ObjectSpec, PromptSpec

    objects = list(spec.objects)
    options = ["color", "shape", "other"]
    if len(objects) == 1:
        options.append("count")
    else:
        options.append("swap_colors" if objects[0].color != objects[1].color else "color")
    if spec.relation is not None:
        options += ["relation", "relation"]  # relations are the hardest check: show them more often
    choice = options[int(kind * len(options))]
    if choice == "other":
        return other
    target = int(pick * len(objects))
    obj = objects[target]
    try:
        if choice == "color":
            colors = [c for c in COLORS if c != obj.color]
            objects[target] = ObjectSpec(colors[int(pick * 7919) % len(colors)], obj.shape, obj.count)
        elif choice == "shape":
            shapes = [s for s in SHAPES if s != obj.shape]
            objects[target] = ObjectSpec(obj.color, shapes[int(pick * 7919) % len(shapes)], obj.count)
        elif choice == "count":
            counts = [c for c in (1, 2, 3) if c != obj.count]
            objects[target] = ObjectSpec(obj.color, obj.shape, counts[int(pick * 7919) % len(counts)])
        elif choice == "swap_colors":
            a, b = objects
            objects = [ObjectSpec(b.color, a.shape), ObjectSpec(a.color, b.shape)]
        else:  # relation
            relations = [r for r in RELATIONS if r != spec.relation]
            return PromptSpec(tuple(objects), relations[int(pick * 7919) % len(relations)]).text
        changed = PromptSpec(tuple(objects), spec.relation).text
    except ValueError:  # e.g. both objects became the same colour and shape: fall back to another prompt
        return other
    return changed if changed != spec.text else other


def perturb_prompts(prompts: list[str], generator: torch.Generator) -> list[str]:
    """Shapes-world prompts each changed in one respect (colour, shape, count, relation, swapped colours of
    the two objects, or a different random prompt), so an image rendered for the result violates the
    original in at least one check. Always a different prompt from the input."""
    from rlflow.worlds.shapes.prompts import parse_prompt, sample_prompts

    n = len(prompts)
    draws = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    others = sample_prompts(n, generator)
    out = []
    for prompt, (kind, pick), other in zip(prompts, draws, others, strict=True):  # string edits per prompt
        changed = _perturb_one(parse_prompt(prompt), kind, pick, other)
        if changed == prompt:  # the random replacement happened to be the same prompt
            changed = _perturb_one(parse_prompt(prompt), 0.0, pick, other)  # colour change: always differs
        out.append(changed)
    return out


def degrade_images(images: Tensor, strength: Tensor, generator: torch.Generator) -> Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] with defects like a few-step sampler's, growing with ``strength`` [B]
    (0 = untouched, 1 = heavy): blurred (muddy, mixed-colour) edges, per-pixel colour noise and stray
    speckles of palette colours. Result clamped to [0, 1]."""
    from rlflow.worlds.shapes.prompts import COLORS

    b, c, h, w = images.shape
    s = strength.to(images.dtype).view(b, 1, 1, 1)
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=images.dtype)
    kernel = (kernel[:, None] * kernel[None, :]) / 16.0
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"),
        kernel.expand(c, 1, 3, 3).contiguous(),
        groups=c,
    )
    # A random blend per image: the same strength can mean blurrier or noisier.
    mix = torch.rand(b, 3, 1, 1, 1, generator=generator, dtype=images.dtype)
    out = images + (blurred - images) * (s * (0.3 + 0.7 * mix[:, 0]))
    out = out + 0.12 * s * mix[:, 1] * torch.randn(images.shape, generator=generator, dtype=images.dtype)
    palette = torch.tensor([[0.0, 0.0, 0.0], *COLORS.values()], dtype=images.dtype)
    colour = palette[torch.randint(len(palette), (b, h, w), generator=generator)].permute(0, 3, 1, 2)
    speckle = torch.rand(b, 1, h, w, generator=generator, dtype=images.dtype) < 0.015 * s * mix[:, 2]
    return torch.where(speckle, colour, out).clamp(0.0, 1.0)


@dataclass
class PretrainBatch:
    """Renderer comparisons: ``positive`` (render of ``prompts``, degraded by ``strength``) beats ``negative``
    (render of a perturbed prompt, same strength) on "match" heads and ``degraded`` (the same render,
    degraded more) on "clean" heads. Images ``[B, 3, H, W]`` in [0, 1]."""

    prompts: list[str]
    positive: Tensor
    negative: Tensor
    degraded: Tensor


def pretraining_batch(batch_size: int, generator: torch.Generator, image_size: int = 32) -> PretrainBatch:
    """A fresh :class:`PretrainBatch` of random shapes-world prompts (seeded by ``generator``)."""
    from rlflow.worlds.shapes.prompts import sample_prompts
    from rlflow.worlds.shapes.render import render

    prompts = sample_prompts(batch_size, generator)
    negatives = perturb_prompts(prompts, generator)
    rendered = render(prompts + negatives, generator, image_size=image_size)
    strength = torch.rand(batch_size, generator=generator)
    more = (strength + 0.2 + 0.6 * torch.rand(batch_size, generator=generator)).clamp_max(1.5)
    positive, negative = rendered.chunk(2)
    return PretrainBatch(
        prompts=prompts,
        positive=degrade_images(positive, strength, generator),
        negative=degrade_images(negative, strength, generator),
        degraded=degrade_images(positive, more, generator),
    )


_RELATION_MIRROR = {"left": "right", "right": "left"}
_COLOUR_MIRROR = {"red": "green", "green": "red"}


def _swap_words(prompt: str, mapping: dict[str, str]) -> str:
    return " ".join(mapping.get(word, word) for word in prompt.split(" "))


def symmetry_augment(
    a: Tensor, b: Tensor, prompts: list[str], generator: torch.Generator, *, model_space: bool = False
) -> tuple[Tensor, Tensor, list[str]]:
    """Label-preserving symmetries of the shapes world, the same for both members of a pair:

    * horizontal flip with "left" <-> "right" swapped in the prompt (shapes are left-right symmetric);
    * red <-> green (RGB channels 0 and 1) with the colour words swapped: it maps the palette and the
      RGB cube's corners onto themselves, so colour checks and off-palette distances are unchanged.

    ``model_space``: inputs are pixel-space latents (``images * 2 - 1``), which transform the same way."""
    del model_space  # both symmetries act on pixels and channels alike in [0, 1] and [-1, 1]
    n = a.shape[0]
    flip, swap = (torch.rand(2, n, generator=generator) < 0.5).unbind(0)
    f = flip[:, None, None, None]
    a, b = torch.where(f, a.flip(-1), a), torch.where(f, b.flip(-1), b)
    order = torch.tensor([1, 0, *range(2, a.shape[1])])
    g = swap[:, None, None, None]
    a, b = torch.where(g, a[:, order], a), torch.where(g, b[:, order], b)
    out = []
    for prompt, fl, sw in zip(prompts, flip.tolist(), swap.tolist(), strict=True):  # string edits
        if fl:
            prompt = _swap_words(prompt, _RELATION_MIRROR)
        if sw:
            prompt = _swap_words(prompt, _COLOUR_MIRROR)
        out.append(prompt)
    return a, b, out
