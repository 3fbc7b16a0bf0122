"""Closed-loop conditions taking turns in segments, and how much CPU the hypervisor stole in each."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.stats import summarize


def steal_ms() -> float | None:
    """CPU time the hypervisor gave to other guests, all CPUs together, since boot (the "steal" column
    of /proc/stat); None where there is no such counter. A burst of it stalls any thread, FIFO or not."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return float(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")


def segment_plan(conditions: list[str], ticks: int, segment_ticks: int) -> list[tuple[str, int]]:
    """(condition, ticks) in run order: every condition runs ``ticks`` in segments of ``segment_ticks``,
    round robin with the order rotating each round, so a burst of machine noise (a neighbour, the
    hypervisor) falls on all conditions alike instead of on whichever ran during it."""
    plan: list[tuple[str, int]] = []
    remaining = dict.fromkeys(conditions, ticks)
    segment_ticks = max(1, segment_ticks)
    round_index = 0
    while any(remaining.values()):
        shift = round_index % len(conditions)
        for condition in conditions[shift:] + conditions[:shift]:
            count = min(segment_ticks, remaining[condition])
            if count:
                plan.append((condition, count))
                remaining[condition] -= count
        round_index += 1
    return plan


def segment_summary(records: np.ndarray, stolen_ms: float | None) -> dict:
    return {"ticks": int(len(records)), "steal_ms": stolen_ms,
            "start_jitter_p99": summarize(records["start_jitter_ms"]).get("p99"),
            "tick_p99": summarize(records["tick_ms"]).get("p99")}


def steal_split(segments: list[dict]) -> dict | None:
    """Jitter and tick p99 in the segments with the least hypervisor steal vs those with the most (the
    halves of the segments sorted by steal): how much of a run's tail the machine, not the code, made."""
    known = [s for s in segments if s["steal_ms"] is not None and s["start_jitter_p99"] is not None]
    if len(known) < 2:
        return None
    known.sort(key=lambda s: s["steal_ms"])
    half = len(known) // 2
    out = {}
    for name, part in (("least", known[:half]), ("most", known[-half:])):
        out[name] = {"segments": len(part), "steal_ms_mean": float(np.mean([s["steal_ms"] for s in part])),
                     "start_jitter_p99_median": float(np.median([s["start_jitter_p99"] for s in part])),
                     "tick_p99_median": float(np.median([s["tick_p99"] for s in part]))}
    return out

