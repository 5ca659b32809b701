"""A CPU-sized text-to-image world: coloured shapes on black, with GenEval-style compositional prompts.

Images are small RGB squares (32x32 by default, values in [0, 1], black background) showing solid
circles, squares and triangles in a few well-separated palette colours. Prompts come from a small
grammar with four categories, mirroring GenEval's:

====================  ==========================================================
``single``            ``a red circle``
``counting``          ``two blue squares``, ``three yellow triangles``
``two_objects``       ``a red circle and a green square`` (colour attribution)
``position``          ``a red circle to the left of a blue triangle`` (also
                      ``to the right of``, ``above``, ``below``)
====================  ==========================================================

The grammar is small enough to enumerate (:func:`all_prompts`, 1095 prompts), and every word a prompt can
contain is in :data:`VOCAB` (for a word-level tokenizer). The renderer (:mod:`rlflow.worlds.shapes.render`)
draws images that satisfy their prompts exactly, so a model pretrained on them can be checked by the
programmatic verifier (:mod:`rlflow.worlds.shapes.verifier`, which must score these images as correct).
This module also fixes which prompts training never draws (:data:`HELD_OUT_SPLITS`) and the held-out
evaluation sets (:func:`heldout_eval_prompts`).

All randomness comes from the ``torch.Generator`` passed in, so results are reproducible.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "CATEGORIES",
    "COLORS",
    "MAX_PROMPT_WORDS",
    "RELATIONS",
    "SHAPES",
    "VOCAB",
    "ObjectSpec",
    "PromptSpec",
    "all_prompts",
    "HELD_OUT_PAIRS",
    "HELD_OUT_SPLITS",
    "eval_prompts",
    "heldout_eval_prompts",
    "is_held_out",
    "parse_prompt",
    "prompts_by_category",
    "sample_prompts",
    "training_prompts_by_category",
]

# Saturated corners of the RGB cube: every pair is at Euclidean distance >= 1, so a pixel can be assigned
# to a colour by a distance threshold < 0.5 without ambiguity (the verifier does exactly that).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Relation keys (as stored in PromptSpec.relation) and their wording in prompts.
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
CATEGORIES: tuple[str, ...] = ("single", "counting", "two_objects", "position")

_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_WORD_COUNTS = {word: count for count, word in _COUNT_WORDS.items()}
_PLURALS = {shape: shape + "s" for shape in SHAPES}
_SINGULARS = {plural: shape for shape, plural in _PLURALS.items()}

MIN_SIZE = 7  # smallest object side in px (at 32x32: big enough for the shape to be recognisable)
MAX_SIZE = 11  # largest object side in px (three of them still fit with room to spare)
MIN_GAP = 2  # px between the bounding boxes of two objects
BORDER = 1  # px kept free around the image edge so no object is cut off
MIN_IMAGE_SIZE = 28  # smallest image where three objects of side MAX_SIZE still fit comfortably

VOCAB: list[str] = sorted(
    {"a", "and"}
    | {w for w in _COUNT_WORDS.values()}
    | set(COLORS)
    | set(SHAPES)
    | set(_PLURALS.values())
    | {w for phrase in RELATIONS.values() for w in phrase.split()}
)
# "a red circle to the right of a blue square": the longest prompts are position prompts.
MAX_PROMPT_WORDS: int = 3 + max(len(p.split()) for p in RELATIONS.values()) + 3


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one colour and shape, e.g. ``ObjectSpec("blue", "square", 2)``."""

    color: str
    shape: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose one of {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.count not in _COUNT_WORDS:
            raise ValueError(f"count must be one of {sorted(_COUNT_WORDS)}, got {self.count!r}")

    @property
    def text(self) -> str:
        noun = self.shape if self.count == 1 else _PLURALS[self.shape]
        return f"{_COUNT_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: the objects it asks for and, for position prompts, ``objects[0] <relation> objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a prompt has 1 or 2 object groups, got {len(self.objects)}")
        if len(self.objects) == 2:
            a, b = self.objects
            if a.count != 1 or b.count != 1:
                raise ValueError("two-object prompts take one object of each kind ('a red circle and ...')")
            if (a.color, a.shape) == (b.color, b.shape):
                raise ValueError(
                    f"both objects are {a.color} {a.shape}s; ask for 'two {a.color} {_PLURALS[a.shape]}' instead"
                )
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; choose one of {', '.join(RELATIONS)}")
            if len(self.objects) != 2:
                raise ValueError("a relation needs exactly two objects")

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "position"
        if len(self.objects) == 2:
            return "two_objects"
        return "single" if self.objects[0].count == 1 else "counting"

    @property
    def num_objects(self) -> int:
        return sum(obj.count for obj in self.objects)

    @property
    def text(self) -> str:
        """The canonical prompt (``parse_prompt(spec.text) == spec``)."""
        if len(self.objects) == 1:
            return self.objects[0].text
        joiner = "and" if self.relation is None else RELATIONS[self.relation]
        return f"{self.objects[0].text} {joiner} {self.objects[1].text}"


# ----------------------------------------------------------------------------------------------
# Grammar
# ----------------------------------------------------------------------------------------------

_PHRASE_TO_RELATION = {phrase: key for key, phrase in RELATIONS.items()}
_GRAMMAR_HELP = (
    "prompts look like 'a red circle', 'two blue squares', 'a red circle and a green square' or "
    "'a red circle to the left of a blue triangle' (relations: "
    + ", ".join(repr(p) for p in RELATIONS.values())
    + f"; colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; counts: a, two, three)"
)


def _parse_object(words: list[str], prompt: str) -> ObjectSpec:
    """Parse ``[count word, colour, noun]``; the noun's number must agree with the count."""

    def fail(reason: str) -> ValueError:
        return ValueError(f"prompt {prompt!r} is outside the shapes grammar: {reason}; {_GRAMMAR_HELP}")

    if len(words) != 3:
        return_words = " ".join(words)
        raise fail(f"expected '<count> <colour> <shape>', got {return_words!r}")
    count_word, color, noun = words
    if count_word not in _WORD_COUNTS:
        raise fail(f"unknown count word {count_word!r}")
    if color not in COLORS:
        raise fail(f"unknown colour {color!r}")
    count = _WORD_COUNTS[count_word]
    if count == 1:
        if noun not in SHAPES:
            hint = " (use the singular after 'a')" if noun in _SINGULARS else ""
            raise fail(f"unknown shape {noun!r}{hint}")
        shape = noun
    else:
        if noun not in _SINGULARS:
            hint = f" (use the plural after {count_word!r})" if noun in SHAPES else ""
            raise fail(f"unknown shape {noun!r}{hint}")
        shape = _SINGULARS[noun]
    return ObjectSpec(color, shape, count)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the shapes grammar (case, surrounding spaces and a final '.' are ignored).

    Raises ``ValueError`` naming the prompt, what is wrong with it and what the grammar accepts.
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a string, got {type(text).__name__}")
    return _parse_cached(text)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> PromptSpec:
    # Cached: the verifier parses the same few hundred prompts on every GRPO batch.
    words = re.sub(r"\.\s*$", "", text.strip().lower()).split()
    if not words:
        raise ValueError(f"empty prompt {text!r}; {_GRAMMAR_HELP}")
    if len(words) == 3:
        return PromptSpec((_parse_object(words, text),))
    if len(words) >= 7:
        first, rest = words[:3], words[3:]
        second = rest[-3:]
        joiner = " ".join(rest[:-3])
        a, b = _parse_object(first, text), _parse_object(second, text)
        if a.count != 1 or b.count != 1:
            raise ValueError(
                f"prompt {text!r} is outside the shapes grammar: two-object prompts take one object of "
                f"each kind (start both with 'a'); {_GRAMMAR_HELP}"
            )
        if joiner == "and":
            relation = None
        elif joiner in _PHRASE_TO_RELATION:
            relation = _PHRASE_TO_RELATION[joiner]
        else:
            raise ValueError(
                f"prompt {text!r} is outside the shapes grammar: unknown connective {joiner!r}; {_GRAMMAR_HELP}"
            )
        try:
            return PromptSpec((a, b), relation)
        except ValueError as exc:
            raise ValueError(f"prompt {text!r} is outside the shapes grammar: {exc}") from None
    raise ValueError(
        f"prompt {text!r} is outside the shapes grammar: it has {len(words)} words; {_GRAMMAR_HELP}"
    )


@lru_cache(maxsize=1)
def _prompts_by_category() -> dict[str, tuple[str, ...]]:
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    pairs = [(a, b) for a, b in itertools.product(kinds, kinds) if a != b]
    single = tuple(ObjectSpec(c, s).text for c, s in kinds)
    counting = tuple(ObjectSpec(c, s, n).text for n in (2, 3) for c, s in kinds)
    two = tuple(PromptSpec((ObjectSpec(*a), ObjectSpec(*b))).text for a, b in pairs)
    position = tuple(
        PromptSpec((ObjectSpec(*a), ObjectSpec(*b)), rel).text for rel in RELATIONS for a, b in pairs
    )
    return {"single": single, "counting": counting, "two_objects": two, "position": position}


# Colour-shape pairs that training never draws (sample_prompts(held_out=False)): every prompt that mentions
# one of them (399 of the 1095) is evaluation-only, so an evaluation measures alignment that generalises to
# combinations the trainer never rewarded. Each colour and shape still appears in training with other
# partners (three distinct colours, three distinct shapes).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("green", "square"))

# The held-out splits of the grammar. "pairs": every prompt with a pair of HELD_OUT_PAIRS (combinations never
# drawn in training). "prompts": a seeded quarter of each category's prompts (GenEval / Flow-GRPO practice:
# evaluation prompts are distinct from the training prompts, while their colour-shape pairs, counts and
# relations all occur in training with other partners). benchmarks/alignment_ceiling.py measured why both
# exist: under "pairs" even flow matching on perfect renders of the training prompts barely moves the held-out
# accuracy (+0.00 in 1000 steps, +0.02-0.06 in 2000; "prompts": +0.09), docs/alignment.md, "How far alignment on
# the training prompts can go".
HELD_OUT_SPLITS: tuple[str, ...] = ("pairs", "prompts")
HELD_OUT_PROMPT_FRACTION = 0.25


def _check_split(split: str) -> str:
    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"unknown held-out split {split!r}; valid: {', '.join(HELD_OUT_SPLITS)}")
    return split


@lru_cache(maxsize=1)
def _held_out_prompt_texts() -> frozenset[str]:
    """The "prompts" split: ceil(HELD_OUT_PROMPT_FRACTION * n) prompts of each category, in a fixed seeded order
    (4 single, 8 counting, 53 two-object and 210 position prompts: 275 of the 1095)."""
    generator = torch.Generator().manual_seed(0)
    held: set[str] = set()
    for group in _prompts_by_category().values():
        order = torch.randperm(len(group), generator=generator).tolist()
        held.update(group[i] for i in order[: math.ceil(HELD_OUT_PROMPT_FRACTION * len(group))])
    return frozenset(held)


def is_held_out(prompt: str | PromptSpec, split: str = "pairs") -> bool:
    """Whether ``prompt`` is evaluation-only under ``split``: it mentions a colour-shape pair of
    :data:`HELD_OUT_PAIRS` (``"pairs"``), or it is one of the held-out quarter of the prompts (``"prompts"``)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if _check_split(split) == "prompts":
        return spec.text in _held_out_prompt_texts()
    return any((o.color, o.shape) in HELD_OUT_PAIRS for o in spec.objects)


@lru_cache(maxsize=4)
def _split_by_category(held_out: bool, split: str = "pairs") -> dict[str, tuple[str, ...]]:
    """The held-out (``True``) or training (``False``) prompts of each category under ``split``."""
    return {
        category: tuple(p for p in group if is_held_out(p, split) == held_out)
        for category, group in _prompts_by_category().items()
    }


def training_prompts_by_category(split: str = "pairs") -> dict[str, list[str]]:
    """The prompts training may draw under ``split`` (no held-out prompt), grouped by category."""
    return {k: list(v) for k, v in _split_by_category(False, split).items()}


def prompts_by_category() -> dict[str, list[str]]:
    """Every prompt of the grammar, grouped by category (15 / 30 / 210 / 840 prompts)."""
    return {k: list(v) for k, v in _prompts_by_category().items()}


def all_prompts() -> list[str]:
    """Every prompt of the grammar (1095), in a fixed order."""
    return [p for group in _prompts_by_category().values() for p in group]


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    if isinstance(categories, str):
        categories = (categories,)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"unknown prompt categories {unknown}; choose from {', '.join(CATEGORIES)}")
    return tuple(categories)


def sample_prompts(
    n: int,
    generator: torch.Generator | None = None,
    *,
    categories: Sequence[str] | None = None,
    include_held_out: bool = True,
    split: str = "pairs",
) -> list[str]:
    """``n`` random prompts: a category uniformly at random (among ``categories``), then a prompt of it.

    Categories are drawn uniformly rather than prompts (position prompts are 77% of the grammar), so
    training sees as many single-object and counting prompts as relational ones. It never
    draws a held-out prompt of ``split`` (:func:`is_held_out`) with ``include_held_out=False`` (the alignment
    trainers' training prompts).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cats = _check_categories(categories)
    groups = _prompts_by_category() if include_held_out else _split_by_category(False, split)
    cat_idx = torch.randint(len(cats), (n,), generator=generator).tolist()
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    out = []
    for ci, ui in zip(cat_idx, u, strict=True):
        group = groups[cats[ci]]
        out.append(group[min(int(ui * len(group)), len(group) - 1)])
    return out


def eval_prompts(n: int = 64, seed: int = 0, *, categories: Sequence[str] | None = None) -> list[str]:
    """A fixed evaluation set: ``n`` prompts split evenly over the categories (the first ``n % k`` get one more).

    Within a category prompts are drawn without replacement in a seeded random order (cycling through
    that order again only when ``n`` exceeds the category's size, e.g. more than 15 ``single`` prompts).
    The result depends only on ``(n, seed, categories)``, never on global RNG state.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cats = _check_categories(categories)
    generator = torch.Generator().manual_seed(seed)
    groups = _prompts_by_category()
    out: list[str] = []
    for i, cat in enumerate(cats):
        k = n // len(cats) + (1 if i < n % len(cats) else 0)
        group = groups[cat]
        order = torch.randperm(len(group), generator=generator).tolist()
        out.extend(group[order[j % len(group)]] for j in range(k))
    return out


def heldout_eval_prompts(
    num_prompts: int = 256, *, min_images_per_category: int | None = None, seed: int = 0, split: str = "pairs"
) -> list[str]:
    """The held-out evaluation set: ``num_prompts`` distinct held-out prompts of ``split`` (:func:`is_held_out`).

    Prompts are spread over the categories as evenly as their held-out sizes allow (``"pairs"``: 3 single,
    6 counting, 78 two-object and 312 position prompts are held out, at 256: 3 / 6 / 78 / 169; ``"prompts"``:
    4 / 8 / 53 / 210 held out, at 256: 4 / 8 / 53 / 191), drawn in a seeded
    order. A category with fewer than ``min_images_per_category`` prompts repeats them (each copy gets its
    own noise at sampling) so that its accuracy rests on that many images (default ``num_prompts // 2``:
    128 at 256 prompts, 553 images in all; GenEval's overall accuracy is the mean over the four categories,
    so a category scored on 32 images would carry a standard error of ~0.08 into it). Ordered by category.
    """
    if min_images_per_category is None:
        min_images_per_category = num_prompts // 2
    groups = _split_by_category(True, _check_split(split))
    total = sum(len(g) for g in groups.values())
    if not 1 <= num_prompts <= total:
        raise ValueError(f"num_prompts must be in [1, {total}] (the held-out prompts), got {num_prompts}")
    # Water-filling: the small categories take all they have, the rest share what is left evenly.
    quota: dict[str, int] = {}
    left, open_cats = num_prompts, sorted(CATEGORIES, key=lambda c: len(groups[c]))
    while open_cats:
        share = left // len(open_cats)
        category = open_cats.pop(0)
        take = min(len(groups[category]), share + (1 if left - share * (len(open_cats) + 1) > 0 else 0))
        quota[category], left = take, left - take
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for category in CATEGORIES:
        group = groups[category]
        order = torch.randperm(len(group), generator=generator).tolist()[: quota[category]]
        if not order:
            continue
        images = max(len(order), min_images_per_category)
        out.extend(group[order[j % len(order)]] for j in range(images))
    return out


@dataclass
class ShapesPrompts:
    """The shapes world as a prompt source for the alignment trainers (``rlflow.rollout.prompts.PromptSource``).

    ``held_out=True`` (the default): training prompts never include a held-out prompt of ``split`` (``"pairs"``:
    a pair of :data:`HELD_OUT_PAIRS`; ``"prompts"``: a held-out quarter of the prompts) and the evaluation set is
    :func:`heldout_eval_prompts` (``num_eval`` distinct held-out prompts). ``False``: the
    whole grammar for both (:func:`sample_prompts`, :func:`eval_prompts`): evaluation prompts are then also
    training prompts, which the trainers refuse unless ``allow_eval_overlap`` is set.
    """

    num_eval: int = 256
    seed: int = 0
    categories: tuple[str, ...] | None = None
    held_out: bool = True
    split: str = "pairs"

    def __post_init__(self) -> None:
        _check_split(self.split)

    def sample(self, num: int, generator: torch.Generator) -> list[str]:
        return sample_prompts(
            num, generator, categories=self.categories, include_held_out=not self.held_out, split=self.split
        )

    def eval_prompts(self) -> list[str]:
        if self.held_out:
            prompts = heldout_eval_prompts(self.num_eval, seed=self.seed, split=self.split)
            if self.categories is not None:
                prompts = [p for p in prompts if parse_prompt(p).category in self.categories]
            return prompts
        return eval_prompts(self.num_eval, self.seed, categories=self.categories)

    def overlaps_training(self) -> bool:
        """Whether an evaluation prompt can also be drawn for training."""
        return not self.held_out

    @staticmethod
    def category(prompt: str) -> str:
        return parse_prompt(prompt).category
