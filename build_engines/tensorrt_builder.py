"""Build step: ONNX graph -> serialized TensorRT engine, plus the checks around it.

One chain of small steps (Polygraphy's shape): ``build_engine`` (graph -> engine bytes),
``save_engine`` (bytes + key -> files), ``verify_engine`` (engine + reference inputs/outputs -> report,
or a refusal). Each logs its start, end and duration.

Precision follows TensorRT's own split (docs/architecture.md, "Decisions: explicit quantization" and
"Decisions: FP16"):
- TensorRT 10.0 to 10.11 (JetPack 6.1/6.2 ship 10.3): weak typing, still needed there: "fp16" sets
  BuilderFlag.FP16; "int8" expects an explicitly quantized (Q/DQ) graph and sets INT8, plus FP16 for the
  layers left unquantized.
- TensorRT 10.12+ (weak typing deprecated) and 11 (precision flags removed, found by feature
  detection): strongly typed networks, as NVIDIA recommends for explicit quantization: precision comes
  from the graph itself, so "fp16" needs a graph with FP16 tensors and "int8" a Q/DQ graph; the network
  is created with STRONGLY_TYPED where that flag exists.
- TensorRT 8.x (JetPack 6.0) is refused with a message naming JetPack 6.1+
  (``edge.inference.backends.tensorrt.tensorrt_version_problem``; doctor says the same).
Every graph is first checked to be one TensorRT parses (``build_engines.layout.verify_tensorrt_graph``:
uint8 inputs feed only a Cast).
The timing cache persists between builds (a first build on a Jetson can take many minutes) and is
written back atomically.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# BuildError stays importable from here for callers written before errors.py; this module raises
# EngineBuildError, a BuildError.
from build_engines.errors import BuildError as BuildError
from build_engines.errors import EngineBuildError
from edge.errors import EdgeError
from edge.fileio import atomic_write_bytes
from edge.inference.backends.base import TensorSpec
from edge.inference.backends.tensorrt import (
    TENSORRT_HINT,
    TensorRTBackend,
    tensorrt_logger,
    tensorrt_version_problem,
)
from edge.inference.engine_key import PRECISIONS, EngineKey, file_sha256, key_path

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


def load_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineBuildError(TENSORRT_HINT) from exc
    return tensorrt


def tensorrt_status(trt: Any = None, cudart: Any = None) -> tuple[bool, str]:
    """Whether engines can be built here, with one line saying why not (or what was found)."""
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            return False, "TensorRT not available: " + TENSORRT_HINT
    too_old = tensorrt_version_problem(str(trt.__version__))
    if too_old:
        return False, too_old
    from edge.inference import cuda

    try:
        rt = cudart if cudart is not None else cuda.load_runtime()
        count = cuda.device_count(cudart=rt)
        capability = cuda.device_compute_capability(cudart=rt)
    except EdgeError as exc:  # BackendError (no cuda-python) or CudaError (no driver, no GPU)
        return False, f"no usable CUDA GPU for TensorRT {trt.__version__}: {exc}"
    if count < 1:
        return False, f"no CUDA GPU visible for TensorRT {trt.__version__}"
    return True, f"TensorRT {trt.__version__}, GPU compute capability {capability}"


# Weak typing (precision builder flags) is deprecated from TensorRT 10.12 (release notes) and gone in 11.
_WEAK_TYPING_DEPRECATED = (10, 12)


def _version(trt: Any) -> tuple[int, ...]:
    return tuple(int(p) for p in str(trt.__version__).split(".")[:2] if p.isdigit())


def weakly_typed(trt: Any) -> bool:
    """Whether to build weakly typed (precision from builder flags): only where the flags exist and are
    not deprecated, i.e. TensorRT 10.0 to 10.11; strongly typed everywhere else."""
    if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: the precision flags are gone
        return False
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return strongly is None or _version(trt) < _WEAK_TYPING_DEPRECATED


def require_supported(trt: Any) -> None:
    problem = tensorrt_version_problem(str(trt.__version__))
    if problem:
        raise EngineBuildError(problem)


def _graph_facts(onnx_path: Path) -> dict[str, Any]:
    """What the precision checks need from the graph: op types and tensor element types."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    elem_types = {t.data_type for t in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        elem_types.add(value.type.tensor_type.elem_type)
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                elem_types.add(attribute.i)
    return {
        "op_types": {node.op_type for node in model.graph.node},
        "has_fp16": onnx.TensorProto.FLOAT16 in elem_types,
    }


def _check_precision(onnx_path: Path, precision: str, trt: Any) -> None:
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return
    facts = _graph_facts(onnx_path)
    if precision == "int8" and not {"QuantizeLinear", "DequantizeLinear"} <= facts["op_types"]:
        raise EngineBuildError(
            f"{onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes: an int8 engine is built from the "
            "calibrated Q/DQ graph (TensorRT's INT8 calibrators are deprecated in 10 and gone in 11)"
        )
    if precision == "fp16" and not weakly_typed(trt) and not facts["has_fp16"]:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} takes precision from the graph and {onnx_path.name} has no FP16 "
            "tensors: pass the FP16 graph (or build fp32)"
        )


def _network_flags(trt: Any) -> int:
    if weakly_typed(trt):
        return 0  # weak typing, so that FP16/INT8 builder flags may pick precisions; batch is always explicit
    # TensorRT 11 is strongly typed whatever the flags; 10.12+ only with STRONGLY_TYPED.
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly is None else 1 << int(strongly)


def _set_precision_flags(config: Any, precision: str, trt: Any) -> list[str]:
    if not weakly_typed(trt) or precision == "fp32":
        return []
    names = ["FP16"] if precision == "fp16" else ["INT8", "FP16"]  # FP16 for the unquantized layers
    for name in names:
        config.set_flag(getattr(trt.BuilderFlag, name))
    return names


def _parse(parser: Any, onnx_path: Path, data: bytes) -> None:
    # The path lets the parser find weights stored beside the graph (ONNX external data).
    if parser.parse(data, str(onnx_path)):
        return
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = f"node {error.node()}"
        node_name = getattr(error, "node_name", None)
        if node_name is not None and node_name():
            where += f" ({node_name()}, {error.node_operator()})"
        code = error.code()
        lines.append(f"  {where}: {getattr(code, 'name', code)}: {error.desc()}")
    if not lines:
        lines.append("  (the parser gave no error detail)")
    raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n" + "\n".join(lines))


def _add_profile(builder: Any, network: Any, config: Any, profile: Mapping[str, tuple[Shape, Shape, Shape]],
                 trt_errors: Any) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise EngineBuildError(f"profile names {unknown}, which are not inputs of the graph; inputs are "
                               f"{sorted(inputs)}")
    missing = sorted(name for name, shape in inputs.items() if -1 in shape and name not in profile)
    if missing:
        raise EngineBuildError(f"inputs {missing} have dynamic dimensions: give each a (min, opt, max) shape "
                               "in profile")
    optimisation_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation_profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    if config.add_optimization_profile(optimisation_profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimisation profile {dict(profile)}: {trt_errors()}")


def _open_timing_cache(config: Any, path: Path | None) -> Any:
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None and blob:
        logger.warning("timing cache %s is unreadable; starting an empty one", path)
        blob = b""
        cache = config.create_timing_cache(blob)
    if cache is None:
        raise EngineBuildError("TensorRT could not create a timing cache")
    # ignore_mismatch=False: timings from another GPU or TensorRT would choose slow or invalid tactics.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s was made by another TensorRT or GPU; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT refused an empty timing cache")
    elif blob:
        logger.info("timing cache: %d bytes loaded from %s", len(blob), path)
    return cache


def atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old or the new file, never half of one."""
    atomic_write_bytes(path, data)


def build_engine(
    onnx_path: str | Path,
    *,
    precision: str,
    profile: Mapping[str, tuple[Shape, Shape, Shape]],
    timing_cache_path: str | Path | None,
    workspace_mib: int = 1024,
    trt: Any = None,
) -> bytes:
    """Compile an ONNX graph into a serialized engine for this TensorRT and GPU.

    `profile` maps each input with a dynamic dimension to (min, opt, max) shapes, e.g. the head's masks
    to ((1, W), (T, W), (T_max, W)) so that any sample count from 1 to T_max runs.
    """
    onnx_path = Path(onnx_path)
    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    trt = trt if trt is not None else load_tensorrt()
    require_supported(trt)
    if not onnx_path.is_file():
        raise EngineBuildError(f"graph {onnx_path} does not exist")
    if workspace_mib < 1:
        raise EngineBuildError(f"workspace_mib must be >= 1, got {workspace_mib}")
    from build_engines.layout import TensorRTGraphError, verify_tensorrt_graph

    try:  # a graph TensorRT's parser refuses is named before the long build
        verify_tensorrt_graph(onnx_path)
    except TensorRTGraphError:
        raise
    except EdgeError:
        logger.debug("%s is not readable as ONNX here; TensorRT's parser will say why", onnx_path)
    _check_precision(onnx_path, precision, trt)
    started = time.perf_counter()
    logger.info("building %s engine from %s on TensorRT %s", precision, onnx_path.name, trt.__version__)

    trt_logger = tensorrt_logger(trt)
    mark = trt_logger.mark()

    def trt_errors() -> str:
        return trt_logger.errors_since(mark)

    builder = trt.Builder(trt_logger)
    network = builder.create_network(_network_flags(trt))
    config = builder.create_builder_config()
    flags = _set_precision_flags(config, precision, trt)
    parser = trt.OnnxParser(network, trt_logger)
    _parse(parser, onnx_path, onnx_path.read_bytes())
    _add_profile(builder, network, config, profile, trt_errors)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    _open_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} failed to build {onnx_path.name} ({precision}): "
            f"{trt_errors()}"
        )
    engine = bytes(serialized)
    if cache_path is not None:
        atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    logger.info("built %s engine from %s in %.1f s (%.1f MiB, flags %s)", precision, onnx_path.name,
                time.perf_counter() - started, len(engine) / 2**20, flags or "none")
    return engine


def engine_key_for(onnx_path: str | Path, precision: str, trt: Any, cuda: Any) -> EngineKey:
    """The key of an engine built here from `onnx_path`; `cuda` is the cuda-python runtime module."""
    from edge.inference.cuda import device_compute_capability, device_multiprocessors, device_name

    return EngineKey(
        source_sha256=file_sha256(onnx_path),
        tensorrt_version=str(trt.__version__),
        compute_capability=device_compute_capability(cudart=cuda),
        precision=precision,
        gpu_name=device_name(cudart=cuda),
        multiprocessors=str(device_multiprocessors(cudart=cuda)),
    )


def save_engine(engine_bytes: bytes, key: EngineKey, engine_path: str | Path) -> Path:
    """Write the engine and its key file beside it, each atomically; the key goes last, so a key file
    never vouches for an engine that was not completely written."""
    engine_path = Path(engine_path)
    atomic_write(engine_path, engine_bytes)
    key.save(key_path(engine_path))
    logger.info("saved %s (%.1f MiB) and its key %s", engine_path, len(engine_bytes) / 2**20, key.digest()[:12])
    return engine_path


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass
class OutputComparison:
    name: str
    max_abs_error: float
    max_excess: float  # largest |a - b| - (atol + rtol * |b|); <= 0 means within tolerance
    within: bool


@dataclass
class VerificationReport:
    passed: bool
    batch: int
    outputs: list[OutputComparison] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{o.name}: max |err| {o.max_abs_error:.3g} ({'ok' if o.within else 'OUT OF TOLERANCE'})"
                 for o in self.outputs]
        return "; ".join(parts)


def _batch_of(inputs: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> int:
    batches = {int(inputs[s.name].shape[0]) for s in specs if s.dynamic}
    if len(batches) > 1:
        raise EngineBuildError(f"reference inputs disagree on the batch size: {sorted(batches)}")
    return batches.pop() if batches else 1


def verify_engine(
    engine_bytes: bytes,
    inputs: Mapping[str, np.ndarray],
    reference_outputs: Mapping[str, np.ndarray],
    tolerances: Tolerance | Mapping[str, Tolerance],
    *,
    input_specs: tuple[TensorSpec, ...],
    output_specs: tuple[TensorSpec, ...],
    key: EngineKey | None = None,
    trt: Any = None,
    cudart: Any = None,
) -> VerificationReport:
    """Run the engine through TensorRTBackend on the reference inputs and compare every output.

    Returns the report when every output is within tolerance, raises EngineBuildError (naming each
    output out of tolerance) otherwise. With `key`, the engine also goes through the runtime's key check,
    as it will on the robot.
    """
    missing = sorted({s.name for s in input_specs} - set(inputs))
    if missing:
        raise EngineBuildError(f"reference inputs lack {missing}")
    missing = sorted({s.name for s in output_specs} - set(reference_outputs))
    if missing:
        raise EngineBuildError(f"reference outputs lack {missing}")
    batch = _batch_of(inputs, input_specs)
    with tempfile.TemporaryDirectory(prefix="verify-engine-") as folder:
        engine_path = Path(folder) / "engine.plan"
        if key is not None:
            save_engine(engine_bytes, key, engine_path)
        else:
            engine_path.write_bytes(engine_bytes)
        backend = TensorRTBackend(engine_path, key, input_specs, output_specs, max_batch=batch, trt=trt,
                                  cudart=cudart)
        with backend:
            for spec in input_specs:
                value = np.asarray(inputs[spec.name], dtype=spec.dtype)
                target = backend.input(spec.name)
                (target[:batch] if spec.dynamic else target)[...] = value
            outputs = {name: array.copy() for name, array in backend.run(batch).items()}
    report = VerificationReport(passed=True, batch=batch)
    for spec in output_specs:
        tolerance = tolerances if isinstance(tolerances, Tolerance) else tolerances[spec.name]
        actual = outputs[spec.name].astype(np.float64)
        expected = np.asarray(reference_outputs[spec.name], dtype=np.float64)
        if actual.shape != expected.shape:
            raise EngineBuildError(f"engine output {spec.name} has shape {actual.shape}, reference "
                                   f"{expected.shape}")
        error = np.abs(actual - expected)
        excess = error - (tolerance.atol + tolerance.rtol * np.abs(expected))
        finite = bool(np.isfinite(actual).all())
        max_excess = float(excess.max()) if excess.size else 0.0
        within = finite and max_excess <= 0.0
        report.outputs.append(OutputComparison(
            spec.name, float(error.max()) if error.size else 0.0, max_excess if finite else math.inf, within))
        report.passed = report.passed and within
    if not report.passed:
        raise EngineBuildError(f"engine does not reproduce the reference outputs (batch {batch}): "
                               f"{report.summary()}")
    logger.info("engine verified on batch %d: %s", batch, report.summary())
    return report
