"""Statistics over N boots: n, min, median, mean, p90, p95, max, standard deviation.

Percentiles are linear interpolation between the closest ranks: Hyndman & Fan type 7, the
default of numpy.percentile, R's quantile() and Excel's PERCENTILE.INC. For p at rank
h = (n-1)·p/100 the value is x[floor(h)] + (h - floor(h))·(x[floor(h)+1] - x[floor(h)]).
With few boots p90/p95 lie between the two largest values; ``max`` is the conservative choice.
The standard deviation is the sample one (n-1 in the denominator); it is None for n < 2.
"""

from __future__ import annotations

import math
from typing import Sequence

PERCENTILE_METHOD = "linear interpolation between closest ranks (Hyndman-Fan type 7, numpy default)"
STATISTICS = ("n", "min", "median", "mean", "p90", "p95", "max", "stdev")


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Every statistic of ``values`` (an empty input gives n=0 and None elsewhere)."""
    n = len(values)
    if n == 0:
        return {k: (0 if k == "n" else None) for k in STATISTICS}
    mean = math.fsum(values) / n
    stdev = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "min": min(values), "median": percentile(values, 50), "mean": mean,
            "p90": percentile(values, 90), "p95": percentile(values, 95), "max": max(values), "stdev": stdev}


def statistic(values: Sequence[float], name: str) -> float:
    """One statistic by the manifest's name: median, p90, p95 or max (also min, mean)."""
    s = summarize(values)
    if name not in s or name in ("n", "stdev"):
        raise ValueError(f"unknown statistic {name!r}")
    v = s[name]
    if v is None:
        raise ValueError("no values")
    return float(v)
