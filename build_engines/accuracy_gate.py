"""Closed-loop part of the accuracy gate: each bundle target drives the reference world through the
runtime's own policy pipeline (ONNX Runtime), on held-out seeds.

The same runs calibrate the uncertainty threshold per target: a high quantile of the MC-dropout
score over every tick of the successful (in-distribution) episodes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)

GATE_SEED_BASE = 8_000_000  # held out from training, evaluation and calibration


def closed_loop(bundle_dir: Path, targets: list[str], seeds: int, mc_samples: int, quantile: float,
                mask_seed: int = 0) -> dict[str, dict]:
    bundle = Bundle.load(bundle_dir)  # also checks the draft bundle's hashes
    world = TabletopWorld()
    results = {}
    for target in targets:
        with PolicyPipeline(bundle, target=target, mc_samples=mc_samples, mask_seed=mask_seed) as pipeline:
            successes = 0
            calm_scores: list[float] = []
            for seed in range(GATE_SEED_BASE, GATE_SEED_BASE + seeds):
                obs = world.reset(seed)
                embedding = pipeline.cache.encode_now(obs.instruction)
                scores = []
                while not world.done:
                    out = pipeline.infer(obs.frame, obs.proprio, embedding)
                    scores.append(out.score)
                    obs = world.step(out.action.copy())
                if world.success:
                    successes += 1
                    calm_scores.extend(scores)
            threshold = float(np.quantile(calm_scores, quantile)) if calm_scores else float("nan")
            results[target] = {"episodes": seeds, "successes": successes, "success_rate": successes / seeds,
                               "threshold": threshold, "ticks": len(calm_scores),
                               "score_median": float(np.median(calm_scores)) if calm_scores else float("nan")}
            logger.info("closed loop %s: %d/%d successes, threshold %.4f", target, successes, seeds, threshold)
    return results
