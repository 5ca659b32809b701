"""The hidden judge of the shapes world: noiseless multi-dimensional scores plus a noisy "human rater".

Preference-alignment methods (reward models, Flow-DPO, Flow-RWR) learn from *pairwise labels*, not
scores. :class:`ShapesOracle` plays the role of the human raters for the built-in shapes world
(``rlflow.worlds.shapes``): it scores images on several dimensions and turns score differences into noisy
``A`` / ``B`` / ``tie`` labels, and it is also the ground truth that aligned models are evaluated against.

Dimensions (both in [0, 1], higher is better):

``alignment``
    The :class:`~rlflow.worlds.shapes.verifier.ShapesVerifier` partial-credit score: the fraction
    of the prompt's checks (colours, shapes, counts, relation, no extra objects) the image satisfies.
``quality``
    A prompt-independent image-quality score: ``exp(-defects / quality_temperature)``, where ``defects``
    (in pixels) counts

    * *off-palette* pixels: each pixel is softly counted by how far its colour is from the nearest corner
      of the RGB cube (black background or a palette colour), ``clamp((dist - 0.1) / 0.3, 0, 1)``; a
      faint haze (dist < 0.1) costs nothing, a muddy edge or mixed-colour pixel (dist >= 0.4) counts 1;
    * *speckles*: foreground pixels with at most 2 neighbours (of 8) of their own colour (isolated dots,
      1-px spurs, stray fragments).

    Rendered images (``rlflow.worlds.shapes.render.render``) score exactly 1. On the shipped base model
    (recipes/alignment/artifacts/shapes_base, Euler ODE) the median is ~0.2 at 4 steps, ~0.5 at 10 steps
    and ~0.6 at 20 steps, with a wide spread within each (quartiles ~0.4-0.7 at 10 steps).

Rater noise model: Bradley-Terry with ties (Rao-Kupper; the model VideoReward trains with), applied per
dimension to the scaled score difference ``d = scale * (s_A - s_B)``::

    P(A) = sigmoid(d - log theta),   P(B) = sigmoid(-d - log theta),   P(tie) = 1 - P(A) - P(B)

which equals the closed form ``(theta^2 - 1) e^{rA} e^{rB} / ((e^{rA} + theta e^{rB})(theta e^{rA} + e^{rB}))``
with ``r = scale * s``. Equal scores give ``P(tie) = (theta - 1) / (theta + 1)`` (1/3 at the default
``theta = 2``); ``theta = 1`` means raters never say tie. Labels are sampled independently per pair and
dimension from these probabilities with a caller-supplied ``torch.Generator``.

Agreement ceiling (:func:`agreement_ceiling`): even a predictor that knows the true scores cannot match
noisy labels perfectly. For per-pair label probabilities ``(pA, pB, pT)``:

* ``with_ties``: the best expected accuracy when predicting the 3-way label = ``mean_i max(pA, pB, pT)``;
* ``without_ties``: the best expected accuracy on the pairs whose label is decided (ties dropped, as in
  "accuracy without ties"): ``sum_i max(pA, pB) / sum_i (pA + pB)``, i.e. the per-pair ceiling
  ``max(pA, pB) / (pA + pB)`` averaged with weights ``pA + pB`` (the probability that the pair is decided).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlflow.worlds.shapes.verifier import ShapesVerifier

__all__ = [
    "ORACLE_DIMENSIONS",
    "ShapesOracle",
    "agreement_ceiling",
    "bt_ties_label_probabilities",
    "shapes_image_quality",
    "win_rate",
]

ORACLE_DIMENSIONS: tuple[str, ...] = ("alignment", "quality")

# Off-palette distances below _HAZE are free (invisible background haze); at _HAZE + _MUDDY a pixel counts
# fully. Palette colours are >= 1 apart, so a pixel at distance 0.4 is clearly a mixed/muddy colour.
_HAZE = 0.1
_MUDDY = 0.3
# A foreground pixel with at most this many same-coloured 8-neighbours is a speckle (solid shapes of side
# >= 7 have >= 3 everywhere, including a triangle's 1-px apex, which has its 3-px row below it).
_SPECKLE_NEIGHBOURS = 2


def shapes_image_quality(images: Tensor, temperature: float = 8.0) -> Tensor:
    """Prompt-independent quality ``exp(-defects / temperature)`` in (0, 1] of images ``[B, 3, H, W]``.

    ``defects`` = soft count of off-palette pixels + count of speckle pixels (see the module docstring).
    Vectorised over the batch: one rounding, one grouped 3x3 convolution.
    """
    corner = images.round().clamp(0, 1)  # nearest corner of the RGB cube = black or a palette colour
    dist = (images - corner).square().sum(dim=1).sqrt()  # [B, H, W]
    off_palette = ((dist - _HAZE) / _MUDDY).clamp(0, 1).flatten(1).sum(dim=1)
    code = (corner[:, 0] * 4 + corner[:, 1] * 2 + corner[:, 2]).long()  # 0 = black background
    onehot = F.one_hot(code, 8).permute(0, 3, 1, 2).to(images.dtype)
    box = torch.ones(8, 1, 3, 3, dtype=images.dtype, device=images.device)
    same = (F.conv2d(onehot, box, padding=1, groups=8) * onehot).sum(dim=1) - 1  # excludes the pixel itself
    speckles = ((code > 0) & (same <= _SPECKLE_NEIGHBOURS)).flatten(1).sum(dim=1).to(images.dtype)
    return torch.exp(-(off_palette + speckles) / temperature)


def bt_ties_label_probabilities(scores_a: Tensor, scores_b: Tensor, scale: float, theta: float) -> Tensor:
    """Bradley-Terry-with-ties rater: ``[..., 3]`` probabilities of (A, B, tie) for score tensors ``[...]``."""
    d = scale * (scores_a - scores_b)
    log_theta = math.log(theta)
    p_a = torch.sigmoid(d - log_theta)
    p_b = torch.sigmoid(-d - log_theta)
    # theta >= 1 guarantees p_a + p_b <= 1; the clamp only removes float round-off below zero.
    p_tie = (1.0 - p_a - p_b).clamp_min(0.0)
    return torch.stack([p_a, p_b, p_tie], dim=-1)


def agreement_ceiling(
    probabilities: Tensor, dimensions: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """The best expected accuracy any predictor can reach on labels drawn from ``probabilities``.

    ``probabilities``: ``[N, D, 3]`` (A, B, tie) per pair and dimension (``[N, 3]`` is one dimension).
    Returns ``{dimension: {"with_ties": mean max(pA, pB, pT), "without_ties": sum max(pA, pB) / sum(pA + pB)}}``
    (see the module docstring); dimensions are named ``dimensions`` or ``"0", "1", ...``.
    """
    if probabilities.ndim == 2:
        probabilities = probabilities.unsqueeze(1)
    if probabilities.ndim != 3 or probabilities.shape[-1] != 3 or probabilities.shape[0] == 0:
        raise ValueError(
            f"probabilities must be [N, D, 3] (A, B, tie) with N >= 1, got {tuple(probabilities.shape)}"
        )
    num_dims = probabilities.shape[1]
    names = list(dimensions) if dimensions is not None else [str(d) for d in range(num_dims)]
    if len(names) != num_dims:
        raise ValueError(f"got {len(names)} dimension names {names} for {num_dims} dimensions")
    p = probabilities.double()
    with_ties = p.max(dim=-1).values.mean(dim=0)
    decided = p[..., 0] + p[..., 1]
    without_ties = p[..., :2].max(dim=-1).values.sum(dim=0) / decided.sum(dim=0).clamp_min(1e-300)
    return {
        name: {"with_ties": float(with_ties[d]), "without_ties": float(without_ties[d])}
        for d, name in enumerate(names)
    }


def win_rate(scores_policy: Tensor, scores_base: Tensor, *, pairing: str = "paired") -> float:
    """Fraction of comparisons the policy wins, ties counting 1/2.

    ``pairing="paired"``: compare ``scores_policy[i]`` with ``scores_base[i]`` (same prompt and index;
    shapes must match). ``pairing="all"``: compare every policy score with every base score (the
    Mann-Whitney AUC; use it when the two sets are not matched).
    """
    policy = torch.as_tensor(scores_policy).double().flatten()
    base = torch.as_tensor(scores_base).double().flatten()
    if policy.numel() == 0 or base.numel() == 0:
        raise ValueError("win_rate needs at least one score on each side")
    if pairing == "paired":
        if policy.shape != base.shape:
            raise ValueError(
                f"paired win_rate needs one base score per policy score, got {policy.numel()} and "
                f"{base.numel()} (use pairing='all' for unmatched sets)"
            )
        diff = policy - base
    elif pairing == "all":
        diff = policy[:, None] - base[None, :]
    else:
        raise ValueError(f"pairing must be 'paired' or 'all', got {pairing!r}")
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@dataclass
class ShapesOracle:
    """Noiseless scores and noisy BT-with-ties pairwise labels for the shapes world (see module docstring).

    As a reward (``oracle(images, prompts)``) it returns the noiseless score of ``reward_dimension``.
    """

    dimensions: tuple[str, ...] = ORACLE_DIMENSIONS
    """Label dimensions, a subset of ("alignment", "quality"), in label-column order."""
    scale: float = 10.0
    """Rater sharpness: scores in [0, 1] are multiplied by this before the BT model (0.2 apart -> P(better)
    ~0.79 at theta 2)."""
    theta: float = 2.0
    """Tie parameter (>= 1): equal scores are a tie with probability (theta - 1) / (theta + 1)."""
    reward_dimension: str = "alignment"
    """The dimension ``__call__`` returns (so the oracle plugs into GRPO / evaluation as a reward)."""
    quality_temperature: float = 8.0
    """Defect pixels that lower quality by a factor e (see :func:`shapes_image_quality`)."""

    def __post_init__(self) -> None:
        if isinstance(self.dimensions, str):
            self.dimensions = (self.dimensions,)
        self.dimensions = tuple(self.dimensions)
        unknown = [d for d in self.dimensions if d not in ORACLE_DIMENSIONS]
        if unknown or not self.dimensions or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(
                f"dimensions must be distinct names from {list(ORACLE_DIMENSIONS)}, got {list(self.dimensions)}"
            )
        if self.reward_dimension not in ORACLE_DIMENSIONS:
            raise ValueError(
                f"reward_dimension must be one of {list(ORACLE_DIMENSIONS)}, got {self.reward_dimension!r}"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not (math.isfinite(self.theta) and self.theta >= 1):
            raise ValueError(f"theta must be >= 1 (1 = raters never tie), got {self.theta!r}")
        if not self.quality_temperature > 0:
            raise ValueError(f"quality_temperature must be > 0, got {self.quality_temperature!r}")
        self._verifier = ShapesVerifier()

    def _score(self, dimension: str, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if dimension == "alignment":
            return self._verifier(images, prompts).float()
        return shapes_image_quality(images.float(), self.quality_temperature)

    def scores(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Noiseless ``{dimension: [B]}`` scores in [0, 1] of images ``[B, 3, H, W]`` in [0, 1]."""
        # Imported here: rlflow.reward_models registers this reward, so it imports this module.
        from rlflow.reward_models.base import check_reward_inputs

        check_reward_inputs(images, prompts, "ShapesOracle")
        return {dim: self._score(dim, images, prompts) for dim in self.dimensions}

    def label_probabilities(self, images_a: Tensor, images_b: Tensor, prompts: Sequence[str]) -> Tensor:
        """``[B, D, 3]`` rater probabilities of (A, B, tie) per pair and dimension."""
        if images_a.shape != images_b.shape:
            raise ValueError(
                f"images_a {tuple(images_a.shape)} and images_b {tuple(images_b.shape)} must have the same shape"
            )
        scores_a, scores_b = self.scores(images_a, prompts), self.scores(images_b, prompts)
        return self.probabilities_from_scores(
            torch.stack([scores_a[d] for d in self.dimensions], dim=1),
            torch.stack([scores_b[d] for d in self.dimensions], dim=1),
        )

    def probabilities_from_scores(self, scores_a: Tensor, scores_b: Tensor) -> Tensor:
        """``[..., 3]`` rater probabilities from score tensors ``[...]`` (e.g. ``[B, D]``)."""
        return bt_ties_label_probabilities(scores_a, scores_b, self.scale, self.theta)

    @staticmethod
    def sample_labels(probabilities: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw int64 labels (0 = A, 1 = B, 2 = tie) from ``probabilities [..., 3]``, one uniform per label."""
        u = torch.rand(probabilities.shape[:-1], generator=generator, dtype=torch.float64)
        cumulative = probabilities.double().cumsum(dim=-1).cpu()
        # The tie (last) bucket absorbs round-off: u < 1 always, but cumsum may end at 1 - 1e-16.
        return (u[..., None] >= cumulative[..., :2]).sum(dim=-1).to(torch.int64)

    def label(
        self,
        images_a: Tensor,
        images_b: Tensor,
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``[B, D]`` int64 sampled rater labels (0 = A preferred, 1 = B preferred, 2 = tie)."""
        return self.sample_labels(self.label_probabilities(images_a, images_b, prompts), generator)

    def agreement_ceiling(self, probabilities: Tensor) -> dict[str, dict[str, float]]:
        """:func:`agreement_ceiling` with this oracle's dimension names."""
        return agreement_ceiling(probabilities, self.dimensions)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        # Imported here: rlflow.reward_models registers this reward, so it imports this module.
        from rlflow.reward_models.base import check_reward_inputs

        check_reward_inputs(images, prompts, "ShapesOracle")
        return self._score(self.reward_dimension, images, prompts)
