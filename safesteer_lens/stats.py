"""Rates with their uncertainty: every share the toolkit reports carries its n and a 95% interval.

With 40 held-out prompts a refusal rate is uncertain by about ±15 points, which is as large as
most differences between models at this size. The Wilson score interval is used because it
stays inside [0, 1] and keeps a sensible width at 0% and 100%, where the normal approximation
collapses to a zero-width interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion.

    Args:
        successes: Number of positive outcomes.
        n: Number of trials; with 0 trials the interval is the whole of [0, 1].
        z: Normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)``, both in [0, 1].
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue at 0 and n
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A share of ``n`` outcomes with its 95% Wilson interval.

    Attributes:
        k: Positive outcomes.
        n: All outcomes.
    """

    k: int
    n: int

    def __post_init__(self) -> None:
        if self.n < 0 or not 0 <= self.k <= self.n:
            raise ValueError(f"a rate needs 0 <= k <= n, got {self.k} of {self.n}")

    @classmethod
    def of(cls, flags: Iterable[bool]) -> "Rate":
        """The rate of True among ``flags``."""
        flags = [bool(f) for f in flags]
        return cls(sum(flags), len(flags))

    @property
    def value(self) -> float:
        """``k / n`` (0 when there are no outcomes)."""
        return self.k / self.n if self.n else 0.0

    @property
    def low(self) -> float:
        """Lower end of the 95% interval."""
        return wilson_interval(self.k, self.n)[0]

    @property
    def high(self) -> float:
        """Upper end of the 95% interval."""
        return wilson_interval(self.k, self.n)[1]

    def columns(self, name: str) -> dict[str, float | int]:
        """Table cells: ``name``, ``name_low``, ``name_high`` and ``name_n``."""
        return {name: self.value, f"{name}_low": self.low, f"{name}_high": self.high, f"{name}_n": self.n}

    def __str__(self) -> str:
        return format_rate(self.value, self.low, self.high, self.n)


def format_rate(value: float, low: float, high: float, n: int) -> str:
    """``"12.5% [5.0–26.8] n=40"``: a share, its interval in percent, and its n (``n/a`` for n = 0)."""
    if not n:
        return "n/a (n=0)"
    return f"{100 * value:.1f}% [{100 * low:.1f}–{100 * high:.1f}] n={n}"
