"""`make gpu-check` (`python -m tests.gpu_check`): one prepared pass over the GPU path on a machine with one.

1. the CUDA layer (edge/inference/cuda.py) on real cuda-python: a stream, events, pinned and device
   buffers, async copies both ways checked byte for byte, and a CUDA graph captured and replayed on new
   data;
2. ONNX Runtime's CUDA provider with IOBinding on the bundle's FP32 and FP16 graphs, each output
   compared with the bundle's reference outputs of that graph;
3. TensorRT where installed: the engines built, verified against the bundle's references and installed
   in a copy of the bundle (``build-engines --engines-only``), then timed through the runtime's backend.

Prints a table and writes JSON (--json). At most --budget-s seconds (default 360): a step that would
start after the budget is reported as skipped. Without cuda-python or a visible GPU it prints one line
and exits 0. Each step takes its modules as arguments, so the logic runs in CI against the fakes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeError
from edge.inference import cuda

PROG = "gpu-check"
COPY_BYTES = 8 << 20
GRAPH_REPLAYS = 20
TIMED_RUNS = 20
ORT_VARIANTS = ("fp32", "fp16")
ORT_TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (0.02, 0.02)}  # (atol, rtol): CUDA kernels vs the CPU reference


@dataclass
class StepResult:
    step: str
    status: str  # "ok", "fail" or "skip"
    detail: str
    numbers: dict[str, float] = field(default_factory=dict)


def check_cuda_layer(cudart: Any) -> StepResult:
    """Stream, events, pinned/device memory, async copies and a CUDA graph, through edge's CUDA layer."""
    numbers: dict[str, float] = {}
    with cuda.Stream(cudart=cudart) as stream, cuda.Event(cudart=cudart) as start, \
            cuda.Event(cudart=cudart) as end, cuda.PinnedBuffer((COPY_BYTES,), np.uint8, cudart=cudart) as src, \
            cuda.PinnedBuffer((COPY_BYTES,), np.uint8, cudart=cudart) as dst, \
            cuda.DeviceBuffer(COPY_BYTES, cudart=cudart) as device:
        pattern = np.random.default_rng(0).integers(0, 256, COPY_BYTES, dtype=np.uint8)
        src.array[...] = pattern
        start.record(stream)
        cuda.copy_htod_async(device, src, stream)
        cuda.copy_dtoh_async(dst, device, stream)
        end.record(stream)
        stream.synchronize()
        if not np.array_equal(dst.array, pattern):
            return StepResult("cuda layer", "fail", "bytes copied host -> device -> host came back different")
        numbers["round_trip_ms"] = start.elapsed_ms(end)
        numbers["round_trip_gb_per_s"] = 2 * COPY_BYTES / max(numbers["round_trip_ms"], 1e-6) / 1e6

        stream.begin_capture()
        cuda.copy_htod_async(device, src, stream)
        cuda.copy_dtoh_async(dst, device, stream)
        with stream.end_capture() as graph:
            for replay in range(GRAPH_REPLAYS):
                src.array[...] = pattern ^ np.uint8(replay + 1)  # new data at the captured addresses
                start.record(stream)
                graph.launch(stream)
                end.record(stream)
                stream.synchronize()
                if not np.array_equal(dst.array, src.array):
                    return StepResult("cuda layer", "fail", f"CUDA graph replay {replay} did not copy the new data")
            numbers["graph_replay_ms"] = start.elapsed_ms(end)
    return StepResult("cuda layer", "ok", f"{COPY_BYTES >> 20} MiB round trip, {GRAPH_REPLAYS} CUDA graph replays "
                      f"on {cuda.device_name(cudart=cudart)}", numbers)


def _reference(bundle: Any, graph: str, variant: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from build_engines.engines_only import reference

    return reference(bundle, graph, variant)


def check_onnxruntime(ort: Any, bundle: Any, provider: str = "CUDAExecutionProvider",
                      device: str = "cuda") -> list[StepResult]:
    """Every FP32/FP16 graph of the bundle on `provider` with IOBinding, against the bundle's references."""
    from edge.inference.backends.onnxruntime import session_options

    if provider not in ort.get_available_providers():
        return [StepResult("onnxruntime", "fail", f"{provider} is not available (providers: "
                           f"{ort.get_available_providers()}): install onnxruntime-gpu, not onnxruntime")]
    results = []
    for graph, entry in sorted(bundle.graphs.items()):
        for variant in ORT_VARIANTS:
            if variant not in entry.files:
                continue
            name = f"onnxruntime {graph}/{variant}"
            inputs, expected = _reference(bundle, graph, variant)
            session = ort.InferenceSession(str(bundle.graph_path(graph, variant)), session_options(ort),
                                           providers=[provider])
            if provider not in session.get_providers():
                results.append(StepResult(name, "fail", f"the session fell back to {session.get_providers()}"))
                continue
            binding = session.io_binding()
            for key, value in inputs.items():
                binding.bind_cpu_input(key, value)
            for output in session.get_outputs():
                binding.bind_output(output.name, device)
            times = []
            for _ in range(TIMED_RUNS):
                started = time.perf_counter()
                session.run_with_iobinding(binding)
                times.append((time.perf_counter() - started) * 1e3)
            outputs = dict(zip([o.name for o in session.get_outputs()], binding.copy_outputs_to_cpu(), strict=True))
            atol, rtol = ORT_TOLERANCE[variant]
            worst = max(float(np.max(np.abs(outputs[k].astype(np.float64) - v) - rtol * np.abs(v)))
                        for k, v in expected.items())
            status = "ok" if worst <= atol else "fail"
            results.append(StepResult(name, status, f"IOBinding on {provider}; worst excess over rtol "
                                      f"{worst:.3g} (atol {atol})", {"median_ms": float(np.median(times))}))
    return results


def check_tensorrt(trt: Any, cudart: Any, bundle_dir: Path) -> list[StepResult]:
    """Engines built, verified and installed in a copy of the bundle, then each timed through the backend."""
    from build_engines.engines_only import build_engines_only
    from edge.inference.backends.tensorrt import TensorRTBackend
    from edge.inference.bundle import Bundle
    from edge.service.wiring import engine_key

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        copy = Path(folder) / "bundle"
        shutil.copytree(bundle_dir, copy, ignore=shutil.ignore_patterns("engines"))
        started = time.perf_counter()
        entries = build_engines_only(copy, trt=trt, cudart=cudart)
        build_s = time.perf_counter() - started
        bundle = Bundle.load(copy)
        results = []
        for entry in entries:
            spec = bundle.graphs[entry["graph"]]
            batch = int(bundle.dropout["default_samples"]) if entry["graph"] == "head" else 1
            backend = TensorRTBackend(bundle.path(entry["path"]), engine_key(bundle, entry["graph"], entry["variant"]),
                                      spec.inputs, spec.outputs, max_batch=max(batch, 1), trt=trt, cudart=cudart)
            times = []
            with backend:
                for _ in range(TIMED_RUNS):
                    t0 = time.perf_counter()
                    backend.run(batch)
                    times.append((time.perf_counter() - t0) * 1e3)
            results.append(StepResult(f"tensorrt {entry['graph']}/{entry['variant']}", "ok",
                                      f"built and verified (max |err| {entry['max_abs_error']:.3g}), batch {batch}",
                                      {"median_ms": float(np.median(times)), "build_s_all": build_s}))
    return results


def run_all(*, cudart: Any, ort: Any, trt: Any, bundle_dir: Path | None, budget_s: float,
            clock: Callable[[], float] = time.monotonic, provider: str = "CUDAExecutionProvider",
            device: str = "cuda") -> list[StepResult]:
    from edge.inference.bundle import Bundle

    deadline = clock() + budget_s
    steps: list[tuple[str, Callable[[], list[StepResult]]]] = [("cuda layer", lambda: [check_cuda_layer(cudart)])]
    bundle = None
    if bundle_dir is not None and (bundle_dir / "manifest.json").is_file():
        bundle = Bundle.load(bundle_dir)
    no_bundle = f"no bundle at {bundle_dir} (make bundle, or pass --bundle)"
    steps.append(("onnxruntime", (lambda: check_onnxruntime(ort, bundle, provider, device)) if bundle and ort
                  else (lambda: [StepResult("onnxruntime", "skip", no_bundle if not bundle else
                                            "onnxruntime is not installed")])))
    steps.append(("tensorrt", (lambda: check_tensorrt(trt, cudart, bundle_dir)) if bundle and trt
                  else (lambda: [StepResult("tensorrt", "skip", no_bundle if not bundle else
                                            "TensorRT is not installed")])))
    results: list[StepResult] = []
    for name, step in steps:
        if clock() > deadline:
            results.append(StepResult(name, "skip", f"the {budget_s:.0f} s budget was spent"))
            continue
        try:
            results += step()
        except (EdgeError, RuntimeError, OSError) as exc:  # onnxruntime raises RuntimeError subclasses
            results.append(StepResult(name, "fail", " ".join(str(exc).split())))
    return results


def format_table(results: list[StepResult]) -> str:
    rows = [("step", "status", "numbers", "detail")]
    for r in results:
        numbers = ", ".join(f"{k} {v:.3g}" for k, v in r.numbers.items())
        rows.append((r.step, r.status.upper(), numbers, r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def _gpu_runtime() -> tuple[Any, str | None]:
    try:
        rt = cuda.load_runtime()
        count = cuda.device_count(cudart=rt)
    except EdgeError as exc:
        return None, str(exc)
    return (rt, None) if count > 0 else (None, "no CUDA GPU is visible")


def main(argv: list[str] | None = None, *, runtime: Callable[[], tuple[Any, str | None]] = _gpu_runtime) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bundle"))
    parser.add_argument("--json", type=Path, default=Path("artifacts/gpu-check.json"))
    parser.add_argument("--budget-s", type=float, default=360.0)
    args = parser.parse_args(argv)
    cudart, why_not = runtime()
    if cudart is None:
        print(f"{PROG}: skipped: {why_not}")
        return 0
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    results = run_all(cudart=cudart, ort=ort, trt=trt, bundle_dir=args.bundle, budget_s=args.budget_s)
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": cuda.device_name(cudart=cudart),
                                     "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"\n{PROG}: JSON written to {args.json}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
