"""The shapes-world oracle: BT-with-ties raters, agreement ceiling, win rate, image quality."""

from __future__ import annotations

import math

import pytest
import torch

from rlflow.worlds.shapes.oracle import (
    ShapesOracle,
    agreement_ceiling,
    bt_ties_label_probabilities,
    shapes_image_quality,
    win_rate,
)
from rlflow.worlds.shapes.prompts import COLORS
from rlflow.worlds.shapes.render import render
from rlflow.worlds.shapes.verifier import ShapesVerifier

PROMPTS = ["a red circle", "two blue squares", "a green triangle and a white circle", "a yellow square"]


def test_bt_ties_probabilities_hand_computed() -> None:
    # scale 10, theta 2, scores 0.7 vs 0.5: d = 2.
    probs = bt_ties_label_probabilities(torch.tensor(0.7), torch.tensor(0.5), scale=10.0, theta=2.0)
    p_a = 1 / (1 + 2 * math.exp(-2))  # sigmoid(2 - log 2)
    p_b = 1 / (1 + 2 * math.exp(2))  # sigmoid(-2 - log 2)
    assert probs.tolist() == pytest.approx([p_a, p_b, 1 - p_a - p_b], abs=1e-6)
    assert probs.tolist() == pytest.approx([0.786986, 0.0633786, 0.149636], abs=1e-5)


@pytest.mark.parametrize("theta", [1.5, 2.0, 5.0])
def test_bt_ties_matches_anchor_closed_form(theta: float) -> None:
    r_a = torch.tensor([0.0, 0.3, -1.2, 2.0], dtype=torch.float64)
    r_b = torch.tensor([0.0, 0.9, 0.4, -0.5], dtype=torch.float64)
    probs = bt_ties_label_probabilities(r_a, r_b, scale=1.0, theta=theta)
    ea, eb = r_a.exp(), r_b.exp()
    tie = (theta**2 - 1) * ea * eb / ((ea + theta * eb) * (theta * ea + eb))  # ANCHORS, VideoReward
    assert torch.allclose(probs[:, 2], tie, atol=1e-12)
    assert torch.allclose(probs[:, 0], ea / (ea + theta * eb), atol=1e-12)  # Rao-Kupper P(A)
    assert probs[0, 2].item() == pytest.approx((theta - 1) / (theta + 1))  # equal scores
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    no_ties = bt_ties_label_probabilities(r_a, r_b, scale=1.0, theta=1.0)
    assert torch.allclose(no_ties[:, 2], torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_sampled_labels_follow_probabilities() -> None:
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(20000, 3, 3)
    labels = ShapesOracle.sample_labels(probs, torch.Generator().manual_seed(0))
    assert labels.shape == (20000, 3) and labels.dtype == torch.int64
    freq = torch.stack([(labels[:, 0] == c).float().mean() for c in range(3)])
    assert freq.tolist() == pytest.approx([0.7, 0.1, 0.2], abs=0.015)
    assert (labels[:, 1] == 1).all() and (labels[:, 2] == 2).all()


def test_agreement_ceiling_hand_made() -> None:
    probs = torch.tensor([[[0.7, 0.1, 0.2]], [[0.2, 0.2, 0.6]]])  # [N=2, D=1, 3]
    ceiling = agreement_ceiling(probs, ["alignment"])
    assert ceiling["alignment"]["with_ties"] == pytest.approx((0.7 + 0.6) / 2)
    # max(pA, pB) / (pA + pB) per pair, weighted by pA + pB: (0.7 + 0.2) / (0.8 + 0.4).
    assert ceiling["alignment"]["without_ties"] == pytest.approx(0.75)
    assert agreement_ceiling(probs[:, 0])["0"]["with_ties"] == pytest.approx(0.65)
    with pytest.raises(ValueError, match=r"\[N, D, 3\]"):
        agreement_ceiling(torch.zeros(2, 2))


def test_win_rate_counts_ties_half() -> None:
    assert win_rate(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.0, 2, 5, 4])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])) == 1.0
    # All pairs: 1v1 tie, 1v0 win, 2v1 win, 2v0 win -> 3.5 / 4.
    assert win_rate(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), pairing="all") == pytest.approx(0.875)
    with pytest.raises(ValueError, match="pairing='all'"):
        win_rate(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))


def _speckle(images: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Put ``count`` isolated palette-coloured dots on the background of each image (vectorised)."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    out = images.clone()
    palette = torch.tensor(list(COLORS.values()))
    # Dots on a coarse grid (every 3rd pixel) so no two dots touch; only where the 3x3 is background.
    ys = torch.randint(0, h // 3, (b, count), generator=g) * 3 + 1
    xs = torch.randint(0, w // 3, (b, count), generator=g) * 3 + 1
    colours = palette[torch.randint(len(palette), (b, count), generator=g)]  # [b, count, 3]
    background = torch.nn.functional.max_pool2d(images.amax(1, keepdim=True), 3, 1, 1)[:, 0] == 0
    bi = torch.arange(b)[:, None].expand(b, count)
    free = background[bi, ys, xs]
    out.permute(0, 2, 3, 1)[bi[free], ys[free], xs[free]] = colours[free]
    return out


def test_quality_clean_vs_degraded() -> None:
    clean = render(PROMPTS, torch.Generator().manual_seed(0))
    quality = shapes_image_quality(clean)
    assert torch.allclose(quality, torch.ones(4))  # rendered images have no defects
    speckled = _speckle(clean, 6)
    many = _speckle(clean, 30)
    q_speckled, q_many = shapes_image_quality(speckled), shapes_image_quality(many)
    assert (q_speckled < 1).all() and (q_many < q_speckled).all()
    # Each isolated dot is one defect pixel: quality = exp(-dots / temperature).
    dots = (speckled != clean).any(1).flatten(1).sum(1).float()
    assert torch.allclose(q_speckled, torch.exp(-dots / 8.0), atol=1e-6)
    # Muddy colours (half-way mixtures) and blur also lower quality; a faint haze does not.
    assert (shapes_image_quality(clean * 0.5) < 0.01).all()
    blurred = torch.nn.functional.avg_pool2d(clean, 3, 1, 1)
    assert (shapes_image_quality(blurred) < 0.5).all()
    assert torch.allclose(shapes_image_quality((clean + 0.05).clamp(0, 1)), torch.ones(4))


def test_oracle_scores_labels_and_reward() -> None:
    clean = render(PROMPTS, torch.Generator().manual_seed(1))
    noisy = _speckle(clean, 20)
    oracle = ShapesOracle()
    scores = oracle.scores(clean, PROMPTS)
    assert set(scores) == {"alignment", "quality"}
    assert torch.equal(scores["alignment"], ShapesVerifier()(clean, PROMPTS))
    probs = oracle.label_probabilities(clean, noisy, PROMPTS)
    assert probs.shape == (4, 2, 3) and torch.allclose(probs.sum(-1), torch.ones(4, 2))
    assert (probs[:, 1, 0] > probs[:, 1, 1]).all()  # the clean image wins on quality
    labels = oracle.label(clean, noisy, PROMPTS, torch.Generator().manual_seed(0))
    assert labels.shape == (4, 2) and labels.dtype == torch.int64
    assert torch.equal(oracle(clean, PROMPTS), scores["alignment"])
    assert torch.allclose(ShapesOracle(reward_dimension="quality")(clean, PROMPTS), torch.ones(4))
    assert list(oracle.agreement_ceiling(probs)) == ["alignment", "quality"]
    single = ShapesOracle(dimensions=("quality",))
    assert single.label_probabilities(clean, noisy, PROMPTS).shape == (4, 1, 3)
    with pytest.raises(ValueError, match="theta"):
        ShapesOracle(theta=0.5)
    with pytest.raises(ValueError, match="dimensions"):
        ShapesOracle(dimensions=("style",))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle(clean * 2 - 1, PROMPTS)
