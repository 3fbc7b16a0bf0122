"""A faithful fake of the TensorRT Python API that the engine builder and the TensorRT backend use.

``make_fake_tensorrt("8.6.2")`` like TensorRT 8.6 (implicit batch unless EXPLICIT_BATCH), and
``make_fake_tensorrt("10.3.0")`` behaves like TensorRT 10 (weak typing: FP16/INT8 builder flags,
EXPLICIT_BATCH and STRONGLY_TYPED network flags); ``make_fake_tensorrt("11.0.0")`` like TensorRT 11
(strongly typed only: no precision builder flags, STRONGLY_TYPED kept but ignored). Using an API the
version does not have fails the way the real module does (AttributeError on the enum member).

What is real here:
- ``OnnxParser`` parses with the ``onnx`` package (``onnx.load`` + ``onnx.checker``), resolves external
  weights relative to the model path, applies the importer rules of onnx-tensorrt
  (``tests/fakes/onnx_tensorrt_rules.py``: uint8 only as network I/O into a Cast, the supported ops and
  their input types, symmetric Q/DQ with positive scales; explicit batch on 8.x), and fails like
  TensorRT: ``parse()`` returns False and the errors are read with ``num_errors`` / ``get_error(i)``
  (``desc()``, ``node()``, ``code()``...). Ops listed in ``unsupported_ops`` fail as TensorRT fails on an
  op it has no importer for.
- ``build_serialized_network`` checks what TensorRT checks (a profile for every dynamic input, shapes
  min <= opt <= max, no precision flags on a strongly typed network), uses and fills the timing cache,
  and returns an ``IHostMemory`` (bytes) holding the ONNX model and the build metadata, or None with
  the reason logged through the ``ILogger``.
- ``Runtime.deserialize_cuda_engine`` refuses a plan from another TensorRT version or GPU; the engine's
  IO metadata comes from the ONNX graph (dynamic leading dim -1); ``execute_async_v3`` queues, on the
  fake CUDA stream, a kernel that reads the inputs from the bound device addresses, runs the ONNX model
  with onnxruntime and writes the outputs to their bound addresses (needs ``cudart=`` a FakeCudaRuntime).

Every API call is appended to ``trt.fake.calls`` as ``(name, args)`` so tests can check the order.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edge.inference.backends.onnxruntime import session_options
from tests.fakes.onnx_tensorrt_rules import builder_errors, parser_errors

_PLAN_MAGIC = b"FAKE-TRT-PLAN\x00"
_CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE\x00"


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class ErrorCode(enum.IntEnum):
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8
    UNSUPPORTED_NODE_ATTR = 9
    UNSUPPORTED_NODE_INPUT = 10
    UNSUPPORTED_NODE_DATATYPE = 11
    UNSUPPORTED_NODE_DYNAMIC = 12
    UNSUPPORTED_NODE_SHAPE = 13
    REFIT_FAILED = 14

    def __str__(self) -> str:  # the bindings print the name
        return self.name


_NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT8: np.int8,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.INT64: np.int64,
}
_FROM_ONNX = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BFLOAT16: DataType.BF16,
}

# Builder flags by version. TensorRT 11 removed every flag that enabled a precision (weak typing).
_FLAGS_COMMON = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                 "SAFETY_SCOPE", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "STRIP_PLAN",
                 "REFIT_IDENTICAL", "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "MONITOR_MEMORY"]
_FLAGS_WEAK_TYPING = ["FP16", "BF16", "INT8", "FP8", "INT4", "OBEY_PRECISION_CONSTRAINTS",
                      "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"]
_PRECISION_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4"}


def nptype(trt_type: DataType) -> type:
    try:
        return _NUMPY[DataType(int(trt_type))]
    except KeyError:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.") from None


def volume(shape: Any) -> int:
    return int(np.prod(list(shape), dtype=np.int64))


class Dims(tuple):
    """TensorRT's Dims: a sequence of ints."""


@dataclass
class FakeState:
    """Shared by all objects of one fake module; the test's window into what happened."""

    version: str
    cudart: Any = None
    default_compute_capability: str = "8.7"
    unsupported_ops: set[str] = field(default_factory=set)
    calls: list[tuple[str, tuple]] = field(default_factory=list)
    build_failure: str | None = None  # the next build fails with this logged error
    last_build: dict | None = None

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def compute_capability(self) -> str:
        if self.cudart is not None and hasattr(self.cudart, "compute_capability"):
            major, minor = self.cudart.compute_capability
            return f"{major}.{minor}"
        return self.default_compute_capability

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _log(logger: Any, severity: Severity, message: str) -> None:
    logger.log(severity, message)


def _require_logger(logger: Any) -> None:
    # pybind11 refuses a subclass whose __init__ did not call the base __init__; so does the fake.
    if not getattr(logger, "_fake_initialised", False):
        raise TypeError("ILogger.__init__() must be called when overriding __init__")


class _ILogger:
    Severity = Severity

    def __init__(self) -> None:
        self._fake_initialised = True

    def log(self, severity: Severity, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual")


class _Logger(_ILogger):
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity
        self.messages: list[tuple[Severity, str]] = []

    def log(self, severity: Severity, msg: str) -> None:
        if severity <= self.min_severity:
            self.messages.append((severity, msg))


class IHostMemory(bytes):
    """Serialized data owned by TensorRT; supports the buffer protocol (bytes(), memoryview())."""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self) -> DataType:
        return DataType.UINT8


@dataclass
class ITensor:
    name: str
    shape: Dims
    dtype: DataType

    @property
    def is_shape_tensor(self) -> bool:
        return False


def _dims_of(value_info: onnx.ValueInfoProto) -> Dims:
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1)
    return Dims(dims)


class INetworkDefinition:
    def __init__(self, state: FakeState, flags: int, flag_enum: type[enum.IntEnum]):
        self._state = state
        self._flags = int(flags)
        self._flag_enum = flag_enum
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self.fake_model: onnx.ModelProto | None = None
        self.name = "Unnamed Network 0"

    def get_flag(self, flag: enum.IntEnum) -> bool:
        if self._state.major >= 11 and flag.name == "STRONGLY_TYPED":
            return True  # always strongly typed from TensorRT 11 on
        return bool(self._flags & (1 << int(flag)))

    @property
    def fake_strongly_typed(self) -> bool:
        strongly = getattr(self._flag_enum, "STRONGLY_TYPED", None)  # TensorRT 8 has none
        return strongly is not None and self.get_flag(strongly)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return 0 if self.fake_model is None else len(self.fake_model.graph.node)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]

    def fake_load(self, model: onnx.ModelProto) -> None:
        initializers = {init.name for init in model.graph.initializer}
        self._inputs = [ITensor(v.name, _dims_of(v), _FROM_ONNX[v.type.tensor_type.elem_type])
                        for v in model.graph.input if v.name not in initializers]
        self._outputs = [ITensor(v.name, _dims_of(v), _FROM_ONNX[v.type.tensor_type.elem_type])
                         for v in model.graph.output]
        self.fake_model = model


class ParserError:
    def __init__(self, code: ErrorCode, desc: str, node: int = -1, node_name: str = "", node_operator: str = "",
                 func: str = "parseGraph"):
        self._code, self._desc, self._node = code, desc, node
        self._node_name, self._node_operator, self._func = node_name, node_operator, func

    def code(self) -> ErrorCode:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def func(self) -> str:
        return self._func

    def local_function_stack(self) -> list[str]:
        return []

    def __str__(self) -> str:
        return (f"In node {self._node} with name: {self._node_name} and operator: {self._node_operator} "
                f"({self._func}): {self._code.name}: {self._desc}")


class _OnnxParser:
    _state: FakeState

    def __init__(self, network: INetworkDefinition, logger: Any):
        _require_logger(logger)
        self._network = network
        self._logger = logger
        self._errors: list[ParserError] = []
        self._state.record("OnnxParser")

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def supports_operator(self, op_name: str) -> bool:
        return op_name not in self._state.unsupported_ops

    def parse_from_file(self, model: str) -> bool:
        self._state.record("OnnxParser.parse_from_file", model)
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file: {model} ({exc})")
            return False
        return self._parse(data, model)

    def parse(self, model: Any, path: str | None = None) -> bool:
        self._state.record("OnnxParser.parse", len(memoryview(model)), path)
        return self._parse(bytes(memoryview(model)), path)

    def _fail(self, code: ErrorCode, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        error = ParserError(code, desc, node, name, op)
        self._errors.append(error)
        _log(self._logger, Severity.ERROR, str(error))

    def _parse(self, data: bytes, path: str | None) -> bool:
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf raises its own DecodeError; TensorRT reports any as this
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to parse ONNX model from buffer: {exc}")
            return False
        if not model.graph.node and not model.graph.output:
            self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, "Failed to parse ONNX model: empty graph")
            return False
        external = [t.name for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            if path is None:
                self._fail(ErrorCode.INVALID_VALUE,
                           f"Failed to open file for external weights of {external[0]}: no model path given")
                return False
            try:
                onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
            except OSError as exc:
                self._fail(ErrorCode.INVALID_VALUE, f"Failed to open file for external weights: {exc}")
                return False
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            self._fail(ErrorCode.INVALID_GRAPH, f"ONNX model is invalid: {exc}".splitlines()[0])
            return False
        if self._state.major < 10 and not self._network._flags & 1:
            # onnx-tensorrt 8.x ModelImporter::parse: "This version of the ONNX parser only supports TensorRT
            # INetworkDefinitions with an explicit batch dimension" (create_network(0) is implicit batch there).
            self._fail(ErrorCode.INVALID_VALUE, "This version of the ONNX parser only supports TensorRT "
                       "INetworkDefinitions with an explicit batch dimension. Please ensure the network was "
                       "initialized with the kEXPLICIT_BATCH flag.")
            return False
        # The importers' rules (uint8 only as I/O into Cast, supported ops and types, symmetric Q/DQ):
        # tests/fakes/onnx_tensorrt_rules.py, each with its source.
        for error in parser_errors(model, self._state.unsupported_ops):
            self._fail(ErrorCode[error.code], error.desc, error.node, error.node_name, error.op)
        if self._errors:
            return False
        self._network.fake_load(model)
        return True


class IOptimizationProfile:
    def __init__(self, state: FakeState):
        self._state = state
        self._shapes: dict[str, tuple[Dims, Dims, Dims]] = {}
        self.fake_errors: list[str] = []

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self._state.record("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
        lo, mid, hi = Dims(min), Dims(opt), Dims(max)
        # NvInferRuntime.h, IOptimizationProfile::setDimensions: "0 <= minDims <= optDims <= maxDims" per
        # dimension and the same rank for all three, else the profile is invalid.
        if not (len(lo) == len(mid) == len(hi)) or any(
            not (0 <= a <= b <= c) for a, b, c in zip(lo, mid, hi, strict=True)
        ):
            self.fake_errors.append(f"{input}: need 0 <= min <= opt <= max per dimension, got {lo} {mid} {hi}")
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        return list(self._shapes.get(input, ()))

    def __bool__(self) -> bool:
        return not self.fake_errors


class ITimingCache:
    def __init__(self, state: FakeState, origin: dict, entries: dict[str, int]):
        self._state = state
        self.fake_origin = origin
        self.fake_entries = entries

    def serialize(self) -> IHostMemory:
        self._state.record("ITimingCache.serialize")
        payload = json.dumps({"origin": self.fake_origin, "entries": self.fake_entries}, sort_keys=True)
        return IHostMemory(_CACHE_MAGIC + payload.encode())

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache.fake_origin != self.fake_origin and not ignore_mismatch:
            return False
        self.fake_entries.update(input_cache.fake_entries)
        return True

    def reset(self) -> bool:
        self.fake_entries.clear()
        return True


class IBuilderConfig:
    def __init__(self, state: FakeState, logger: Any, flag_enum: type[enum.IntEnum]):
        self._state = state
        self._logger = logger
        self._flag_enum = flag_enum
        self._flags: set[enum.IntEnum] = set()
        self._pools: dict[MemoryPoolType, int] = {}
        self._profiles: list[IOptimizationProfile] = []
        self._timing_cache: ITimingCache | None = None

    @property
    def flags(self) -> int:
        return sum(1 << int(flag) for flag in self._flags)

    def set_flag(self, flag: enum.IntEnum) -> None:
        self._state.record("IBuilderConfig.set_flag", flag.name)
        self._flags.add(flag)

    def clear_flag(self, flag: enum.IntEnum) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag: enum.IntEnum) -> bool:
        return flag in self._flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._state.record("IBuilderConfig.set_memory_pool_limit", pool.name, int(pool_size))
        self._pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
        return self._pools.get(pool, 8 << 30)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self._state.record("IBuilderConfig.add_optimization_profile")
        if not profile:
            for message in profile.fake_errors:
                _log(self._logger, Severity.ERROR, f"IOptimizationProfile::setDimensions: {message}")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def _origin(self) -> dict:
        return {"tensorrt": self._state.version, "compute_capability": self._state.compute_capability}

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
        blob = bytes(memoryview(serialized_timing_cache))
        self._state.record("IBuilderConfig.create_timing_cache", blob)
        if not blob:
            return ITimingCache(self._state, self._origin(), {})
        try:
            if not blob.startswith(_CACHE_MAGIC):
                raise ValueError("magic tag does not match")
            raw = json.loads(blob[len(_CACHE_MAGIC):])
            return ITimingCache(self._state, dict(raw["origin"]), dict(raw["entries"]))
        except (ValueError, KeyError, TypeError) as exc:
            _log(self._logger, Severity.ERROR, f"Error Code 1: Serialization (timing cache is corrupted: {exc})")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._state.record("IBuilderConfig.set_timing_cache", bool(ignore_mismatch))
        if cache.fake_origin != self._origin() and not ignore_mismatch:
            _log(self._logger, Severity.ERROR,
                 f"Error Code 3: API Usage Error (timing cache was created by {cache.fake_origin}, "
                 f"this builder is {self._origin()}; it cannot be used unless mismatches are ignored)")
            return False
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        self._state.record("IBuilderConfig.get_timing_cache")
        return self._timing_cache


class _Builder:
    _state: FakeState
    _flag_enum: type[enum.IntEnum]
    _network_flag_enum: type[enum.IntEnum]

    def __init__(self, logger: Any):
        _require_logger(logger)
        self.logger = logger
        self._state.record("Builder")

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        self._state.record("Builder.create_network", int(flags))
        return INetworkDefinition(self._state, flags, self._network_flag_enum)

    def create_builder_config(self) -> IBuilderConfig:
        self._state.record("Builder.create_builder_config")
        return IBuilderConfig(self._state, self.logger, self._flag_enum)

    def create_optimization_profile(self) -> IOptimizationProfile:
        self._state.record("Builder.create_optimization_profile")
        return IOptimizationProfile(self._state)

    def _build_errors(self, network: INetworkDefinition, config: IBuilderConfig) -> list[str]:
        errors = []
        if network.fake_model is None or network.num_outputs == 0:
            errors.append("Error Code 4: Internal Error (Network must have at least one output)")
            return errors
        precision_flags = sorted(f.name for f in config._flags if f.name in _PRECISION_FLAGS)
        # TensorRT developer guide, "Strongly Typed Networks": the precision builder flags are not allowed on
        # a strongly typed network (types come from the network and its Cast/Q/DQ layers).
        if network.fake_strongly_typed and precision_flags:
            errors.append(f"Error Code 3: API Usage Error (BuilderFlag {precision_flags} cannot be set "
                          "on a strongly typed network: its types come from the network)")
        # TensorRT developer guide, "Working with Dynamic Shapes" / "Optimization Profiles": a network with a
        # dynamic input (the head's T) needs at least one profile giving every dynamic input its min/opt/max,
        # each fitting the input's fixed dimensions.
        dynamic = [t for t in network._inputs if -1 in t.shape]
        if dynamic and not config._profiles:
            errors.append("Error Code 4: Internal Error (Network has dynamic or shape inputs, but no "
                          "optimization profile has been defined.)")
        for index, profile in enumerate(config._profiles):
            for tensor in dynamic:
                shapes = profile._shapes.get(tensor.name)
                if shapes is None:
                    errors.append(f"Error Code 4: Internal Error (Optimization profile {index} has no shape "
                                  f"for dynamic input {tensor.name})")
                    continue
                for which in shapes:
                    if len(which) != len(tensor.shape) or any(
                        d != -1 and d != w for d, w in zip(tensor.shape, which, strict=True)
                    ):
                        errors.append(f"Error Code 4: Internal Error (profile shape {tuple(which)} of "
                                      f"{tensor.name} does not fit its dimensions {tuple(tensor.shape)})")
        errors += builder_errors(network.fake_model)
        if self._state.build_failure:
            errors.append(self._state.build_failure)
            self._state.build_failure = None
        return errors

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        self._state.record("Builder.build_serialized_network")
        errors = self._build_errors(network, config)
        if errors:
            for message in errors:
                _log(self.logger, Severity.ERROR, message)
            self._state.last_build = {"errors": errors}
            return None
        model = network.fake_model
        flag_names = sorted(f.name for f in config._flags)
        # Tactic timing per layer: a cache entry makes a rebuild skip the measurement.
        cache = config._timing_cache or ITimingCache(self._state, config._origin(), {})
        hits = misses = 0
        for index, node in enumerate(model.graph.node):
            key = f"{node.op_type}|{node.name or index}|{','.join(flag_names)}"
            if key in cache.fake_entries:
                hits += 1
            else:
                misses += 1
                cache.fake_entries[key] = index
        profiles = [{name: [list(s) for s in shapes] for name, shapes in p._shapes.items()}
                    for p in config._profiles]
        header = {
            "tensorrt_version": self._state.version,
            "compute_capability": self._state.compute_capability,
            "builder_flags": flag_names,
            "strongly_typed": network.fake_strongly_typed,
            "workspace_bytes": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
            "profiles": profiles,
            "inputs": [[t.name, int(t.dtype), list(t.shape)] for t in network._inputs],
            "outputs": [[t.name, int(t.dtype), list(t.shape)] for t in network._outputs],
        }
        self._state.last_build = {**header, "timing_cache_hits": hits, "timing_cache_misses": misses}
        encoded = json.dumps(header, sort_keys=True).encode()
        return IHostMemory(_PLAN_MAGIC + struct.pack(">I", len(encoded)) + encoded + model.SerializeToString())


def _split_plan(plan: bytes) -> tuple[dict, bytes]:
    start = len(_PLAN_MAGIC) + 4
    (length,) = struct.unpack(">I", plan[len(_PLAN_MAGIC):start])
    return json.loads(plan[start:start + length]), plan[start + length:]


def fake_plan_header(plan: bytes) -> dict:
    """The build metadata inside a fake plan (for tests)."""
    return _split_plan(bytes(plan))[0]


class ICudaEngine:
    def __init__(self, state: FakeState, header: dict, model_bytes: bytes, logger: Any):
        self._state = state
        self._logger = logger
        self.fake_header = header
        self._model_bytes = model_bytes
        self._io: list[tuple[str, TensorIOMode, DataType, Dims]] = []
        for mode, key in ((TensorIOMode.INPUT, "inputs"), (TensorIOMode.OUTPUT, "outputs")):
            for name, dtype, shape in header[key]:
                self._io.append((name, mode, DataType(dtype), Dims(shape)))
        self._by_name = {entry[0]: entry for entry in self._io}
        self.name = "fake-engine"

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return max(len(self.fake_header["profiles"]), 1)

    def get_tensor_name(self, index: int) -> str:
        self._state.record("ICudaEngine.get_tensor_name", index)
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        self._state.record("ICudaEngine.get_tensor_mode", name)
        entry = self._by_name.get(name)
        return TensorIOMode.NONE if entry is None else entry[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        self._state.record("ICudaEngine.get_tensor_dtype", name)
        return self._by_name[name][2]

    def get_tensor_shape(self, name: str) -> Dims:
        self._state.record("ICudaEngine.get_tensor_shape", name)
        return self._by_name[name][3]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        profiles = self.fake_header["profiles"]
        if name in self._by_name and not profiles:  # static engine: every profile shape is the shape
            return [self._by_name[name][3]] * 3
        shapes = profiles[profile_index].get(name)
        if shapes is None:
            return [self._by_name[name][3]] * 3
        return [Dims(s) for s in shapes]

    def create_execution_context(self) -> IExecutionContext:
        self._state.record("ICudaEngine.create_execution_context")
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        encoded = json.dumps(self.fake_header, sort_keys=True).encode()
        return IHostMemory(_PLAN_MAGIC + struct.pack(">I", len(encoded)) + encoded + self._model_bytes)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        import onnxruntime as ort

        self.engine = engine
        self._state = engine._state
        options = session_options(ort, threads=1)  # exact INT8 path on CPUs without VNNI, as the runtime
        self._session = ort.InferenceSession(engine._model_bytes, options, providers=["CPUExecutionProvider"])
        self._shapes: dict[str, Dims] = {}
        self._addresses: dict[str, int] = {}
        self.fake_executions = 0

    def _error(self, message: str) -> None:
        # TensorRT reports a context's errors through the logger of the runtime that made the engine.
        _log(self.engine._logger, Severity.ERROR, message)

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = Dims(int(d) for d in shape)
        self._state.record("IExecutionContext.set_input_shape", name, tuple(shape))
        entry = self.engine._by_name.get(name)
        if entry is None or entry[1] != TensorIOMode.INPUT:
            self._error(f"setInputShape: {name} is not an input tensor")
            return False
        declared = entry[3]
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(declared) or any(
            (d != -1 and s != d) or not (a <= s <= b) for s, d, a, b in zip(shape, declared, lo, hi, strict=True)
        ):
            self._error(f"setInputShape: {name} shape {tuple(shape)} is outside the profile {tuple(lo)}..{tuple(hi)}")
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        entry = self.engine._by_name[name]
        if entry[1] == TensorIOMode.INPUT:
            return self._shapes.get(name, entry[3])
        batch = next((self._shapes[n][0] for n, mode, _, s in self.engine._io
                      if mode == TensorIOMode.INPUT and -1 in s and n in self._shapes), -1)
        return Dims(batch if d == -1 else d for d in entry[3])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._state.record("IExecutionContext.set_tensor_address", name, int(memory))
        if name not in self.engine._by_name:
            self._error(f"setTensorAddress: {name} is not an IO tensor of this engine")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def infer_shapes(self) -> list[str]:
        return [n for n, mode, _, s in self.engine._io if mode == TensorIOMode.INPUT and -1 in s
                and n not in self._shapes]

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._state.record("IExecutionContext.execute_async_v3", int(stream_handle))
        cudart = self._state.cudart
        if cudart is None:
            self._error("enqueueV3: no CUDA runtime (make the fake with cudart=FakeCudaRuntime())")
            return False
        missing = self.infer_shapes()
        if missing:
            self._error(f"enqueueV3: input shapes not specified for {missing}")
            return False
        unbound = [n for n, *_ in self.engine._io if not self._addresses.get(n)]
        if unbound:
            self._error(f"enqueueV3: no address set for {unbound}")
            return False
        # The launch captures shapes and addresses now, as kernel arguments do.
        ins = [(n, self._addresses[n], tuple(self.get_tensor_shape(n)), nptype(dt))
               for n, mode, dt, _ in self.engine._io if mode == TensorIOMode.INPUT]
        outs = [(n, self._addresses[n], tuple(self.get_tensor_shape(n)), nptype(dt))
                for n, mode, dt, _ in self.engine._io if mode == TensorIOMode.OUTPUT]
        session = self._session

        def kernel() -> None:
            feeds = {n: cudart.fake_device_array(ptr, shape, dtype).copy() for n, ptr, shape, dtype in ins}
            results = session.run([n for n, *_ in outs], feeds)
            for (n, ptr, shape, dtype), value in zip(outs, results, strict=True):
                assert value.shape == shape, f"fake engine: {n} came out {value.shape}, context said {shape}"
                cudart.fake_device_array(ptr, shape, dtype)[...] = value

        try:
            cudart.fake_enqueue(stream_handle, "TensorRT enqueueV3", kernel)
        except Exception as exc:  # the fake runtime's FakeCudaFault: an invalid stream
            self._error(f"enqueueV3: {exc}")
            return False
        self.fake_executions += 1
        return True


class _Runtime:
    _state: FakeState

    def __init__(self, logger: Any):
        _require_logger(logger)
        self.logger = logger
        self._state.record("Runtime")

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        data = bytes(memoryview(serialized_engine))
        self._state.record("Runtime.deserialize_cuda_engine", len(data))
        if not data.startswith(_PLAN_MAGIC):
            _log(self.logger, Severity.ERROR, "Error Code 1: Serialization (Serialization assertion "
                 "magicTagRead == kMAGIC_TAG failed.Magic tag does not match)")
            return None
        header, model_bytes = _split_plan(data)
        if header["tensorrt_version"] != self._state.version:
            _log(self.logger, Severity.ERROR, "Error Code 1: Serialization (Serialization assertion "
                 "stdVersionRead == kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current "
                 f"Version: {self._state.version}, Serialized Engine Version: {header['tensorrt_version']})")
            return None
        if header["compute_capability"] != self._state.compute_capability:
            _log(self.logger, Severity.ERROR, "Error Code 1: Serialization (The engine plan file is generated "
                 f"on an incompatible device, expecting compute {self._state.compute_capability} got compute "
                 f"{header['compute_capability']}, please rebuild.)")
            return None
        return ICudaEngine(self._state, header, model_bytes, self.logger)


def make_fake_tensorrt(version: str = "10.3.0", *, cudart: Any = None, unsupported_ops: tuple[str, ...] = (),
                       compute_capability: str = "8.7") -> types.ModuleType:
    """A module that looks like ``import tensorrt`` of the given version (10.x or 11.x)."""
    state = FakeState(version=version, cudart=cudart, default_compute_capability=compute_capability,
                      unsupported_ops=set(unsupported_ops))
    major = state.major
    if major not in (8, 10, 11):
        raise ValueError(f"the fake models TensorRT 8.x, 10.x and 11.x, not {version}")
    flag_names = _FLAGS_COMMON + (_FLAGS_WEAK_TYPING if major < 11 else [])
    builder_flag = enum.IntEnum("BuilderFlag", [(n, i) for i, n in enumerate(flag_names)])
    if major == 8:  # TensorRT 8.6 (JetPack 6.0): implicit batch unless EXPLICIT_BATCH; no strong typing
        network_flag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                    [("EXPLICIT_BATCH", 0), ("EXPLICIT_PRECISION", 1)])
    elif major == 10:
        network_flag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                    [("EXPLICIT_BATCH", 0), ("STRONGLY_TYPED", 1),
                                     ("PREFER_AOT_PYTHON_PLUGINS", 2), ("PREFER_JIT_PYTHON_PLUGINS", 3)])
    else:
        network_flag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                    [("STRONGLY_TYPED", 1), ("PREFER_AOT_PYTHON_PLUGINS", 2),
                                     ("PREFER_JIT_PYTHON_PLUGINS", 3)])

    builder_attrs: dict[str, Any] = {"_state": state, "_flag_enum": builder_flag, "_network_flag_enum": network_flag}
    if major < 11:
        builder_attrs["platform_has_fast_fp16"] = property(lambda self: True)
        builder_attrs["platform_has_fast_int8"] = property(lambda self: True)

    module = types.ModuleType("tensorrt", f"fake TensorRT {version}")
    module.__version__ = version
    module.fake = state
    module.ILogger = type("ILogger", (_ILogger,), {})
    module.Logger = type("Logger", (_Logger, module.ILogger), {})
    module.Builder = type("Builder", (_Builder,), builder_attrs)
    module.Runtime = type("Runtime", (_Runtime,), {"_state": state})
    module.OnnxParser = type("OnnxParser", (_OnnxParser,), {"_state": state})
    module.BuilderFlag = builder_flag
    module.NetworkDefinitionCreationFlag = network_flag
    module.DataType = DataType
    module.TensorIOMode = TensorIOMode
    module.MemoryPoolType = MemoryPoolType
    module.ErrorCode = ErrorCode
    module.Dims = Dims
    module.IHostMemory = IHostMemory
    module.ICudaEngine = ICudaEngine
    module.IExecutionContext = IExecutionContext
    module.IBuilderConfig = IBuilderConfig
    module.INetworkDefinition = INetworkDefinition
    module.IOptimizationProfile = IOptimizationProfile
    module.ITimingCache = ITimingCache
    module.ParserError = ParserError
    module.nptype = nptype
    module.volume = volume
    return module
