"""The offline build as a chain of small steps (Polygraphy style), each logged with its duration:

    checkpoint -> FP32 graphs (checked against PyTorch) -> calibration ranges (once)
    -> INT8 graphs (TensorRT Q/DQ layout, CPU layout), FP16 graphs, dynamic-INT8 language graph
    -> layout verification -> draft bundle -> accuracy gate + uncertainty threshold
    -> TensorRT engines (where TensorRT and a GPU exist) -> manifest -> atomic rename

Everything is written into a temporary directory beside the output and renamed at the end, so an
interrupted or refused build never leaves a half-written bundle that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# BuildError and GateRefused are imported from here by callers and tests; they are defined in errors.py.
from build_engines.errors import BuildError, CalibrationError, GateRefused
from edge.inference.bundle import MANIFEST, SCHEMA_VERSION, file_sha256

logger = logging.getLogger(__name__)

CALIB_METHODS = ("entropy", "percentile", "minmax")


@dataclass(frozen=True)
class Tolerances:
    min_vision_cosine: float = 0.98
    min_language_cosine: float = 0.98
    max_head_action_error: float = 0.05  # mean |a - a_fp32| over the action range
    max_success_drop: float = 0.06  # closed-loop success points below FP32 (3 of 50 episodes)


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    int8: bool = True
    fp16: bool = True
    checkpoint: Path | None = None
    calib_source: str = "reference-world"
    calib_instructions: Path | None = None
    calib_samples: int = 256
    calib_method: str = "percentile"
    min_calib_samples: int = 32
    max_mc_samples: int = 32
    default_mc_samples: int = 16
    gate_seeds: int = 50
    heldout_samples: int = 64
    threshold_quantile: float = 0.99
    tensorrt: str = "auto"  # auto | off
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)
    seed: int = 0


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    logger.info("step %s: start", name)
    try:
        yield
    except Exception:
        # The CLI prints one line for the error; this one says in which step it happened.
        logger.error("step %s: failed after %.1f s", name, time.monotonic() - started)
        raise
    logger.info("step %s: done in %.1f s", name, time.monotonic() - started)


def check_output_location(options: BuildOptions) -> None:
    out = options.out
    if out.exists() and not options.force:
        raise BuildError(f"output {out} already exists; pass --force to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the output's parent directory {parent}: {exc}") from exc
    if not os.access(parent, os.W_OK):
        raise BuildError(f"output directory {parent} is not writable; choose another --out")


def _temporary_dir(out: Path) -> Path:
    tmp = out.resolve().parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _calibration_source(options: BuildOptions, proprio_dim: int):
    from calibration.sources import Hdf5EpisodeSource, ImageFolderSource

    kind = options.calib_source
    if kind == "reference-world":
        from calibration.reference_world_source import ReferenceWorldSource

        return ReferenceWorldSource(options.calib_samples + options.heldout_samples)
    path = Path(kind)
    if not path.exists():
        raise CalibrationError(f"--calib-source {kind}: no such file or folder (use 'reference-world', a "
                               "folder of images with --calib-instructions, or an HDF5 file/folder of "
                               "episodes)")
    if path.is_dir() and not any(path.glob("*.h5")) and not any(path.glob("*.hdf5")):
        if options.calib_instructions is None:
            raise CalibrationError(f"--calib-source {path} is an image folder: pass --calib-instructions "
                                   "FILE (one instruction per line)")
        return ImageFolderSource(path, options.calib_instructions, proprio_dim=proprio_dim)
    return Hdf5EpisodeSource(path)


def coordinate_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes whose constant operand is a coordinate grid [tokens, 2] (the head's soft-argmax
    keypoints and attention-weighted positions). They stay in float: the product is an expected
    position, so its precision is the policy's spatial precision, and the grid itself is not a weight
    that quantizes well per channel (2 channels of evenly spaced values)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = tuple(numpy_helper.to_array(attr.t).shape)
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) == 2
            and len(constants.get(node.input[1], ())) == 2 and constants[node.input[1]][1] == 2]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


class _Sessions:
    """ONNX Runtime sessions over the graphs of a build, created on first use."""

    def __init__(self, threads: int = 0):
        self._sessions: dict[Path, object] = {}
        self.threads = threads

    def get(self, path: Path):
        import onnxruntime as ort

        from edge.inference.backends.onnxruntime import session_options

        session = self._sessions.get(path)
        if session is None:
            session = ort.InferenceSession(str(path), session_options(ort, self.threads),
                                           providers=["CPUExecutionProvider"])
            self._sessions[path] = session
        return session

    def run(self, path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.get(path).run(None, feeds)[0]

    def latency_ms(self, path: Path, feeds: dict[str, np.ndarray], runs: int = 20) -> float:
        session = self.get(path)
        session.run(None, feeds)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - started) * 1e3)
        return float(np.median(times))


@dataclass
class Prepared:
    """Inputs for calibration and for the held-out accuracy check, per graph."""

    frames: np.ndarray  # uint8 [n, 224, 224, 3]
    instructions: list[str]
    proprio: np.ndarray  # float32 [n, P]


def _prepare_samples(source, count: int, minimum: int) -> Prepared:
    from calibration.sources import take
    from edge.inference.frames import resize_into
    from reference_policy.encoders import IMAGE_SIZE_PX

    samples = take(source, count, minimum=minimum)
    frames = np.zeros((len(samples), IMAGE_SIZE_PX, IMAGE_SIZE_PX, 3), np.uint8)
    for i, sample in enumerate(samples):
        resize_into(sample.frame, frames[i])
    proprio = np.stack([np.asarray(s.proprio, np.float32) for s in samples])
    return Prepared(frames, [s.instruction for s in samples], proprio)


def run_build(options: BuildOptions) -> dict:
    """Run every step; returns the summary (also written into the bundle).

    Raises a BuildError subclass naming the step that failed (GateRefused when the accuracy gate refuses
    the bundle), or an EdgeError of the runtime for unusable input data; `out` is then left as it was."""
    if options.calib_method not in CALIB_METHODS:
        raise CalibrationError(f"--calib-method must be one of {CALIB_METHODS}, got {options.calib_method!r}")
    if options.calib_samples < options.min_calib_samples:
        raise CalibrationError(f"--calib-samples {options.calib_samples} is below the minimum of "
                               f"{options.min_calib_samples} for a stable calibration")
    check_output_location(options)
    tmp = _temporary_dir(options.out)
    try:
        summary = _build_into(tmp, options)
        _commit(tmp, options.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _commit(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place; the old one (with --force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("bundle written to %s", out)


def _build_into(root: Path, options: BuildOptions) -> dict:
    import torch

    from build_engines import quantize
    from build_engines.export import export_policy
    from build_engines.layout import verify_cpu_layout, verify_tensorrt_layout
    from edge.inference.tokenizer import InstructionTokenizer
    from reference_policy.encoders import (
        MAX_TOKENS,
        load_language_encoder,
        load_vision_encoder,
        tokenizer_path,
    )
    from reference_policy.model import DEFAULT_CHECKPOINT_DIR, load_head, sample_masks

    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    graphs_dir, reports_dir = root / "graphs", root / "reports"
    graphs_dir.mkdir()
    reports_dir.mkdir()
    (root / "calibration").mkdir()
    checkpoint = options.checkpoint or DEFAULT_CHECKPOINT_DIR

    with step("load policy"):
        head = load_head(checkpoint)
        vision_module, language_module = load_vision_encoder(), load_language_encoder()
        tokenizer = InstructionTokenizer(tokenizer_path(), max_tokens=MAX_TOKENS)
        shutil.copyfile(tokenizer_path(), root / "tokenizer.json")
    cfg = head.cfg

    with step("calibration data"):
        source = _calibration_source(options, cfg.proprio_dim)
        prepared = _prepare_samples(source, options.calib_samples + options.heldout_samples,
                                    options.min_calib_samples + 8)
    n_calib = min(options.calib_samples, len(prepared.frames) - 8)
    heldout = slice(n_calib, len(prepared.frames))

    def token_feeds(texts: list[str]) -> dict[str, np.ndarray]:
        ids = np.zeros((len(texts), MAX_TOKENS), np.int64)
        mask = np.zeros((len(texts), MAX_TOKENS), np.int64)
        for i, text in enumerate(texts):
            tokenizer.encode_into(text, ids[i], mask[i])
        return {"input_ids": ids, "attention_mask": mask}

    # Reference inputs exercise every dynamic axis (batch 2, T 4).
    masks4 = sample_masks(cfg, 4, np.random.default_rng(options.seed))
    with torch.inference_mode():
        ref_vision = vision_module(torch.from_numpy(prepared.frames[:1])).numpy()
        ref_language = language_module(*(torch.from_numpy(v) for v in token_feeds(prepared.instructions[:1]).values())).numpy()
    reference_inputs = {
        "vision": {"image": prepared.frames[:2].copy()},
        "language": token_feeds(prepared.instructions[:2]),
        "head": {
            "vision_features": ref_vision, "language_features": ref_language,
            "proprio": prepared.proprio[:1].copy(),
            **{f"dropout_mask_{i}": m for i, m in enumerate(masks4)},
        },
    }
    with step("export FP32 graphs"):
        exported = export_policy(vision_module, language_module, head, reference_inputs, graphs_dir)
    fp32 = {name: info["path"] for name, info in exported.items()}
    sessions = _Sessions()

    with step("FP32 features for calibration"):
        vision_features = np.concatenate([
            sessions.run(fp32["vision"], {"image": prepared.frames[i : i + 16]})
            for i in range(0, len(prepared.frames), 16)
        ])
        unique = sorted(set(prepared.instructions))
        embeddings = dict(zip(unique, sessions.run(fp32["language"], token_feeds(unique))))
        language_features = np.stack([embeddings[t] for t in prepared.instructions])

    def head_feeds(index: int, masks: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "vision_features": vision_features[index : index + 1],
            "language_features": language_features[index : index + 1],
            "proprio": prepared.proprio[index : index + 1],
            **{f"dropout_mask_{i}": m for i, m in enumerate(masks)},
        }

    files: dict[str, dict[str, Path]] = {name: {"fp32": path} for name, path in fp32.items()}
    layout_reports = {}
    ranges_files = {}
    if options.int8:
        for name in ("vision", "head"):
            with step(f"calibrate {name} ({options.calib_method}, {n_calib} samples)"):
                if name == "vision":
                    feeds = ({"image": prepared.frames[i : i + 1]} for i in range(n_calib))
                else:
                    feeds = (head_feeds(i, sample_masks(cfg, 8, rng)) for i in range(n_calib))
                ranges = quantize.calibrate(fp32[name], feeds, options.calib_method, root / "calibration")
                ranges_path = root / "calibration" / f"{name}_ranges.json"
                ranges.save(ranges_path)
                ranges_files[name] = ranges_path
            with step(f"quantize {name}"):
                trt_path = graphs_dir / f"{name}_int8_trt.onnx"
                cpu_path = graphs_dir / f"{name}_int8_cpu.onnx"
                keep_float = coordinate_matmuls(fp32[name])
                if keep_float:
                    logger.info("%s: keeping %d soft-argmax MatMuls in float: %s", name, len(keep_float), keep_float)
                quantize.quantize_for_tensorrt(fp32[name], ranges, trt_path, nodes_to_exclude=keep_float)
                quantize.quantize_for_cpu(fp32[name], ranges, cpu_path, nodes_to_exclude=keep_float)
                layout_reports[f"{name}_int8_trt"] = _as_dict(verify_tensorrt_layout(trt_path, fp32[name]))
                layout_reports[f"{name}_int8_cpu"] = _as_dict(verify_cpu_layout(cpu_path))
                files[name]["int8_trt"] = trt_path
                files[name]["int8_cpu"] = cpu_path
        for leftover in (root / "calibration").iterdir():
            if leftover.suffix == ".onnx" or leftover.name.endswith(".data"):
                leftover.unlink()  # the calibrator's augmented graphs are not part of the bundle
        with step("quantize language (dynamic INT8 for CPU)"):
            path = graphs_dir / "language_int8_dynamic.onnx"
            # Per-channel weights: per-tensor dynamic INT8 of MiniLM measured cosine 0.967 to FP32 (the
            # gate refuses < 0.98), per-channel 0.992, both faster than FP32 on ONNX Runtime CPU.
            quantize.quantize_dynamic_int8(fp32["language"], path, per_channel=True)
            files["language"]["int8_dynamic"] = path
    if options.fp16:
        for name in ("vision", "language", "head"):
            with step(f"convert {name} to FP16"):
                path = graphs_dir / f"{name}_fp16.onnx"
                quantize.convert_fp16(fp32[name], path)
                files[name]["fp16"] = path

    targets = {"cpu-fp32": {"vision": "fp32", "language": "fp32", "head": "fp32"}}
    if options.int8:
        targets["cpu"] = {"vision": "int8_cpu", "language": "int8_dynamic", "head": "int8_cpu"}
        # TensorRT compiles the symmetric Q/DQ graphs; the sentence encoder runs once per instruction,
        # so it gets FP16 there (INT8 would save nothing a tick waits for).
        targets["tensorrt"] = {"vision": "int8_trt", "language": "fp16" if options.fp16 else "fp32",
                               "head": "int8_trt"}
    if options.fp16:
        targets["fp16"] = {"vision": "fp16", "language": "fp16", "head": "fp16"}

    with step("held-out accuracy per graph"):
        accuracy = _graph_accuracy(sessions, files, prepared, heldout, vision_features, language_features,
                                   token_feeds, head_feeds, cfg, rng)

    with step("reference inputs/outputs and embeddings"):
        reference_files = _write_reference(root, sessions, files, reference_inputs)
        from reference_world.instructions import OBJECT_NAMES, TRAINING_TEMPLATES

        known = [t.format(object=o) for o in OBJECT_NAMES for t in TRAINING_TEMPLATES]
        known_vectors = sessions.run(fp32["language"], token_feeds(known))
        np.savez(root / "embeddings.npz", embeddings=known_vectors.astype(np.float32))

    manifest = _manifest(options, cfg, exported, files, targets, root, known, checkpoint, ranges_files,
                         reference_files, layout_reports)
    manifest["uncertainty"] = {"threshold": {t: 1.0 for t in targets}, "status": "draft"}
    _write_manifest(root, manifest)

    with step(f"closed-loop gate ({options.gate_seeds} seeds per target)"):
        from build_engines.accuracy_gate import closed_loop

        loop = closed_loop(root, list(targets), options.gate_seeds, options.default_mc_samples,
                           options.threshold_quantile, options.seed)
    report = _judge(accuracy, loop, options.tolerances, options.int8)
    manifest["accuracy"] = {"report": "reports/accuracy.json", "passed": report["passed"],
                            "summary": report["summary"]}
    thresholds = {target: loop[target]["threshold"] for target in targets}
    manifest["uncertainty"] = {
        "score": "RMS over action dimensions of the MC-dropout std, divided by the action range",
        "threshold": thresholds,
        "hard_ceiling": {t: 3.0 * v for t, v in thresholds.items()},
        "method": (f"{options.threshold_quantile:.0%} quantile of the score over every tick of successful "
                   f"held-out in-distribution episodes (reference world, {options.gate_seeds} seeds per target, "
                   f"T={options.default_mc_samples})"),
        "ticks": {target: loop[target]["ticks"] for target in targets},
    }
    (reports_dir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (reports_dir / "accuracy.md").write_text(format_report(report) + "\n")
    if not report["passed"]:
        raise GateRefused("accuracy gate refused the bundle: " + "; ".join(report["failures"]), report)

    with step("TensorRT engines"):
        manifest["engines"] = _tensorrt_engines(root, options, files, exported, cfg, reference_inputs)

    with step("latency per graph on this machine"):
        report["latency_ms"] = _latencies(sessions, files, reference_inputs)
    summary = {"report": report, "files": {n: {v: _size(p) for v, p in fv.items()} for n, fv in files.items()}}
    (reports_dir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (reports_dir / "summary.md").write_text(format_summary(summary) + "\n")
    _write_manifest(root, manifest)
    return summary


def _as_dict(report) -> dict:
    return asdict(report) if hasattr(report, "__dataclass_fields__") else dict(vars(report))


def _size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _graph_accuracy(sessions, files, prepared, heldout, vision_features, language_features, token_feeds,
                    head_feeds, cfg, rng) -> dict:
    from reference_policy.model import sample_masks

    indices = range(heldout.start, heldout.stop)
    frames = prepared.frames[heldout]
    results: dict[str, dict[str, dict]] = {"vision": {}, "language": {}, "head": {}}
    reference_vision = vision_features[heldout]
    for variant, path in files["vision"].items():
        if variant == "fp32":
            continue
        out = np.concatenate([sessions.run(path, {"image": frames[i : i + 8]}) for i in range(0, len(frames), 8)])
        cos = _cosine(out, reference_vision)
        results["vision"][variant] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    texts = sorted(set(prepared.instructions)) + [
        "could you make your way over to the red block", "approach the blue ball please",
    ]
    feeds = token_feeds(texts)
    reference_language = sessions.run(files["language"]["fp32"], feeds)
    for variant, path in files["language"].items():
        if variant == "fp32":
            continue
        cos = _cosine(sessions.run(path, feeds), reference_language)
        results["language"][variant] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    masks = [sample_masks(cfg, 8, rng) for _ in indices]
    reference_actions = [sessions.run(files["head"]["fp32"], head_feeds(i, m)) for i, m in zip(indices, masks)]
    for variant, path in files["head"].items():
        if variant == "fp32":
            continue
        errors = [np.abs(sessions.run(path, head_feeds(i, m)) - ref).mean() / 2.0
                  for i, m, ref in zip(indices, masks, reference_actions)]
        results["head"][variant] = {"action_error_mean": float(np.mean(errors)),
                                    "action_error_max": float(np.max(errors))}
    return {"samples": len(frames), "graphs": results}


def _judge(accuracy: dict, loop: dict, tol: Tolerances, int8: bool) -> dict:
    failures = []
    graphs = accuracy["graphs"]
    for variant, row in graphs["vision"].items():
        if row["cosine_mean"] < tol.min_vision_cosine:
            failures.append(f"vision {variant}: feature cosine {row['cosine_mean']:.4f} < {tol.min_vision_cosine}")
    for variant, row in graphs["language"].items():
        if row["cosine_mean"] < tol.min_language_cosine:
            failures.append(f"language {variant}: cosine {row['cosine_mean']:.4f} < {tol.min_language_cosine}")
    for variant, row in graphs["head"].items():
        if row["action_error_mean"] > tol.max_head_action_error:
            failures.append(f"head {variant}: action error {row['action_error_mean']:.4f} of the range > "
                            f"{tol.max_head_action_error}")
    base = loop["cpu-fp32"]["success_rate"]
    for target, row in loop.items():
        if not np.isfinite(row["threshold"]):
            failures.append(f"target {target}: no successful gate episode to calibrate the uncertainty "
                            "threshold from; the policy or the target is broken")
        drop = base - row["success_rate"]
        row["drop_vs_fp32"] = drop
        if drop > tol.max_success_drop:
            failures.append(f"target {target}: closed-loop success {row['success_rate']:.0%} is {drop:.0%} below "
                            f"FP32 ({base:.0%}); allowed {tol.max_success_drop:.0%}")
    summary = {
        "closed_loop_success": {t: r["success_rate"] for t, r in loop.items()},
        "vision_cosine": {v: r["cosine_mean"] for v, r in graphs["vision"].items()},
        "head_action_error": {v: r["action_error_mean"] for v, r in graphs["head"].items()},
        "language_cosine": {v: r["cosine_mean"] for v, r in graphs["language"].items()},
    }
    return {"passed": not failures, "failures": failures, "tolerances": asdict(tol), "graphs": graphs,
            "heldout_samples": accuracy["samples"], "closed_loop": loop, "summary": summary}


def format_report(report: dict) -> str:
    lines = ["# Accuracy report", "", f"Verdict: {'PASSED' if report['passed'] else 'REFUSED'}", ""]
    for failure in report["failures"]:
        lines.append(f"- {failure}")
    lines += ["", f"Held-out samples: {report['heldout_samples']}", "",
              "| graph | variant | metric vs FP32 | mean | worst |", "|---|---|---|---|---|"]
    for graph, variants in report["graphs"].items():
        for variant, row in variants.items():
            if "cosine_mean" in row:
                lines.append(f"| {graph} | {variant} | feature cosine | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} |")
            else:
                lines.append(f"| {graph} | {variant} | action error / range | {row['action_error_mean']:.4f} | "
                             f"{row['action_error_max']:.4f} |")
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
    lines = ["| graph | precision | size (MB) | latency on this machine (ms) | accuracy vs FP32 |",
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
            lines.append(f"| {graph} | {variant} | {size / 1e6:.2f} | {ms:.2f} | {acc} |" if ms is not None else
                         f"| {graph} | {variant} | {size / 1e6:.2f} | - | {acc} |")
    lines += ["", "| target | closed-loop success | uncertainty threshold |", "|---|---|---|"]
    for target, row in report["closed_loop"].items():
        lines.append(f"| {target} | {row['success_rate']:.0%} ({row['successes']}/{row['episodes']}) | "
                     f"{row['threshold']:.4f} |")
    return "\n".join(lines)


def _latencies(sessions, files, reference_inputs) -> dict:
    feeds = {
        "vision": {"image": reference_inputs["vision"]["image"][:1]},
        "language": {k: v[:1] for k, v in reference_inputs["language"].items()},
        "head": reference_inputs["head"],
    }
    return {graph: {variant: sessions.latency_ms(path, feeds[graph]) for variant, path in variants.items()}
            for graph, variants in files.items()}


def _write_reference(root: Path, sessions, files, reference_inputs) -> dict:
    """Reference inputs/outputs per graph variant: npz, and Polygraphy JSON for
    `polygraphy run ENGINE --trt --load-inputs X --load-outputs Y` on the target."""
    from build_engines.polygraphy_io import save_inputs, save_outputs

    ref_dir = root / "reference"
    ref_dir.mkdir()
    written = {}
    for graph, variants in files.items():
        feeds = reference_inputs[graph]
        np.savez(ref_dir / f"{graph}_inputs.npz", **feeds)
        save_inputs(ref_dir / f"{graph}_inputs.json", [feeds])
        written[graph] = {"inputs": f"reference/{graph}_inputs.json", "outputs": {}}
        for variant, path in variants.items():
            session = sessions.get(path)
            names = [o.name for o in session.get_outputs()]
            outputs = dict(zip(names, session.run(None, feeds)))
            np.savez(ref_dir / f"{graph}_{variant}_outputs.npz", **outputs)
            save_outputs(ref_dir / f"{graph}_{variant}_outputs.json", f"onnxrt-{variant}", [outputs])
            written[graph]["outputs"][variant] = f"reference/{graph}_{variant}_outputs.json"
    return written


def _manifest(options, cfg, exported, files, targets, root, known, checkpoint, ranges_files, reference_files,
              layout_reports) -> dict:
    import onnx
    import onnxruntime
    import torch

    from edge import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "created_unix": int(time.time()),
        "builder": {"vla_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                    "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                    "machine": platform.machine()},
        "policy": {"name": "reference-vla", "checkpoint": str(Path(checkpoint).name),
                   "checkpoint_sha256": {p.name: file_sha256(p) for p in sorted(Path(checkpoint).iterdir())
                                         if p.is_file()}},
        "graphs": {
            name: {**info["spec"].to_dict(),
                   "files": {variant: str(path.relative_to(root)) for variant, path in files[name].items()}}
            for name, info in exported.items()
        },
        "targets": targets,
        "tokenizer": {"path": "tokenizer.json", "kind": "huggingface-tokenizers", "max_tokens": 32},
        "action": {"dim": cfg.action_dim, "names": ["left_wheel", "right_wheel"],
                   "meaning": "normalised wheel velocity targets", "scale": 0.25, "unit": "m/s",
                   "low": [-1.0] * cfg.action_dim, "high": [1.0] * cfg.action_dim,
                   "max_slew_per_s": [4.0] * cfg.action_dim},
        "proprio": {"dim": cfg.proprio_dim, "meaning": "measured wheel velocity / max wheel speed"},
        "dropout": {"layers": cfg.dropout_layers, "widths": [cfg.width] * cfg.dropout_layers,
                    "rate": cfg.dropout_p, "max_samples": options.max_mc_samples,
                    "default_samples": options.default_mc_samples,
                    "mask_inputs": [f"dropout_mask_{i}" for i in range(cfg.dropout_layers)]},
        "calibration": {"source": options.calib_source, "samples": options.calib_samples,
                        "method": options.calib_method,
                        "ranges": {n: str(p.relative_to(root)) for n, p in ranges_files.items()},
                        "layout_checks": layout_reports},
        "embeddings": {"path": "embeddings.npz", "instructions": known},
        "reference": reference_files,
        "engines": [],
        "files": {},
    }


def _write_manifest(root: Path, manifest: dict) -> None:
    manifest["files"] = {
        str(p.relative_to(root)): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, root / MANIFEST)


def _tensorrt_engines(root, options, files, exported, cfg, reference_inputs) -> list[dict]:
    if options.tensorrt == "off":
        logger.info("TensorRT engines: skipped (--tensorrt off)")
        return []
    from build_engines.tensorrt_builder import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        logger.info("TensorRT engines: not built (%s); the ONNX bundle is complete without them", reason)
        return []
    from build_engines.tensorrt_engines import build_all

    return build_all(root, options, files, exported, cfg, reference_inputs)
