"""Small statistics for reports: binomial confidence intervals of success rates and accuracies."""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["success_phrase", "wilson_interval"]


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / trials``.

    Unlike the normal ("Wald") interval ``p +- z sqrt(p (1 - p) / n)``, it stays inside ``[0, 1]`` and does not
    collapse to a point at 0% or 100% success, which are common outcomes of 50-episode evaluations of
    manipulation policies (0 of 50 gives ``[0, 0.071]`` at 95%, not ``[0, 0]``).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def success_phrase(
    rate: float, low: float, high: float, *, base: float | None = None, episodes: int | None = None
) -> str:
    """``success 32% -> 100% (95% CI 93-100%, 50 episodes)``: the line commands end with for success rates."""
    start = "" if base is None else f"{base:.0%} -> "
    count = "" if episodes is None else f", {episodes} episodes"
    return f"success {start}{rate:.0%} (95% CI {low:.0%}-{high:.0%}{count})"
