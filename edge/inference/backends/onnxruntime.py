"""ONNX Runtime backend: CPU by default (the CPU-targeted graphs), CUDA execution provider with
IOBinding where onnxruntime-gpu and a GPU are present.

Buffers: every input and output gets a host buffer at its maximum shape in activate(). On CPU the
session writes outputs straight into those buffers through IOBinding (bind_output with the buffer's
address), so run() allocates nothing of its own beyond what ONNX Runtime does internally.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from edge.errors import BackendError
from edge.inference.backends.base import BackendInfo, InferenceBackend, RunTiming, TensorSpec, check_io
from edge.inference.cpu_isa import x64_quant_precision

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


# Session config entries a bundle may set per graph variant (manifest graphs.<graph>.variants.<v>.ort_session),
# with the values each accepts. session.x64quantprecision "0": the variant's weights are 7-bit (reduce
# range), so the fast u8s8 kernels are exact without VNNI and the exact path would only cost time.
SESSION_CONFIG_ALLOWED = {"session.x64quantprecision": ("0", "1")}


def default_session_config() -> dict[str, str]:
    """What every session gets unless its variant records otherwise: the exact INT8 path only on x86 CPUs
    whose fast kernels would saturate (edge/inference/cpu_isa.py)."""
    return {"session.x64quantprecision": _X64_QUANT_PRECISION()}


_X64_QUANT_PRECISION = functools.cache(x64_quant_precision)  # /proc/cpuinfo read once per process


def session_options(ort, threads: int = 0, config: dict[str, str] | None = None):
    """Session options for every CPU session the project creates (runtime and build alike); `config`
    (a variant's recorded ort_session, checked by the bundle against SESSION_CONFIG_ALLOWED) overrides
    default_session_config() entry by entry."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: graph-cleanup notices would flood journald at start-up
    # On x86 CPUs without VNNI the fast u8*s8 kernels saturate their int16 accumulators and INT8 graphs
    # come out wrong (vision feature cosine to FP32 0.77 for the TensorRT layout, 0.96 for the CPU layout
    # on an AVX2 machine); x64quantprecision 1 selects the exact path. ONNX Runtime applies it wherever its
    # u8u8 and u8s8 GEMM dispatches differ (MlasPlatformU8S8Overflow): every x86 CPU with AVX2, VNNI
    # included, where it only halves the speed: so it is set by the CPU (default_session_config).
    for key, value in {**default_session_config(), **(config or {})}.items():
        options.add_session_config_entry(key, value)
    return options


def _spec_from_ort(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


class OnnxRuntimeBackend(InferenceBackend):
    def __init__(
        self,
        model_path: str | Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch: int = 1,
        device: str = "cpu",
        threads: int = 0,
        precision: str = "fp32",
        session_config: dict[str, str] | None = None,
    ):
        if device not in ("cpu", "cuda"):
            raise BackendError(f"onnxruntime device must be 'cpu' or 'cuda', got {device!r}")
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        self.model_path = Path(model_path)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch = max_batch
        self.device = device
        self.threads = threads
        self.precision = precision
        self.session_config = dict(session_config or {})
        self._session = None
        self._binding = None
        self._host: dict[str, np.ndarray] = {}
        self._views: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        self._timing = RunTiming()
        self._bound_batch = 0

    def activate(self) -> None:
        if self._session is not None:
            return
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        if not self.model_path.is_file():
            raise BackendError(f"graph {self.model_path} is missing; rebuild the bundle with build-engines")
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    "onnxruntime has no CUDA execution provider here: install onnxruntime-gpu "
                    "(pip install '.[gpu]') or set backend device to cpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        options = session_options(ort, self.threads, self.session_config)
        try:
            self._session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types, not exported uniformly
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {exc}") from exc
        source = f"graph {self.model_path.name}"
        fix = "The bundle and the graph disagree: rebuild the bundle with build-engines."
        check_io("input", self.inputs, tuple(_spec_from_ort(a) for a in self._session.get_inputs()), source, fix)
        check_io("output", self.outputs, tuple(_spec_from_ort(a) for a in self._session.get_outputs()), source, fix)
        for spec in (*self.inputs, *self.outputs):
            self._host[spec.name] = np.zeros(spec.max_shape(self.max_batch), dtype=spec.dtype)
        # Views per batch size are made once: run() then only looks them up.
        for batch in range(1, self.max_batch + 1):
            ins = {s.name: self._host[s.name][:batch] if s.dynamic else self._host[s.name] for s in self.inputs}
            outs = {s.name: self._host[s.name][:batch] if s.dynamic else self._host[s.name] for s in self.outputs}
            self._views[batch] = (ins, outs)
        self._binding = self._session.io_binding()
        logger.info("activated %s on onnxruntime %s (max batch %d)", self.model_path.name, self.device,
                    self.max_batch)

    def _bind(self, batch: int) -> None:
        ins, outs = self._views[batch]
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in ins.items():
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in outs.items():
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self._bound_batch = batch

    def input(self, name: str) -> np.ndarray:
        self._require_active()
        if name not in self._views[1][0]:
            raise BackendError(
                f"{self.model_path.name} has no input {name!r}; inputs are {[s.name for s in self.inputs]}"
            )
        return self._host[name]

    def run(self, batch: int = 1) -> dict[str, np.ndarray]:
        self._require_active()
        self._check_batch(batch)
        if batch != self._bound_batch:
            self._bind(batch)
        started = time.perf_counter()
        self._session.run_with_iobinding(self._binding)
        self._timing.compute_ms = (time.perf_counter() - started) * 1e3
        return self._views[batch][1]

    @property
    def last_timing(self) -> RunTiming:
        return self._timing

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("onnxruntime", self.device, self.precision,
                           {"graph": self.model_path.name, **self.session_config})

    def close(self) -> None:
        self._binding = None
        self._session = None
        self._views.clear()
        self._host.clear()

    def _require_active(self) -> None:
        if self._session is None:
            raise BackendError(f"backend for {self.model_path.name} is not active: call activate() first")
