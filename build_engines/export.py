"""Step 1 of the build: the policy's modules become FP32 ONNX graphs (export contract).

Shapes come from the policy's spec and a probe forward pass (build_engines/policy.py):

- vision:   one uint8 input per camera [N, H, W, 3] (``image``, or ``image_<camera>`` for several)
            -> vision_features float32 [N, ...]
- language: input_ids, attention_mask int64 [N, max_tokens] -> language_features float32 [N, D]
            (only for a policy with language)
- head:     vision_features [1, ...], language_features [1, D] (with language), proprio [1, P] (when
            P > 0), dropout_mask_0 .. dropout_mask_{L-1} [T, width]
            -> actions [T, action_dim], or [T, H, action_dim] for a chunk of H > 1
            (without dropout masks, --uncertainty none: T is 1)

Each graph is checked against PyTorch on reference inputs before it is accepted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from build_engines.errors import ExportError
from edge.inference.backends.base import TensorSpec

logger = logging.getLogger(__name__)

OPSET = 17


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}


def graph_specs(spec, shapes: dict[str, tuple[int, ...]], mask_widths: list[int]) -> dict[str, GraphSpec]:
    """The three (or two, without language) graph contracts of a policy: `spec` is its PolicySpec,
    `shapes` the probe's output shapes, `mask_widths` one entry per dropout mask."""
    features = tuple(shapes["vision_features"][1:])
    specs = {"vision": GraphSpec(
        "vision",
        tuple(TensorSpec(spec.camera_input(c), "uint8", (-1, c.height, c.width, 3)) for c in spec.cameras),
        (TensorSpec("vision_features", "float32", (-1, *features)),),
    )}
    head_inputs = [TensorSpec("vision_features", "float32", (1, *features))]
    if spec.language is not None:
        tokens, dim = spec.language.max_tokens, shapes["language_features"][1]
        specs["language"] = GraphSpec(
            "language",
            (TensorSpec("input_ids", "int64", (-1, tokens)), TensorSpec("attention_mask", "int64", (-1, tokens))),
            (TensorSpec("language_features", "float32", (-1, dim)),),
        )
        head_inputs.append(TensorSpec("language_features", "float32", (1, dim)))
    if spec.proprio.dim:
        head_inputs.append(TensorSpec("proprio", "float32", (1, spec.proprio.dim)))
    head_inputs += [TensorSpec(f"dropout_mask_{i}", "float32", (-1, w)) for i, w in enumerate(mask_widths)]
    samples = -1 if mask_widths else 1
    action = (spec.action.dim,) if spec.action.horizon == 1 else (spec.action.horizon, spec.action.dim)
    specs["head"] = GraphSpec("head", tuple(head_inputs), (TensorSpec("actions", "float32", (samples, *action)),))
    return specs


def _export(module: torch.nn.Module, args: tuple, spec: GraphSpec, path: Path) -> None:
    dynamic = {
        s.name: {0: "T" if spec.name == "head" else "batch"}
        for s in (*spec.inputs, *spec.outputs)
        if s.dynamic
    }
    started = time.monotonic()
    logger.info("export %s -> %s", spec.name, path.name)
    try:
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[s.name for s in spec.inputs],
            output_names=[s.name for s in spec.outputs],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter gives plain, TensorRT-friendly graphs for these modules
            do_constant_folding=True,
        )
    except Exception as exc:  # a user module can fail to trace in any way (RuntimeError, TypeError, torch.onnx errors)
        raise ExportError(f"exporting the {spec.name} module to ONNX (opset {OPSET}) failed: {exc}") from exc
    _declare_shapes(path, spec)
    logger.info("export %s done in %.1f s", spec.name, time.monotonic() - started)


def _declare_shapes(path: Path, spec: GraphSpec) -> None:
    """Write the contract's shapes into the graph's inputs and outputs: the exporter leaves symbolic
    dims on outputs (e.g. the token count after a Transpose), and a consumer that reads IO metadata
    (TensorRT's engine IO, the runtime's checks) must see only the batch/T dimension as dynamic."""
    import onnx

    model = onnx.load(str(path))
    declared = {s.name: s for s in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = declared.get(value.name)
        if tensor is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, tensor.shape):
            if size == -1:
                dim.dim_param = "T" if spec.name == "head" else "batch"
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


def _compare(name: str, expected: np.ndarray, actual: np.ndarray, atol: float) -> float:
    if expected.shape != actual.shape:
        raise ExportError(f"{name}: ONNX output shape {actual.shape} differs from PyTorch {expected.shape}")
    error = float(np.max(np.abs(expected - actual)))
    if not np.isfinite(error) or error > atol:
        raise ExportError(f"{name}: ONNX output differs from PyTorch by {error:.2e} (tolerance {atol:.0e})")
    return error


def export_policy(modules: dict[str, torch.nn.Module], specs: dict[str, GraphSpec],
                  reference_inputs: dict[str, dict[str, np.ndarray]], out_dir: Path) -> dict[str, dict]:
    """Export the three graphs into out_dir and check each against PyTorch on `reference_inputs`
    (per graph: input name -> array, with every dynamic dimension > 1 somewhere so that dynamic axes are
    exercised). Returns per graph: path, spec, max abs error."""
    import onnx
    import onnxruntime as ort

    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {name: module.eval() for name, module in modules.items()}
    tolerances = {"vision": 1e-3, "language": 1e-4, "head": 1e-4}
    results = {}
    for name, spec in specs.items():
        feeds = reference_inputs[name]
        args = tuple(torch.from_numpy(feeds[s.name]) for s in spec.inputs)
        path = out_dir / f"{name}_fp32.onnx"
        with torch.inference_mode():
            _export(modules[name], args, spec, path)
            expected = modules[name](*args).numpy()
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported {name} graph {path.name} fails onnx.checker: {exc}") from exc
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        actual = session.run(None, feeds)[0]
        # Relative to the output's scale: a policy's features need not be normalised.
        scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
        error = _compare(name, expected, actual, tolerances[name] * scale)
        logger.info("%s graph matches PyTorch: max abs error %.2e", name, error)
        results[name] = {"path": path, "spec": spec, "max_abs_error": error}
    return results
