"""Mean ± 95% confidence interval over seeds, and paired differences (same seed = same data order).

CI half-width = t_{0.975, n−1} · s / √n with s the sample standard deviation (Student's t: a handful of
seeds is far from the normal limit: t = 4.30 for n = 3, not 1.96). A paired difference d_s = x_s − y_s
over the seeds both methods ran removes the seed's own effect (data order), so its CI is the honest test
of "A beats B" at this number of seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond 30 the normal 1.96 is within 4%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile for ``df`` degrees of freedom (df ≥ 1)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Estimate:
    """Mean of n values with its 95% CI half-width (None for a single value)."""

    mean: float
    half_width: float | None
    n: int

    def text(self, digits: int = 4) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def estimate(values: list[float]) -> Estimate | None:
    """Mean ± t·s/√n of ``values`` (None when empty)."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, t975(n - 1) * math.sqrt(var / n), n)


def paired(x: dict[int, float], y: dict[int, float]) -> Estimate | None:
    """Mean ± CI of x_s − y_s over the seeds s both hold."""
    common = sorted(set(x) & set(y))
    return estimate([x[s] - y[s] for s in common])
