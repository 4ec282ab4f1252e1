"""Nearest-rank percentiles, the one definition every report of this project uses (the simulator,
the benchmarks, the gateway's own latency figures), so their p50 and p99 mean the same thing."""
from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) by nearest rank; None when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
