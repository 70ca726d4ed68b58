"""Confidence intervals for counts: k refused of n prompts is a rate known only to within sampling error.

The Wilson score interval (Wilson 1927) is the set of rates p for which k/n lies within z standard
errors of p, sqrt(p (1 - p) / n). Unlike the normal approximation around k/n it stays inside [0, 1] and
is not zero-width at 0/n or n/n, which is where abliteration results live (0/32 refused is not "0 %").
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the rate behind k successes in n trials (n > 0)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_text(k: int, n: int) -> str:
    """'37.5 % (12/32; 95 % CI 22.9-54.7 %)': the rate, the count and its Wilson interval."""
    if n <= 0:
        return "- (0 prompts)"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} % ({k}/{n}; 95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)"


def interval_text(k: int, n: int) -> str:
    """'22.9-54.7 %': the Wilson interval alone, for tables that show k/n beside it."""
    lo, hi = wilson(k, n)
    return f"{100 * lo:.1f}-{100 * hi:.1f} %"
