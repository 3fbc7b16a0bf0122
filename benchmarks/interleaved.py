"""Part 1: pure inference, side by side and interleaved: every round runs one iteration of each
configuration, unloaded and loaded, in an order that rotates from round to round."""

from __future__ import annotations

import logging
import time

import numpy as np

from benchmarks.configs import Config
from benchmarks.cpu_load import CpuBurner, load_state
from benchmarks.settings import LABELS, LOADS, PERIOD_S, BenchSettings
from benchmarks.stats import summarize

logger = logging.getLogger(__name__)

_MIN_ROUNDS = 2  # complete rounds the time budget never cuts; after them it is checked before every iteration


def run_interleaved(configs: list[Config], settings: BenchSettings, burner: CpuBurner | None) -> dict:
    """Round-robin over the configurations (rotating order), unloaded and loaded in every round.

    After ``_MIN_ROUNDS`` complete rounds no iteration starts once ``settings.budget_seconds`` are spent,
    so a slow or busy machine (one PyTorch iteration at T=32 is 32 full passes) still finishes in time.
    """
    loads = LOADS if burner is not None else LOADS[:1]
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        c.id: {load: {} for load in loads} for c in configs
    }
    for config in configs:
        for _ in range(settings.warmup if config.warmup is None else min(settings.warmup, config.warmup)):
            config.run()
    planned = max((c.iterations for c in configs), default=0)
    started = time.monotonic()
    rounds = 0
    spent = False
    for index in range(planned):
        shift = index % len(configs)
        order = configs[shift:] + configs[:shift]
        for load in loads:
            with load_state(burner, load == "loaded"):
                for config in order:
                    if index >= config.iterations:
                        continue
                    if index >= _MIN_ROUNDS and time.monotonic() - started > settings.budget_seconds:
                        spent = True
                        break
                    for stage, ms in config.run().items():
                        samples[config.id][load].setdefault(stage, []).append(ms)
            if spent:
                break
        if spent:
            logger.warning("side by side: time budget of %.0f s spent in round %d of %d (--budget-seconds)",
                           settings.budget_seconds, index + 1, planned)
            break
        rounds += 1
        if index % 10 == 9:
            logger.info("side by side: round %d of %d (%.0f s)", index + 1, planned, time.monotonic() - started)
    results = {}
    for config in configs:
        entry = {"key": config.key, "label": LABELS.get(config.key, config.key), "family": config.family,
                 "samples": config.samples}
        for load in loads:
            raw = samples[config.id][load]
            total = raw.get("total", [])
            entry[load] = {
                "total": summarize(total),
                "stages": {stage: summarize(v) for stage, v in raw.items() if stage != "total"},
                "over_period": int(np.sum(np.asarray(total) > PERIOD_S * 1e3)),
                "values_ms": [float(v) for v in total],
            }
        results[config.id] = entry
    return {"rounds": rounds, "planned_rounds": planned, "budget_spent": spent, "seconds": time.monotonic() - started,
            "configs": results}

