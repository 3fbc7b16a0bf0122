"""TensorRT engines for a bundle's TensorRT-targeted graphs, each verified before it is accepted.

Targets: "tensorrt" (INT8 Q/DQ vision and head, FP16 language) and "fp16" (all FP16). Each engine
gets an optimisation profile (vision and language at batch 1; the head's T from 1 to the bundle's
maximum), shares one persistent timing cache, is verified against ONNX Runtime's outputs of the same
graph on the bundle's reference inputs, and is stored with its cache key (source-graph hash,
TensorRT version, compute capability, precision, GPU name and multiprocessor count).
``build_engines.engines_only`` builds the same engines on the robot from a finished bundle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.tensorrt_builder import (
    Tolerance,
    build_engine,
    engine_key_for,
    save_engine,
    verify_engine,
)

logger = logging.getLogger(__name__)

PRECISION = {"int8-tensorrt": "int8", "fp16": "fp16", "fp32": "fp32"}
# Engines are compared with ONNX Runtime running the same graph; kernels differ (tactics, fused
# rounding), so tolerances are those of the precision, not bit-exactness.
TOLERANCE = {"int8": Tolerance(atol=0.08, rtol=0.08), "fp16": Tolerance(atol=0.02, rtol=0.02),
             "fp32": Tolerance(atol=1e-3, rtol=1e-3)}


def _profile(spec, max_samples: int, default_samples: int) -> dict[str, tuple]:
    profile = {}
    for tensor in spec.inputs:
        if tensor.dynamic:
            rest = tuple(tensor.shape[1:])
            if spec.name == "head":
                profile[tensor.name] = ((1, *rest), (default_samples, *rest), (max_samples, *rest))
            else:
                profile[tensor.name] = ((1, *rest), (1, *rest), (1, *rest))
    return profile


def build_all(root: Path, options, files: dict, exported: dict, cfg, reference_inputs: dict, *,
              trt: Any = None, cudart: Any = None) -> list[dict]:
    import onnxruntime as ort

    from edge.inference.backends.onnxruntime import session_options

    if trt is None:
        from build_engines.tensorrt_builder import load_tensorrt

        trt = load_tensorrt()
    if cudart is None:
        from edge.inference.cuda import load_runtime

        cudart = load_runtime()
    engines_dir = root / "engines"
    engines_dir.mkdir(exist_ok=True)
    cache = root.parent / ".tensorrt-timing.cache"  # persists across builds beside the bundle
    wanted = {(graph, variant) for graph, variants in files.items() for variant in variants
              if variant in ("int8-tensorrt", "fp16")}
    entries = []
    for graph, variant in sorted(wanted):
        onnx_path = files[graph][variant]
        precision = PRECISION[variant]
        spec = exported[graph]["spec"]
        logger.info("TensorRT engine %s %s: building", graph, variant)
        engine_bytes = build_engine(onnx_path, precision=precision,
                                    profile=_profile(spec, options.max_mc_samples, options.default_mc_samples),
                                    timing_cache_path=cache, trt=trt)
        key = engine_key_for(onnx_path, precision, trt, cudart)
        feeds = reference_inputs[graph]
        if graph != "head":  # the runtime runs vision and language at batch 1: so does the profile
            feeds = {name: value[:1] for name, value in feeds.items()}
        session = ort.InferenceSession(str(onnx_path), session_options(ort), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        reference = dict(zip(names, session.run(None, feeds)))
        report = verify_engine(engine_bytes, feeds, reference, TOLERANCE[precision], input_specs=spec.inputs,
                               output_specs=spec.outputs, key=key, trt=trt, cudart=cudart)
        logger.info("TensorRT engine %s %s verified: %s", graph, variant, report.summary())
        path = save_engine(engine_bytes, key, engines_dir / f"{graph}_{variant}.engine")
        entries.append({
            "graph": graph, "variant": variant, "path": str(path.relative_to(root)), **key.to_dict(),
            "max_abs_error": float(max((o.max_abs_error for o in report.outputs), default=np.nan)),
        })
    return entries
