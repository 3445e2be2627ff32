"""Small statistics for benchmark results: percentiles of samples, medians across runs, ratios.

Owns only arithmetic on plain numbers; imports nothing from the gateway or the rest of bench.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(samples_ns: Iterable[int]) -> dict[str, float | None]:
    """p50/p90/p99/max of latency samples given in nanoseconds, reported in milliseconds."""
    values = sorted(samples_ns)
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("max_ms", 100.0)):
        value = percentile(values, q)
        out[name] = None if value is None else round(value / 1e6, 3)
    return out


def median_of_runs(runs: Sequence[Mapping[str, object]]) -> dict[str, float | None]:
    """For every numeric field of the runs, the median over the runs that have it (None if none do)."""
    keys: list[str] = []
    for run in runs:
        for key, value in run.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in keys:
                keys.append(key)
    result: dict[str, float | None] = {}
    for key in keys:
        values = [float(v) for run in runs if isinstance(v := run.get(key), int | float)
                  and not isinstance(v, bool)]
        result[key] = round(statistics.median(values), 3) if values else None
    return result


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 3 digits, or None when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)
