"""Percentile summaries and the JSON they go into."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.settings import PERCENTILES


def summarize(values) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of the finite values (only n when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"n": 0}
    p50, p90, p99, top = np.percentile(array, PERCENTILES)
    return {"n": int(array.size), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(top),
            "mean": float(array.mean())}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    if denominator <= 0.0:
        return None
    return numerator / denominator


def finite_json(value: Any) -> Any:
    """NaN and infinities become null, so the JSON is standard and every number in it is finite."""
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value



def stat_at(entry: dict | None, *path: str) -> float | None:
    """The number at ``path`` in a nested report dict; None where a key is missing or it is not a number."""
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry if isinstance(entry, (int, float)) else None
