"""The default configuration against the best measured one, and INT8/FP32 per graph with the ISA named.

The default (`policy.target: auto`, `policy.threads: auto`) is resolved by the runtime's own wiring as
`vla-edge run` resolves it at start-up (edge/service/tune.py, its 2 s measurement, a fresh cache so no
earlier choice is reused). Then, in a SEPARATE measurement, every candidate the runtime could have
chosen (each CPU target of the bundle x each thread count) is timed side by side, interleaved, for
`budget_s`: the default's p99 there over the best candidate's p99 is the goal ratio (1.00x: the default is
the fastest there is here). The same runs give the vision and head graphs' own times, so INT8/FP32 per
graph is measured on the same rounds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.configs import robot_config
from edge.errors import EdgeError
from edge.inference import tuning
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.service import tune, wiring

logger = logging.getLogger(__name__)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def default_vs_best(bundle: Bundle, out_dir: Path, samples: int, budget_s: float) -> dict:
    """The resolved default, every candidate's p50/p99 (policy, vision, head) and the ratios (see module)."""
    cache = Path(out_dir) / "tune.json"
    cache.unlink(missing_ok=True)
    config = robot_config(bundle, {"mc_samples": samples, "tune_cache": str(cache)})
    started = time.monotonic()
    resolved, choice = wiring.resolve_policy(bundle, config)
    resolve_s = time.monotonic() - started
    default = tuning.Candidate(choice.target, choice.threads)
    pipelines: dict[tuning.Candidate, PolicyPipeline] = {}
    stages: dict[tuning.Candidate, dict[str, list[float]]] = {}
    try:
        for candidate in tuning.candidates(tune.candidate_targets(bundle, config), tuning.thread_counts()):
            cfg = robot_config(bundle, {"mc_samples": samples, "target": candidate.target,
                                        "threads": candidate.threads})
            pipeline = wiring.build_pipeline(bundle, cfg)
            try:
                pipeline.activate()
            except EdgeError as exc:
                logger.warning("default vs best: %s cannot run here: %s", candidate.label(), exc)
                pipeline.close()
                continue
            pipelines[candidate] = pipeline
            stages[candidate] = {"vision": [], "head": []}
        runners = {c: _recording(tuning.pipeline_runner(p), p, stages[c]) for c, p in pipelines.items()}
        measured = {m.candidate: m for m in tuning.measure(runners, budget_s)}
    finally:
        for pipeline in pipelines.values():
            pipeline.close()
    best = min(measured.values(), key=lambda m: m.p99_ms)
    table = {c.label(): {"target": c.target, "threads": c.threads, "runs": m.runs, "p50_ms": m.p50_ms,
                         "p99_ms": m.p99_ms, "vision": _summary(stages[c]["vision"]),
                         "head": _summary(stages[c]["head"])} for c, m in measured.items()}
    mine = measured.get(default)
    report = {"default": {"target": choice.target, "threads": choice.threads, "line": choice.line(),
                          "resolve_s": resolve_s, "p99_ms": None if mine is None else mine.p99_ms},
              "best": {"label": best.candidate.label(), "p99_ms": best.p99_ms}, "budget_s": budget_s,
              "samples": samples, "isa": tuning.int8_dot_product_isa(), "candidates": table,
              "default_over_best_p99": None if mine is None else mine.p99_ms / best.p99_ms,
              "int8_over_fp32": _int8_over_fp32(measured, stages, bundle)}
    logger.info("default %s: p99 %.2f ms vs best %s %.2f ms", choice.line(), report["default"]["p99_ms"] or -1,
                best.candidate.label(), best.p99_ms)
    return report


def _recording(run, pipeline: PolicyPipeline, into: dict[str, list[float]]):
    def step() -> None:
        times = run().times
        into["vision"].append(times.vision_ms)
        into["head"].append(times.head_ms)

    return step


def _int8_over_fp32(measured, stages, bundle: Bundle) -> dict[str, dict]:
    """INT8 CPU layout / FP32 p50 per graph, at each thread count both ran at."""
    fp32 = tuning.baseline_target(bundle.manifest["targets"])
    out = {}
    for candidate in measured:
        if candidate.target == fp32:
            continue
        base = tuning.Candidate(fp32, candidate.threads)
        if base not in measured:
            continue
        for graph in ("vision", "head"):
            num = _summary(stages[candidate][graph])["p50"]
            den = _summary(stages[base][graph])["p50"]
            out[f"{candidate.target}/{fp32} {graph} threads={candidate.threads}"] = {
                "value": num / den if den > 0 else None, "numerator_ms": num, "denominator_ms": den}
    return out
