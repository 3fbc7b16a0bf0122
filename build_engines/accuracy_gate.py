"""Closed-loop part of the accuracy gate: each bundle target drives a simulated environment through the
runtime's own policy pipeline (ONNX Runtime), on held-out seeds.

An environment is named `--env package.module:factory`; the factory takes no argument and returns an
object with
    reset(seed: int) -> observation      a new episode
    step(action: float32 [action_dim]) -> observation
    done: bool, success: bool            attributes (or properties) read after each step
where an observation has `frame` (uint8 [H, W, 3] BGR), `instruction` (str) and `proprio` (float32 [P]).
The reference world (reference_world.world:TabletopWorld) is one such environment, the reference
policy's default.

The same runs calibrate the uncertainty threshold per target: a high quantile of the MC-dropout
score over every tick of the successful (in-distribution) episodes. With `traces`, every tick of each
successful episode is also kept (spread, pooled vision features, first action) for the failure monitor's
windowed conformal thresholds (build_engines/monitor.py, `closed_loop_thresholds`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engines.camera_codec import episode_quality, jpeg
from build_engines.monitor import pool
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline

logger = logging.getLogger(__name__)

GATE_SEED_BASE = 8_000_000  # held out from training, evaluation and calibration


@dataclass(frozen=True)
class EpisodeTrace:
    """One successful gate episode, tick by tick: what the failure monitor's signals are computed from."""

    spread: np.ndarray  # float64 [n], the MC-dropout score
    features: np.ndarray  # float32 [n, D], the vision features pooled over every axis but the last
    first_actions: np.ndarray  # float32 [n, A], the first action of each inference's mean chunk



def closed_loop_gaps(spec) -> list[str]:
    """What this gate cannot drive for a policy of `spec` (a PolicySpec), though the runtime runs it: an
    environment's observation carries one frame, and the gate steps one action per step (executing a
    chunk against the measured latency is the robot loop's job, not the gate's)."""
    gaps = []
    if len(spec.cameras) != 1:
        gaps.append(f"{len(spec.cameras)} cameras")
    if spec.action.horizon != 1:
        gaps.append(f"action chunks (horizon {spec.action.horizon})")
    return gaps


def make_environment(reference: str):
    from build_engines.errors import GateError
    from build_engines.policy import resolve

    factory = resolve(reference, "--env")
    try:
        world = factory()
    except Exception as exc:  # a user's environment may fail in any way: one line naming it
        raise GateError(f"--env {reference}: the environment factory failed ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in ("reset", "step") if not callable(getattr(world, name, None))]
    if missing:
        raise GateError(f"--env {reference}: the environment has no {' or '.join(missing)} method; it needs "
                        "reset(seed), step(action), done and success")
    return world


def closed_loop(bundle_dir: Path, targets: list[str], seeds: int, mc_samples: int, quantile: float,
                mask_seed: int = 0, *, environment: str, traces: dict[str, list] | None = None,
                camera_jpeg: tuple[int, ...] = ()) -> dict[str, dict]:
    """Per target: successes and the spread threshold; `traces` (when given) gets, per target, one
    EpisodeTrace per successful episode. Each episode's frames pass through the camera's codec, raw or at
    one of the `camera_jpeg` qualities by seed (build_engines/camera_codec.py)."""
    bundle = Bundle.load(bundle_dir)  # also checks the draft bundle's hashes
    world = make_environment(environment)
    results = {}
    for target in targets:
        with PolicyPipeline(bundle, target=target, mc_samples=mc_samples, mask_seed=mask_seed) as pipeline:
            successes = 0
            calm_scores: list[float] = []
            for seed in range(GATE_SEED_BASE, GATE_SEED_BASE + seeds):
                obs = world.reset(seed)
                quality = episode_quality(seed, camera_jpeg)
                embedding = pipeline.cache.encode_now(obs.instruction) if pipeline.needs_language else None
                scores, features, first_actions = [], [], []
                while not world.done:
                    out = pipeline.infer(jpeg(obs.frame, quality), obs.proprio, embedding)
                    scores.append(out.score)
                    if traces is not None:  # copies: the pipeline's output arrays are reused next tick
                        features.append(pool(out.features)[0].astype(np.float32))  # the monitor's own pooling
                        first_actions.append(np.array(out.actions[0], np.float32))
                    obs = world.step(out.action.copy())
                if world.success:
                    successes += 1
                    calm_scores.extend(scores)
                    if traces is not None:
                        traces.setdefault(target, []).append(EpisodeTrace(
                            np.asarray(scores, np.float64), np.stack(features), np.stack(first_actions)))
            threshold = float(np.quantile(calm_scores, quantile)) if calm_scores else float("nan")
            results[target] = {"episodes": seeds, "successes": successes, "success_rate": successes / seeds,
                               "threshold": threshold, "ticks": len(calm_scores),
                               "score_median": float(np.median(calm_scores)) if calm_scores else float("nan")}
            logger.info("closed loop %s: %d/%d successes, threshold %.4f", target, successes, seeds, threshold)
    return results
