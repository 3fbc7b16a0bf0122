"""The CPU INT8 candidates beyond the default `int8-cpu` graph (docs/architecture.md, "Decisions: one
calibration, several CPU candidates"): which INT8 graph ONNX Runtime's CPU provider runs fastest, and
exactly, depends on the CPU's instructions, so the build writes the ones worth trying and the runtime's
`policy.target: auto` (edge/inference/tuning.py) times those that passed the gate on its own machine.

    int8-cpu-qop  target cpu-qoperator     QOperator format (QLinearConv, QLinearMatMul, ...): the same
                                           ranges and layout as int8-cpu in ONNX Runtime's older format,
                                           which its x86 kernels sometimes run faster than fused Q/DQ
    int8-cpu-rr   target cpu-reduce-range  QDQ with 7-bit weights (ONNX Runtime's reduce_range): on x86
                                           without VNNI the fast u8s8 kernels sum pairs of u8 x s8
                                           products in int16 and saturate (2 * 255 * 127 > 32767); with
                                           |w| <= 64 a pair sum is at most 32640, so they are exact and
                                           the session needs no session.x64quantprecision (recorded as
                                           the variant's ort_session "0")

Every candidate is its own variant and target; the language graph keeps its dynamic INT8 (`int8-cpu`)
in each. Each is gated like every variant, but a candidate the gate refuses is optional: it is left out
of the bundle (its target, graphs and reference outputs), logged, and recorded under `dropped_targets`
in the gate report and the manifest's `gate` section, and the build goes on. A required target (cpu-fp32,
cpu, tensorrt, fp16) that fails still refuses the bundle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REDUCED_WEIGHT_MAX = 64  # ONNX Runtime's reduce_range int8 weights: [-64, 64]


@dataclass(frozen=True)
class CpuCandidate:
    variant: str
    target: str
    quant_format: str  # quantize_for_cpu's "qdq" or "qoperator"
    reduce_range: bool
    ort_session: Mapping[str, str] = field(default_factory=dict)  # session config the variant needs


CANDIDATES = (
    CpuCandidate("int8-cpu-qop", "cpu-qoperator", "qoperator", reduce_range=False),
    # Exact without the option (see above); with it ONNX Runtime would rewrite the weights to u8 and run
    # the slower u8u8 kernels, on every x86 CPU with AVX2 (VNNI ones included: MlasPlatformU8S8Overflow).
    CpuCandidate("int8-cpu-rr", "cpu-reduce-range", "qdq", reduce_range=True,
                 ort_session={"session.x64quantprecision": "0"}),
)
OPTIONAL_TARGETS = tuple(c.target for c in CANDIDATES)
CANDIDATE_VARIANTS = tuple(c.variant for c in CANDIDATES)


def session_configs() -> dict[str, dict[str, str]]:
    """Variant -> the ONNX Runtime session config it records in the manifest (only where it needs one)."""
    return {c.variant: dict(c.ort_session) for c in CANDIDATES if c.ort_session}


def quantize_candidates(fp32_path: Path, ranges, keep_float: list[str],
                        path_for: Callable[[str], Path]) -> dict[str, tuple[Path, object]]:
    """Every candidate's graph of one FP32 graph, from the same calibrated ranges, each layout-checked:
    variant -> (path, layout report)."""
    from build_engines import quantize
    from build_engines.layout import verify_cpu_layout

    written = {}
    for candidate in CANDIDATES:
        path = path_for(candidate.variant)
        quantize.quantize_for_cpu(fp32_path, ranges, path, quant_format=candidate.quant_format,
                                  reduce_range=candidate.reduce_range, nodes_to_exclude=keep_float)
        bound = REDUCED_WEIGHT_MAX if candidate.reduce_range else None
        written[candidate.variant] = (path, verify_cpu_layout(path, max_weight=bound))
    return written


def add_targets(targets: dict[str, dict[str, str]], graphs: list[str]) -> None:
    """The candidates' targets: their variant for vision and head, the dynamic int8-cpu for language."""
    for candidate in CANDIDATES:
        targets[candidate.target] = {graph: "int8-cpu" if graph == "language" else candidate.variant
                                     for graph in graphs}


def screen_graphs(accuracy: dict, targets: dict, tol, graph_tolerances: dict) -> list[dict]:
    """Optional targets whose graphs fail the held-out tensor gate, as records for `drop`."""
    from build_engines.gate import graph_failure

    dropped = []
    for target in OPTIONAL_TARGETS:
        if target not in targets:
            continue
        reasons, rows = [], {}
        for graph, variant in targets[target].items():
            row = accuracy["graphs"].get(graph, {}).get(variant)
            if row is None or variant not in CANDIDATE_VARIANTS:
                continue  # the shared language int8-cpu is judged (and required) through the cpu target
            rows[graph] = {variant: row}
            failure = graph_failure(graph, variant, row, tol, graph_tolerances)
            if failure is not None:
                reasons.append(failure)
        if reasons:
            dropped.append({"target": target, "stage": "held-out accuracy", "reasons": reasons, "accuracy": rows})
    return dropped


def screen_closed_loop(loop: dict, tol) -> list[dict]:
    """Optional targets whose closed-loop runs fail the gate; their rows leave `loop`."""
    from build_engines.gate import loop_failures

    failing = loop_failures(loop, tol)
    dropped = []
    for target in OPTIONAL_TARGETS:
        if target in failing:
            dropped.append({"target": target, "stage": "closed loop", "reasons": failing[target],
                            "closed_loop": _finite(loop.pop(target))})
    return dropped


def _finite(row: dict) -> dict:
    """A report row the manifest can hold (JSON without NaN): a non-finite number becomes None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def screen_replay(replay: dict) -> list[dict]:
    """Optional targets the open-loop replay refused: the replay names a failing target first in each
    failure ("<target>: ..."), as build_engines/replay_gate.py does; their entries leave the report."""
    dropped = []
    failures = list(replay.get("failures", []))
    for target in OPTIONAL_TARGETS:
        mine = [f for f in failures if f.startswith(f"{target}: ")]
        if mine:
            failures = [f for f in failures if f not in mine]
            dropped.append({"target": target, "stage": "open-loop replay", "reasons": mine,
                            "replay": replay.get("variants", {}).pop(target, None)})
    if dropped:
        replay["failures"] = failures
        replay["passed"] = not failures
    return dropped


def drop(dropped: list[dict], *, root: Path, targets: dict, files: dict, accuracy: dict,
         reference_files: dict | None = None, layout_reports: dict | None = None) -> None:
    """Leave the `dropped` optional targets out of the bundle: the target, every candidate graph no other
    target runs (file, accuracy row, layout report, reference outputs), each logged with its reasons;
    the records go to accuracy["dropped_targets"] (the gate report and the manifest carry them)."""
    for record in dropped:
        target = record["target"]
        if target not in OPTIONAL_TARGETS:
            raise ValueError(f"target {target} is required; only {OPTIONAL_TARGETS} may be left out")
        variants = targets.pop(target)
        record["variants"] = dict(variants)
        logger.warning("optional target %s left out of the bundle (%s): %s", target, record["stage"],
                       "; ".join(record["reasons"]))
        in_use = {(graph, variant) for chosen in targets.values() for graph, variant in chosen.items()}
        for graph, variant in variants.items():
            if variant not in CANDIDATE_VARIANTS or (graph, variant) in in_use or variant not in files[graph]:
                continue
            path = files[graph].pop(variant)
            path.unlink()
            accuracy["graphs"].get(graph, {}).pop(variant, None)
            if layout_reports is not None:
                layout_reports.pop(f"{graph}_{variant}", None)
            if reference_files is not None and graph in reference_files:
                reference_files[graph]["outputs"].pop(variant, None)
                for suffix in ("npz", "json"):
                    (root / "reference" / f"{graph}_{variant}_outputs.{suffix}").unlink(missing_ok=True)
        accuracy.setdefault("dropped_targets", []).append(record)
