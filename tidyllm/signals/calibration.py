"""Per-source calibration: a judge's scores regressed on the human labels of the same calls.

A judge is a biased, noisy measurement. Where humans labelled calls a judge also scored, the least
squares line ``human ≈ a + b·judge`` corrects the judge's bias and scale, and the correlation between
the two says how much a judge score is worth: a calibrated judge counts ``weight · max(r, 0)``
observations. Until a source has ``min_pairs`` such calls it is used as scored, at its configured weight.
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

    def apply(self, score: float) -> float:
        """The calibrated score, clamped to [0, 1]."""
        if not self.calibrated:
            return score
        return min(1.0, max(0.0, self.intercept + self.slope * score))

    def weight(self, configured: float) -> float:
        """Observations one score counts for: the configured weight, scaled by the agreement once calibrated."""
        if not self.calibrated or self.correlation is None:
            return configured
        return configured * max(self.correlation, 0.0)


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
    slope = sxy / sxx
    return Calibration(source, n, intercept=my - slope * mx, slope=slope, correlation=corr, bias=bias,
                       mean_abs_diff=mad, calibrated=True)
