"""What the closed loop's tick records say: time inside the policy, the slow tail, one run's summary."""

from __future__ import annotations

import numpy as np

from benchmarks.settings import COPY_STAGES, PERIOD_S, POLICY_STAGES, TICK_STAGES
from benchmarks.stats import summarize
from edge.control.loop import Mode

# One closed-loop tick as the benchmark reports it: its start offset from the grid, T, and stage times.
TICK_RECORD = np.dtype([
    ("start_s", np.float64), ("start_jitter_ms", np.float64), ("samples", np.int32), ("mode", np.int8),
    ("tick_ms", np.float64), ("frame_age_ms", np.float64), ("glass_to_wire_ms", np.float64),
    *[(s, np.float64) for s in (*TICK_STAGES, *COPY_STAGES)],
])
# The benchmark's stages from the loop's named sections (edge.control.status.TICK_STAGES): camera_read is
# the loop's observe (the camera frame copy and the latest telemetry), gate_safety its gate and safety
# sections together, serial_write its send.
LOOP_SECTIONS = {"camera_read": ("observe",), "gate_safety": ("gate", "safety"), "serial_write": ("send",),
                 **{stage: (stage,) for stage in (*POLICY_STAGES, *COPY_STAGES)}}


def tick_table(records: np.ndarray) -> np.ndarray:
    """ControlLoop tick records (edge.control.status.tick_dtype) as TICK_RECORD rows. T is 0 on ticks
    that did not run the policy; a stage is NaN where none of its sections ran."""
    table = np.zeros(len(records), dtype=TICK_RECORD)
    for name, source in (("start_s", "start_s"), ("start_jitter_ms", "start_offset_ms"), ("samples", "samples"),
                         ("mode", "mode"), ("tick_ms", "tick_ms")):
        table[name] = records[source]
    table["frame_age_ms"] = (records["start_s"] - records["frame_time_s"]) * 1e3
    # Capture -> the command's bytes handed to the link: the frame's age, the observe section, then tick_ms
    # (frame ready -> command written), as the status snapshot derives it (edge/control/status.py).
    table["glass_to_wire_ms"] = table["frame_age_ms"] + records["observe_ms"] + records["tick_ms"]
    for stage, sections in LOOP_SECTIONS.items():
        columns = np.stack([records[f"{section}_ms"].astype(np.float64) for section in sections])
        ran = np.isfinite(columns).any(axis=0)
        table[stage] = np.where(ran, np.nansum(columns, axis=0), np.nan)
    return table
SLOWEST_FRACTION = 0.05  # the slow tail that the tail attribution explains


def policy_ms(records: np.ndarray) -> np.ndarray:
    """Per tick, the time inside PolicyPipeline.infer (resize .. reduce): what the side-by-side run calls
    pure inference, here measured inside the loop. NaN for ticks that did not run the policy."""
    total = np.zeros(len(records))
    for stage in POLICY_STAGES:
        total += np.nan_to_num(records[stage], nan=0.0)
    total[~np.isfinite(records["vision"])] = np.nan
    return total


def tail_attribution(records: np.ndarray, fraction: float = SLOWEST_FRACTION) -> dict:
    """Which stage makes the slow ticks slow: for the slowest ``fraction`` of ticks, each stage's mean
    minus that stage's median over all ticks. "outside stages" is the rest of the tick (loop glue, the
    rate keeper's bookkeeping, being descheduled between stages)."""
    tick = records["tick_ms"]
    finite = np.isfinite(tick) & np.isfinite(records["vision"])
    if not finite.any():
        return {"n": 0}
    ran = records[finite]
    cutoff = float(np.quantile(ran["tick_ms"], 1.0 - fraction))
    slow = ran[ran["tick_ms"] >= cutoff]
    columns = {stage: ran[stage] for stage in TICK_STAGES}
    columns["outside stages"] = ran["tick_ms"] - sum(np.nan_to_num(ran[stage], nan=0.0) for stage in TICK_STAGES)
    slow_columns = {stage: slow[stage] for stage in TICK_STAGES}
    slow_columns["outside stages"] = columns["outside stages"][ran["tick_ms"] >= cutoff]
    excess = {}
    for stage, values in columns.items():
        median = float(np.nanmedian(values)) if np.isfinite(values).any() else 0.0
        slow_mean = float(np.nanmean(slow_columns[stage])) if np.isfinite(slow_columns[stage]).any() else 0.0
        excess[stage] = {"median": median, "slow_mean": slow_mean, "excess": slow_mean - median}
    return {"n": int(len(slow)), "fraction": fraction, "tick_cutoff_ms": cutoff,
            "tick_slow_mean_ms": float(slow["tick_ms"].mean()), "tick_median_ms": float(np.median(ran["tick_ms"])),
            "stages": excess, "largest": max(excess, key=lambda k: excess[k]["excess"])}


def summarize_run(records: np.ndarray, samples_cycle: tuple[int, ...], seconds: float, *, overruns: int,
                  missed_deadlines: int, origin_s: float | None = None) -> dict:
    """One closed-loop run's section of the report, from its tick records (TICK_RECORD)."""
    finite_modes = records["mode"]
    stages = {stage: summarize(records[stage]) for stage in TICK_STAGES}
    policy = policy_ms(records)
    by_samples = {}
    for samples in samples_cycle:
        chosen = records["samples"] == samples
        mine = records[chosen]
        by_samples[str(samples)] = {"tick": summarize(mine["tick_ms"]), "policy": summarize(policy[chosen]),
                                    **{stage: summarize(mine[stage]) for stage in TICK_STAGES}}
    start = origin_s if origin_s is not None else (records["start_s"][0] if len(records) else 0.0)
    return {
        "ticks": len(records),
        "seconds": seconds,
        "tick": summarize(records["tick_ms"]),
        "start_jitter": summarize(records["start_jitter_ms"]),
        "frame_age": summarize(records["frame_age_ms"]),
        "glass_to_wire": summarize(records["glass_to_wire_ms"]),
        "stages": stages,
        "copies": {stage: summarize(records[stage]) for stage in COPY_STAGES},  # inside vision and head
        "policy": summarize(policy),
        "outside_policy": summarize(records["tick_ms"] - policy),
        "tail": tail_attribution(records),
        "by_samples": by_samples,
        "overruns": int(overruns),
        "missed_deadlines": int(missed_deadlines),
        "ticks_over_period": int(np.sum(records["tick_ms"] > PERIOD_S * 1e3)),
        "inferred_ticks": int(np.sum(np.isfinite(records["vision"]))),
        "modes": {mode.name.lower(): int(np.sum(finite_modes == mode)) for mode in Mode},
        "series": {
            "t_s": [float(v) for v in records["start_s"] - start],
            "start_jitter_ms": [float(v) for v in records["start_jitter_ms"]],
            "tick_ms": [float(v) for v in records["tick_ms"]],
            "samples": [int(v) for v in records["samples"]],
        },
    }

