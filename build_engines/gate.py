"""The accuracy gate of a build, in two parts that need no simulator, and the hooks for the ones that do.

- Tensor accuracy per graph and variant against FP32 on held-out samples (other episodes than the
  calibration data): feature cosine and max-abs error for the encoders, action error over the action
  range and max-abs error for the head.
- The uncertainty threshold per target and per T, from the MC-dropout score on the held-out samples
  (when no closed-loop environment calibrates it from successful episodes instead).

The closed-loop part (an environment, `--env module:factory`) is in accuracy_gate.py. The open-loop
replay of recorded episodes plugs in through `BuildOptions.replay_gate`, a `ReplayGate`:

    replay_gate(runners: dict[str, Runner], episodes: list[Episode]) -> dict

`runners` maps each target of the bundle (cpu-fp32, cpu, tensorrt, fp16) to a callable
`runner(frames: dict[str, uint8 [1, H, W, 3]], instruction: str, proprio: float32 [P]) -> float32
[T, H, action_dim]` running that target's graphs on ONNX Runtime with deterministic (all-ones) masks;
`episodes` are the held-out samples grouped by episode (lists of CalibrationSample, in order). The
returned report goes into reports/accuracy.json under "replay" and into the manifest; a report with
`"passed": False` and a list of `"failures"` refuses the bundle like any other gate failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

Runner = Callable[[dict, str, np.ndarray], np.ndarray]
ReplayGate = Callable[[dict[str, Runner], list], dict]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def feature_accuracy(out: np.ndarray, reference: np.ndarray) -> dict:
    cos = cosine(out, reference)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs": float(np.max(np.abs(out - reference)))}


def action_accuracy(outs: list[np.ndarray], references: list[np.ndarray], action_range: np.ndarray) -> dict:
    errors = [float(np.mean(np.abs(o - r) / action_range)) for o, r in zip(outs, references)]
    return {"action_error_mean": float(np.mean(errors)), "action_error_max": float(np.max(errors)),
            "max_abs": float(max(np.max(np.abs(o - r)) for o, r in zip(outs, references)))}


def uncertainty_score(actions: np.ndarray, action_range: float) -> float:
    """The runtime's score (edge/inference/pipeline.py): RMS of the std over the T samples, over the range."""
    spread = actions.std(axis=0)
    return float(np.sqrt(np.mean(spread * spread))) / action_range


def samples_to_calibrate(default: int, maximum: int) -> list[int]:
    return sorted({t for t in (2, 4, 8, 16, 32, default, maximum) if 2 <= t <= maximum})


def graph_failure(graph: str, variant: str, row: dict, tol, graph_tolerances: dict) -> str | None:
    """Why one graph variant's held-out accuracy row fails the gate, or None."""
    if "cosine_mean" in row:
        minimum = graph_tolerances[graph]
        if row["cosine_mean"] < minimum:
            return f"{graph} {variant}: feature cosine {row['cosine_mean']:.4f} < {minimum}"
    elif row["action_error_mean"] > tol.max_head_action_error:
        return (f"{graph} {variant}: action error {row['action_error_mean']:.4f} of the range > "
                f"{tol.max_head_action_error}")
    return None


def loop_failures(loop: dict, tol) -> dict[str, list[str]]:
    """Per target, why its closed-loop row fails the gate (each row gains drop_vs_fp32)."""
    base = loop["cpu-fp32"]["success_rate"]
    failures: dict[str, list[str]] = {}
    for target, row in loop.items():
        found = []
        if not np.isfinite(row["threshold"]):
            found.append(f"target {target}: no successful gate episode to calibrate the uncertainty "
                         "threshold from; the policy or the target is broken")
        drop = base - row["success_rate"]
        row["drop_vs_fp32"] = drop
        if drop > tol.max_success_drop:
            found.append(f"target {target}: closed-loop success {row['success_rate']:.0%} is {drop:.0%} "
                         f"below FP32 ({base:.0%}); allowed {tol.max_success_drop:.0%}")
        if found:
            failures[target] = found
    return failures


def judge(accuracy: dict, loop: dict | None, replay: dict | None, tol, graph_tolerances: dict) -> dict:
    failures = []
    graphs = accuracy["graphs"]
    for graph, variants in graphs.items():
        for variant, row in variants.items():
            failure = graph_failure(graph, variant, row, tol, graph_tolerances)
            if failure is not None:
                failures.append(failure)
    if loop:
        failures += [f for found in loop_failures(loop, tol).values() for f in found]
    if replay is not None and not replay.get("passed", True):
        failures += [f"replay: {f}" for f in replay.get("failures", ["the open-loop replay gate refused"])]
    summary: dict[str, Any] = {
        "closed_loop_success": {t: r["success_rate"] for t, r in (loop or {}).items()},
        "vision_cosine": {v: r["cosine_mean"] for v, r in graphs["vision"].items()},
        "head_action_error": {v: r["action_error_mean"] for v, r in graphs["head"].items()},
    }
    if "language" in graphs:
        summary["language_cosine"] = {v: r["cosine_mean"] for v, r in graphs["language"].items()}
    return {"passed": not failures, "failures": failures, "tolerances": asdict(tol), "graphs": graphs,
            "heldout_samples": accuracy["samples"], "heldout_episodes": accuracy["episodes"],
            "closed_loop": loop or {}, "replay": replay, "summary": summary,
            "dropped_targets": list(accuracy.get("dropped_targets", []))}


def format_report(report: dict) -> str:
    lines = ["# Accuracy report", "", f"Verdict: {'PASSED' if report['passed'] else 'REFUSED'}", ""]
    for failure in report["failures"]:
        lines.append(f"- {failure}")
    for dropped in report.get("dropped_targets", []):
        lines.append(f"- optional target {dropped['target']} left out of the bundle ({dropped['stage']}): "
                     + "; ".join(dropped["reasons"]))
    lines += ["", f"Held-out samples: {report['heldout_samples']}", "",
              "| graph | variant | metric vs FP32 | mean | worst | max abs |", "|---|---|---|---|---|---|"]
    for graph, variants in report["graphs"].items():
        for variant, row in variants.items():
            if "cosine_mean" in row:
                lines.append(f"| {graph} | {variant} | feature cosine | {row['cosine_mean']:.4f} | "
                             f"{row['cosine_min']:.4f} | {row['max_abs']:.4f} |")
            else:
                lines.append(f"| {graph} | {variant} | action error / range | {row['action_error_mean']:.4f} | "
                             f"{row['action_error_max']:.4f} | {row['max_abs']:.4f} |")
    if report["closed_loop"]:
        lines += ["", "| target | closed-loop success | episodes | drop vs FP32 | uncertainty threshold |",
                  "|---|---|---|---|---|"]
        for target, row in report["closed_loop"].items():
            lines.append(f"| {target} | {row['success_rate']:.0%} | {row['episodes']} | "
                         f"{row.get('drop_vs_fp32', 0.0):+.0%} | {row['threshold']:.4f} |")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    report = summary["report"]
    latency = report.get("latency_ms", {})
    graphs = report["graphs"]
    lines = ["| graph | variant | size (MB) | latency on this machine (ms) | accuracy vs FP32 |",
             "|---|---|---|---|---|"]
    for graph, variants in summary["files"].items():
        for variant, size in variants.items():
            row = graphs.get(graph, {}).get(variant)
            if row is None:
                acc = "reference"
            elif "cosine_mean" in row:
                acc = f"cosine {row['cosine_mean']:.4f}"
            else:
                acc = f"action error {row['action_error_mean']:.4f}"
            ms = latency.get(graph, {}).get(variant)
            shown = f"{ms:.2f}" if ms is not None else "-"
            lines.append(f"| {graph} | {variant} | {size / 1e6:.2f} | {shown} | {acc} |")
    thresholds = summary.get("thresholds", {})
    if thresholds:
        lines += ["", "| target | closed-loop success | uncertainty threshold |", "|---|---|---|"]
        for target, threshold in thresholds.items():
            row = report["closed_loop"].get(target)
            success = f"{row['success_rate']:.0%} ({row['successes']}/{row['episodes']})" if row else "-"
            lines.append(f"| {target} | {success} | {threshold:.4f} |")
    return "\n".join(lines)
