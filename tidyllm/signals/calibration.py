"""Per-source calibration: a judge's scores regressed on the human labels of the same calls.

A judge is a biased, noisy measurement. Where humans labelled calls a judge also scored, the least
squares line ``human ≈ a + b·judge`` corrects the judge's bias and scale, and the correlation between
the two says how much a judge score is worth: a calibrated judge counts ``weight · max(r, 0)``
observations. Both are shrunk towards "the judge is right" by ``min_pairs`` pseudo-pairs, so few pairs
move them little; until a source has ``min_pairs`` such calls it is used as scored, at its configured weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Calibration", "fit_calibration"]


@dataclass(frozen=True)
class Calibration:
    """How one source's scores map to the human scale."""

    source: str
    pairs: int
    intercept: float = 0.0
    slope: float = 1.0
    correlation: float | None = None
    #: mean of (source − human) over the pairs: the source's bias
    bias: float | None = None
    #: mean absolute difference between the source and the human label
    mean_abs_diff: float | None = None
    calibrated: bool = False
    #: share of the configured weight a calibrated score keeps (the correlation, shrunk towards 1 on few pairs)
    reliability: float = 1.0

    def apply(self, score: float) -> float:
        """The calibrated score, clamped to [0, 1]."""
        if not self.calibrated:
            return score
        return min(1.0, max(0.0, self.intercept + self.slope * score))

    def weight(self, configured: float) -> float:
        """Observations one score counts for: the configured weight, scaled by the agreement once calibrated."""
        if not self.calibrated:
            return configured
        return configured * self.reliability


def fit_calibration(source: str, scores: Sequence[float], human: Sequence[float], min_pairs: int = 8) -> Calibration:
    """Regress ``human`` on ``scores`` (same calls, same order)."""
    n = len(scores)
    if n != len(human):
        raise ValueError("fit_calibration needs one human label per score")
    if n == 0:
        return Calibration(source, 0)
    mx, my = sum(scores) / n, sum(human) / n
    sxx = sum((x - mx) ** 2 for x in scores)
    syy = sum((y - my) ** 2 for y in human)
    sxy = sum((x - mx) * (y - my) for x, y in zip(scores, human))
    bias = mx - my
    mad = sum(abs(x - y) for x, y in zip(scores, human)) / n
    corr = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
    if n < min_pairs or sxx <= 1e-12:
        return Calibration(source, n, correlation=corr, bias=bias, mean_abs_diff=mad)
    # shrunk towards "the judge is right" (slope 1, intercept 0, full weight) by min_pairs pseudo-pairs, so a
    # line fitted on few calls cannot flatten the judge's scores (or its weight) on the strength of noise
    k = n / (n + min_pairs)
    slope = k * (sxy / sxx) + (1.0 - k)
    intercept = k * (my - (sxy / sxx) * mx)
    reliability = k * max(corr or 0.0, 0.0) + (1.0 - k)
    return Calibration(source, n, intercept=intercept, slope=slope, correlation=corr, bias=bias,
                       mean_abs_diff=mad, calibrated=True, reliability=reliability)
