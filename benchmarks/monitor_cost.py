"""What the failure monitor adds to a tick: `FailureMonitor.update` (the spread gate plus feature novelty
and action consistency on the pipeline's real output) against the spread gate alone (`UncertaintyGate
.update`), interleaved block by block so a load that comes and goes hits both alike. The runtime's own
wiring builds both (edge.service.wiring.failure_monitor)."""

from __future__ import annotations

import time

import numpy as np

from edge.control.uncertainty_gate import UncertaintyGate
from edge.service import wiring

BLOCK = 50  # updates per timed block


def monitor_cost(bundle, config, pipeline, observation, rounds: int = 40) -> dict:
    """p50/p99 per update (microseconds) of the full monitor and of the gate alone, their difference and
    the monitor's p99 as a share of the 100 ms tick."""
    embedding = pipeline.cache.encode_now(observation.instruction) if pipeline.needs_language else None
    out = pipeline.infer(observation.frame, np.asarray(observation.proprio, np.float32), embedding)
    monitor = wiring.failure_monitor(bundle, config)
    gate = UncertaintyGate(wiring.gate_config(bundle, config))
    score = min(float(out.score), 0.5 * gate.config.threshold)  # calm: every signal computed, no state change
    times = {"monitor": [], "spread_gate": []}
    steps = {"monitor": lambda: monitor.update(score, out), "spread_gate": lambda: gate.update(score)}
    for round_index in range(rounds):
        order = ("monitor", "spread_gate") if round_index % 2 == 0 else ("spread_gate", "monitor")
        for name in order:
            step = steps[name]
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    summary = {name: {"p50_us": float(np.percentile(v, 50) * 1e6), "p99_us": float(np.percentile(v, 99) * 1e6)}
               for name, v in times.items()}
    added = {q: summary["monitor"][q] - summary["spread_gate"][q] for q in ("p50_us", "p99_us")}
    return {"updates": rounds * BLOCK, "signals": sorted(monitor.alarms), **summary, "added": added,
            "p99_share_of_tick": summary["monitor"]["p99_us"] * 1e-6 / 0.1,
            "goal": "the monitor adds <= 0.5 ms to a CPU tick"}
