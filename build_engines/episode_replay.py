"""The build's open-loop replay gate: every target of the draft bundle on the held-out recorded episodes.

When `--calib-source` is recorded episodes (a LeRobot dataset, HDF5 episodes), the episodes the split
held out are replayed step by step through each target's graphs (build_engines/replay_gate.py, with
ONNX Runtime): per chunk step, the action error of each target against cpu-fp32 (what quantization
costs) and against the recorded actions (how well the policy imitates the data). A target beyond the
replay tolerances refuses the bundle like any other gate failure. Without a closed-loop environment
the uncertainty threshold of each target is the split-conformal quantile of its MC-dropout score on
those steps at the default T (the runtime's score, `--false-alarm-rate`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

REFERENCE_TARGET = "cpu-fp32"


def replay_episodes(root: Path, files: dict, targets: dict, plan, options) -> dict[str, Any]:
    """Replay `plan.heldout_ids` of `plan.dataset` through every target in `targets` (graph -> variant)."""
    from build_engines.replay_gate import onnx_variant, replay_gate

    spec = plan.policy.spec
    tokenizer = root / "tokenizer.json" if spec.language is not None else None
    samples = options.default_mc_samples if plan.layers else 0
    variants = {target: onnx_variant({graph: files[graph][variant] for graph, variant in chosen.items()}, spec,
                                     tokenizer=tokenizer, mc_samples=samples, mask_seed=options.seed)
                for target, chosen in targets.items()}
    report = replay_gate(variants, plan.dataset, plan.heldout_ids, spec, options.replay_tolerances,
                         reference=REFERENCE_TARGET)
    report["mc_samples"] = samples
    return report


def replay_uncertainty(report: dict[str, Any], options, plan) -> dict[str, Any]:
    """The manifest's uncertainty section from the replay's scores (one threshold per target, at T)."""
    samples = report["mc_samples"]
    thresholds = {target: entry["score"]["threshold"] for target, entry in report["variants"].items()}
    alpha = options.replay_tolerances.false_alarm_rate
    return {"signal": "mc-dropout", "source": "held-out",
            "score": "RMS over action values of the MC-dropout std, divided by the largest action range",
            "threshold": thresholds, "hard_ceiling": {t: 3.0 * v for t, v in thresholds.items()},
            "by_samples": {t: {str(samples): v} for t, v in thresholds.items()},
            "method": (f"split-conformal threshold at false-alarm rate {alpha:g} (rank "
                       f"ceil((n+1)(1-alpha)) of n) over the {report['steps']} steps of the {len(plan.heldout_ids)} "
                       f"held-out recorded episodes replayed open-loop, T={samples}")}


def format_replay(report: dict[str, Any]) -> str:
    """A table of the replay per target: worst chunk step vs cpu-fp32 and vs the recorded actions."""
    tol = report["tolerances"]
    lines = [f"Open-loop replay of {len(report['episodes'])} held-out episodes ({report['steps']} steps, "
             f"chunk of {report['horizon']}); errors in fractions of each channel's range", "",
             "| target | mean error vs fp32 (worst step) | max error vs fp32 | mean error vs recorded (worst step) "
             "| uncertainty threshold |", "|---|---|---|---|---|"]
    for target, entry in report["variants"].items():
        ref, recorded, score = entry["vs_reference"], entry["vs_recorded"], entry["score"]
        lines.append(f"| {target} | {_num(ref['worst_mean_abs'])} | {_num(ref['max_abs_overall'])} | "
                     f"{_num(recorded['worst_mean_abs'])} | {_num(score['threshold']) if score else '-'} |")
    recorded = tol["max_mean_abs_vs_recorded"]
    lines += ["", f"Limits: mean vs fp32 <= {tol['max_mean_abs_vs_reference']}, max vs fp32 <= "
              f"{tol['max_abs_vs_reference']}, " + (f"mean vs recorded <= {recorded}" if recorded is not None
                                                    else "vs recorded: reported, not gated")
              + f"; {'passed' if report['passed'] else 'REFUSED: ' + '; '.join(report['failures'])}"]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
