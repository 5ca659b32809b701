"""Preference losses and metrics for reward models: Bradley-Terry, Bradley-Terry with ties (Rao-Kupper, as in
VideoReward), their accuracies, and the noised pairs of noise-aware reward models.

* ``bt`` - ``-log sigmoid(r_w - r_l - margin)`` on decided pairs (ties are skipped), plus TRL's optional
  centring term ``center_coef * mean((r_a + r_b)^2)`` that pins the free offset of the scores;
* ``bt_ties`` - with tie parameter ``theta > 1``: ``P(A > B) = sigmoid(d - log theta)``,
  ``P(tie) = 1 - P(A > B) - P(B > A)`` with ``d = r_A - r_B``, so ties are data too.

Scores and labels are ``[B, D]`` (one column per label dimension); see ``docs/reward_models.md``. Trained by
:mod:`rlflow.trainers.reward_model`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

from rlflow.flows import linear_path

__all__ = [
    "LABEL_A",
    "LABEL_B",
    "LABEL_TIE",
    "accuracy_with_ties",
    "accuracy_without_ties",
    "bradley_terry_loss",
    "bt_ties_loss",
    "bt_ties_probabilities",
    "noised_pair",
    "preference_loss",
    "preference_metrics",
]

# Label codes of rlflow.data.preferences (repeated so the losses import nothing heavy).
LABEL_A, LABEL_B, LABEL_TIE = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def _check_scores(r_a: Tensor, r_b: Tensor, labels: Tensor | None = None) -> None:
    if r_a.shape != r_b.shape:
        raise ValueError(f"r_a {tuple(r_a.shape)} and r_b {tuple(r_b.shape)} must have the same shape")
    if labels is not None and labels.shape != r_a.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the scores' shape {tuple(r_a.shape)}")


def _check_theta(theta: float) -> None:
    if not theta > 1.0:
        raise ValueError(f"the tie parameter theta must be > 1 (theta = 1 means no ties), got {theta}")


def bradley_terry_loss(
    r_a: Tensor, r_b: Tensor, labels: Tensor, margin: float | Tensor = 0.0, center_coef: float = 0.0
) -> Tensor:
    """Per-pair ``-log sigmoid(r_w - r_l - margin) + center_coef * (r_a + r_b)^2`` (same shape as the scores).

    ``labels`` are 0 (A preferred) / 1 (B preferred) / 2 (tie). Ties carry no Bradley-Terry information:
    their entry is 0 and the caller averages over decided pairs only (``labels != 2``). The mean over
    pairs of the centring term is TRL's ``center_coef * mean((r_chosen + r_rejected)^2)``.
    """
    _check_scores(r_a, r_b, labels)
    diff = torch.where(labels == LABEL_B, r_b - r_a, r_a - r_b)  # r_w - r_l
    loss = -logsigmoid(diff - margin)
    if center_coef:
        loss = loss + center_coef * (r_a + r_b) ** 2
    return torch.where(labels == LABEL_TIE, torch.zeros_like(loss), loss)


def _bt_ties_log_probabilities(r_a: Tensor, r_b: Tensor, theta: float) -> tuple[Tensor, Tensor, Tensor]:
    """``log P(A > B), log P(B > A), log P(tie)`` of Bradley-Terry with ties, ``d = r_A - r_B``:
    ``log sigmoid(+-d - log theta)`` and their sum plus ``log(theta^2 - 1)``."""
    _check_theta(theta)
    log_theta = math.log(theta)
    d = r_a - r_b
    log_p_a = logsigmoid(d - log_theta)
    log_p_b = logsigmoid(-d - log_theta)
    return log_p_a, log_p_b, log_p_a + log_p_b + math.log(theta**2 - 1.0)


def bt_ties_loss(r_a: Tensor, r_b: Tensor, labels: Tensor, theta: float = 5.0) -> Tensor:
    """Per-pair negative log-likelihood of Bradley-Terry with ties (Rao-Kupper), ``d = r_A - r_B``::

    decided: -log sigmoid(r_w - r_l - log theta)
    tie:     -log sigmoid(d - log theta) - log sigmoid(-d - log theta) - log(theta^2 - 1)
    """
    _check_scores(r_a, r_b, labels)
    log_p_a, log_p_b, log_p_tie = _bt_ties_log_probabilities(r_a, r_b, theta)
    return -torch.where(labels == LABEL_A, log_p_a, torch.where(labels == LABEL_B, log_p_b, log_p_tie))


def bt_ties_probabilities(r_a: Tensor, r_b: Tensor, theta: float = 5.0) -> Tensor:
    """``[..., 3]`` probabilities (A preferred, B preferred, tie) of the Bradley-Terry-with-ties model.

    ``P(tie) = (theta^2 - 1) e^rA e^rB / ((e^rA + theta e^rB)(theta e^rA + e^rB))``, computed in log space;
    the three sum to 1.
    """
    _check_scores(r_a, r_b)
    return torch.stack(_bt_ties_log_probabilities(r_a, r_b, theta), dim=-1).exp()


def preference_loss(
    r_a: Tensor,
    r_b: Tensor,
    labels: Tensor,
    *,
    loss: Literal["bt", "bt_ties"],
    theta: float = 5.0,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Multi-head loss for scores/labels ``[B, D]``: ``(total, per_dimension [D])``.

    Each dimension's loss is the mean over the pairs that count for it (``bt``: decided pairs; a dimension
    with none contributes 0); ``total`` is the mean over dimensions.
    """
    if loss == "bt":
        per_pair = bradley_terry_loss(r_a, r_b, labels, margin=margin, center_coef=center_coef)
        counts = (labels != LABEL_TIE).to(r_a.dtype)
    elif loss == "bt_ties":
        per_pair = bt_ties_loss(r_a, r_b, labels, theta=theta)
        if center_coef:
            per_pair = per_pair + center_coef * (r_a + r_b) ** 2
        counts = torch.ones_like(r_a)
    else:
        raise ValueError(f"unknown preference loss {loss!r}; choose bt or bt_ties")
    per_dimension = (per_pair * counts).sum(dim=0) / counts.sum(dim=0).clamp_min(1.0)
    return per_dimension.mean(), per_dimension


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def accuracy_without_ties(r_a: Tensor, r_b: Tensor, labels: Tensor) -> float:
    """Fraction of decided pairs (labels 0/1) where ``sign(r_a - r_b)`` agrees (equal scores count 1/2);
    NaN when there is no decided pair."""
    decided = labels != LABEL_TIE
    if not bool(decided.any()):
        return math.nan
    d = (r_a - r_b)[decided]
    wanted = torch.where(labels[decided] == LABEL_A, 1.0, -1.0)
    return ((torch.sign(d) * wanted + 1.0) / 2.0).mean().item()


def accuracy_with_ties(r_a: Tensor, r_b: Tensor, labels: Tensor, theta: float = 5.0) -> float:
    """Fraction of all pairs whose label is the argmax of the 3-way (A, B, tie) BT-with-ties probabilities."""
    if labels.numel() == 0:
        return math.nan
    predicted = bt_ties_probabilities(r_a, r_b, theta).argmax(dim=-1)
    return (predicted == labels).float().mean().item()


def preference_metrics(r_a: Tensor, r_b: Tensor, labels: Tensor, theta: float = 5.0) -> dict[str, float]:
    """One dimension's metrics on scores/labels ``[N]``: ``accuracy`` (without ties), ``accuracy_with_ties``,
    ``margin`` (mean ``r_w - r_l`` over decided pairs), ``tie_fraction``."""
    decided = labels != LABEL_TIE
    diff = torch.where(labels == LABEL_B, r_b - r_a, r_a - r_b)
    return {
        "accuracy": accuracy_without_ties(r_a, r_b, labels),
        "accuracy_with_ties": accuracy_with_ties(r_a, r_b, labels, theta),
        "margin": diff[decided].mean().item() if bool(decided.any()) else math.nan,
        "tie_fraction": (~decided).float().mean().item() if labels.numel() else math.nan,
    }


# ---------------------------------------------------------------------------------------------------------
# Noise-aware pairs
# ---------------------------------------------------------------------------------------------------------


def noised_pair(latents_a: Tensor, latents_b: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_t^a, x_t^b)`` with ``x_t = (1 - t) noise + t x1``: the SAME ``t`` [B] and ``noise`` for both members."""
    if latents_a.shape != latents_b.shape or noise.shape != latents_a.shape:
        raise ValueError(
            f"latents_a {tuple(latents_a.shape)}, latents_b {tuple(latents_b.shape)} and noise "
            f"{tuple(noise.shape)} must have the same shape"
        )
    return linear_path(noise, latents_a, t).x_t, linear_path(noise, latents_b, t).x_t
