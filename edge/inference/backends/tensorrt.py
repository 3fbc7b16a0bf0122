"""TensorRT backend: a thin adapter that maps named tensors to device buffers and runs the engine on a
CUDA stream (TensorRT 10 and 11 Python API, cuda-python for memory, streams and events).

activate(), once: check the engine's cache key against this TensorRT version and GPU and the bundle
(refusing with the command that rebuilds it), deserialize, check the IO names, dtypes and shapes
against what the bundle declares, create one execution context and one stream, allocate a pinned host
buffer and a device buffer at the maximum shape for every IO tensor and bind each device address once.

run(batch), many times, allocating nothing: set the dynamic input shapes only when the batch changed,
then on the stream: copy the bytes the batch needs host -> device, execute_async_v3, copy device ->
host, one synchronise; events between the stages give the RunTiming.

Optional (``cuda_graph_batch``): for the fixed Monte-Carlo sample count the whole run (copies and
engine) is captured once as a CUDA graph and replayed with one launch, which removes the per-kernel
launch overhead (docs/architecture.md, "Decisions: 5. TensorRT is a thin adapter"). A run at another
batch size drops the graph for good (with a warning) and continues on the ordinary path, since TensorRT's state then no longer matches what was
captured. If capture is not possible for this engine the backend logs why and keeps the ordinary path.

TensorRT is imported lazily: on a Jetson it comes with JetPack into the system site-packages.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge.errors import BackendError, BundleError, CudaError
from edge.inference import cuda
from edge.inference.backends.base import BackendInfo, InferenceBackend, RunTiming, TensorSpec, check_io
from edge.inference.engine_key import REBUILD_COMMAND, EngineKey, key_path

logger = logging.getLogger(__name__)

TENSORRT_HINT = (
    "TensorRT's Python bindings are not importable: on a Jetson they come with JetPack "
    "(apt install python3-libnvinfer); create the robot's virtualenv with --system-site-packages to see "
    "them, or run inside the Jetson container"
)
_REBUILD = f"rebuild the engines on this device: {REBUILD_COMMAND}"
# TensorRT 8.6 (JetPack 6.0) is refused rather than supported through EXPLICIT_BATCH: its ONNX parser lacks
# importers and Q/DQ rules the bundle's graphs rely on, and it has no strongly typed networks; JetPack 6.1
# and 6.2 ship TensorRT 10.3 (docs/deployment.md).
MIN_TENSORRT = (10, 0)


def tensorrt_version_problem(version: str) -> str | None:
    """None when this TensorRT can build and run the bundle's engines, else the line that says why not."""
    try:
        major_minor = tuple(int(part) for part in str(version).split(".")[:2])
    except ValueError:
        return f"cannot read the TensorRT version {version!r}"
    if major_minor < MIN_TENSORRT:
        return (f"TensorRT {version} is too old: vla-edge needs TensorRT 10 or newer; on a Jetson, flash "
                "JetPack 6.1+ (it ships TensorRT 10.3)")
    return None


def load_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(TENSORRT_HINT) from exc
    return tensorrt


_LOGGERS: dict[int, tuple[Any, Any]] = {}
_LOGGERS_LOCK = threading.Lock()


def tensorrt_logger(trt: Any) -> Any:
    """The process's one ``trt.ILogger``: forwards to Python logging and keeps recent errors for messages.

    One per process because TensorRT keeps the first logger it is given as its global logger (and warns
    when a builder or runtime brings another).
    """
    with _LOGGERS_LOCK:
        entry = _LOGGERS.get(id(trt))
        if entry is None:
            entry = (trt, _make_logger(trt))  # the module is kept so that its id stays unique
            _LOGGERS[id(trt)] = entry
        return entry[1]


def _make_logger(trt: Any, keep: int = 50) -> Any:
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,  # TensorRT's INFO is build chatter; keep the journal readable
        severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 requires the base __init__ when overriding it
            self._errors: deque[tuple[int, str]] = deque(maxlen=keep)
            self._count = 0

        def log(self, level: Any, msg: str) -> None:
            python_level = levels.get(level, logging.WARNING)
            if python_level >= logging.ERROR:
                self._count += 1  # TensorRT may log from its own threads; the deque append is atomic
                self._errors.append((self._count, msg))
            logger.log(python_level, "TensorRT: %s", msg)

        def mark(self) -> int:
            """A point in the error log; errors_since(mark) gives what TensorRT reported after it."""
            return self._count

        def errors_since(self, mark: int, most: int = 5) -> str:
            errors = [msg for number, msg in list(self._errors) if number > mark][-most:]
            return " | ".join(errors) if errors else "TensorRT logged no error"

    return _Logger()


def numpy_dtype_name(trt: Any, dtype: Any) -> str:
    """``"float32"`` for trt.DataType.FLOAT; TensorRT's own name for types numpy lacks (BF16, FP8)."""
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:
        return f"tensorrt.{getattr(dtype, 'name', dtype)}"


def engine_io(trt: Any, engine: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The engine's inputs and outputs as TensorSpecs (-1 marks a dynamic dimension)."""
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        spec = TensorSpec(name, numpy_dtype_name(trt, engine.get_tensor_dtype(name)),
                          tuple(int(d) for d in engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return tuple(inputs), tuple(outputs)


class _Binding:
    """One IO tensor: its pinned host buffer, its device buffer and the bytes one batch row takes."""

    def __init__(self, spec: TensorSpec, max_batch: int, cudart: Any):
        self.spec = spec
        shape = spec.max_shape(max_batch)
        self.host = cuda.PinnedBuffer(shape, spec.dtype, cudart=cudart)
        self.device = cuda.DeviceBuffer(self.host.nbytes, cudart=cudart)
        self.row_nbytes = self.host.nbytes // max_batch if spec.dynamic else self.host.nbytes

    def nbytes(self, batch: int) -> int:
        return self.row_nbytes * batch if self.spec.dynamic else self.host.nbytes

    def view(self, batch: int) -> np.ndarray:
        return self.host.array[:batch] if self.spec.dynamic else self.host.array

    def close(self) -> None:
        self.device.free()
        self.host.close()


class TensorRTBackend(InferenceBackend):
    def __init__(
        self,
        engine_path: str | Path,
        expected_key: EngineKey | None,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch: int = 1,
        trt: Any = None,
        cudart: Any = None,
        *,
        cuda_graph_batch: int | None = None,
    ):
        """`expected_key`: what the bundle requires (source graph hash and precision; its TensorRT version
        and compute capability are those recorded at build time). None skips the bundle check and only
        compares the engine's key file, if there is one, with this device."""
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        if cuda_graph_batch is not None and not 1 <= cuda_graph_batch <= max_batch:
            raise BackendError(f"cuda_graph_batch {cuda_graph_batch} is outside 1..{max_batch}")
        self.engine_path = Path(engine_path)
        self.expected_key = expected_key
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.max_batch = max_batch
        self.cuda_graph_batch = cuda_graph_batch
        self._trt_module = trt
        self._cudart_module = cudart
        self._trt: Any = None
        self._rt: Any = None
        self._logger: Any = None
        self._log_mark = 0
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: cuda.Stream | None = None
        self._events: list[cuda.Event] = []
        self._bindings: dict[str, _Binding] = {}
        self._inputs: list[_Binding] = []
        self._outputs: list[_Binding] = []
        self._views: dict[int, dict[str, np.ndarray]] = {}
        self._graph: cuda.CudaGraph | None = None
        self._bound_batch = 0
        self._timing = RunTiming()
        self._details: dict[str, Any] = {}

    # ---- activation ----

    def activate(self) -> None:
        if self._context is not None:
            return
        try:
            self._activate()
        except BaseException:
            try:
                self._release()
            except CudaError as cleanup:  # keep the activation error, which says what went wrong first
                logger.error("cleaning up after the failed activation of %s: %s", self.engine_path.name, cleanup)
            raise

    def _activate(self) -> None:
        self._trt = self._trt_module if self._trt_module is not None else load_tensorrt()
        self._rt = self._cudart_module if self._cudart_module is not None else cuda.load_runtime()
        trt, rt = self._trt, self._rt
        too_old = tensorrt_version_problem(str(trt.__version__))
        if too_old:
            raise BackendError(too_old)
        if not self.engine_path.is_file():
            raise BundleError(f"engine {self.engine_path} is missing; {_REBUILD}")
        compute_capability = cuda.device_compute_capability(cudart=rt)
        self._check_key(trt.__version__, compute_capability, cuda.device_name(cudart=rt),
                        str(cuda.device_multiprocessors(cudart=rt)))

        self._logger = tensorrt_logger(trt)
        self._log_mark = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} cannot load engine {self.engine_path} "
                f"({self._trt_errors()}); {_REBUILD}"
            )
        self._check_io()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(
                f"TensorRT could not create an execution context for {self.engine_path.name} "
                f"({self._trt_errors()}); is GPU memory exhausted by another process?"
            )

        self._stream = cuda.Stream(cudart=rt)
        # Four marks: start, inputs copied, engine done, outputs copied.
        self._events = [cuda.Event(cudart=rt) for _ in range(4)]
        for spec in (*self.inputs, *self.outputs):
            binding = _Binding(spec, self.max_batch, rt)
            self._bindings[spec.name] = binding
            if not self._context.set_tensor_address(spec.name, binding.device.ptr):
                raise BackendError(
                    f"TensorRT refused the device address of {spec.name} ({self._trt_errors()})"
                )
        self._inputs = [self._bindings[s.name] for s in self.inputs]
        self._outputs = [self._bindings[s.name] for s in self.outputs]
        for batch in range(1, self.max_batch + 1):
            self._views[batch] = {b.spec.name: b.view(batch) for b in self._outputs}
        self._details = {
            "engine": self.engine_path.name,
            "tensorrt_version": trt.__version__,
            "compute_capability": compute_capability,
            "device_name": cuda.device_name(cudart=rt),
            "cuda_graph_batch": None,
        }
        if self.cuda_graph_batch is not None:
            self._capture_graph(self.cuda_graph_batch)
        logger.info(
            "activated %s on TensorRT %s, GPU sm %s (max batch %d%s)", self.engine_path.name, trt.__version__,
            compute_capability, self.max_batch,
            f", CUDA graph at batch {self.cuda_graph_batch}" if self._graph is not None else "",
        )

    def _check_key(self, tensorrt_version: str, compute_capability: str, gpu_name: str,
                   multiprocessors: str) -> None:
        sidecar = key_path(self.engine_path)
        built = EngineKey.load(sidecar) if sidecar.is_file() else None
        if built is None and self.expected_key is None:
            logger.warning("engine %s has no key file (%s) and no expected key was given: not checked against "
                           "this device", self.engine_path.name, sidecar.name)
            return
        engine_key = built if built is not None else self.expected_key
        reference = self.expected_key if self.expected_key is not None else built
        required = replace(reference, tensorrt_version=tensorrt_version, compute_capability=compute_capability,
                           gpu_name=gpu_name, multiprocessors=multiprocessors)
        problems = engine_key.mismatch(required)
        if problems:
            raise BundleError(
                f"engine {self.engine_path} does not fit this device and bundle: {'; '.join(problems)}. "
                f"TensorRT engines run only on the TensorRT version and GPU that built them; {_REBUILD}"
            )

    def _check_io(self) -> None:
        engine_inputs, engine_outputs = engine_io(self._trt, self._engine)
        source = f"engine {self.engine_path.name}"
        fix = f"The engine and the bundle disagree: {_REBUILD}"
        check_io("input", self.inputs, engine_inputs, source, fix)
        check_io("output", self.outputs, engine_outputs, source, fix)
        for spec in (*engine_inputs, *engine_outputs):
            if -1 in spec.shape[1:]:
                raise BackendError(f"{source}: {spec.name} has a dynamic dimension other than the first "
                                   f"{list(spec.shape)}; only the leading (batch) dimension may vary. {fix}")
        for spec in engine_inputs:
            if not spec.dynamic:
                continue
            low, _, high = self._engine.get_tensor_profile_shape(spec.name, 0)
            if int(low[0]) > 1 or int(high[0]) < self.max_batch:
                raise BackendError(
                    f"{source}: {spec.name} accepts batch {int(low[0])}..{int(high[0])} but the bundle needs "
                    f"1..{self.max_batch}. {fix}"
                )

    def _capture_graph(self, batch: int) -> None:
        """Record the whole run for `batch` as a CUDA graph; keep the ordinary path if that fails."""
        # TensorRT defers some work after a shape change to the next enqueue: run once uncaptured first.
        self.run(batch)
        stream = self._stream
        try:
            stream.begin_capture()
        except CudaError as exc:
            logger.warning("no CUDA graph for %s: %s", self.engine_path.name, exc)
            return
        enqueued = False
        try:
            self._enqueue_copies_in(batch)
            enqueued = bool(self._context.execute_async_v3(stream.handle))
            self._enqueue_copies_out(batch)
        finally:
            # Always end the capture, or the stream stays unusable; owning the graph lets close() free it.
            try:
                self._graph = stream.end_capture()
            except CudaError as exc:
                logger.warning("no CUDA graph for %s: capture failed: %s", self.engine_path.name, exc)
        if self._graph is not None and not enqueued:
            graph, self._graph = self._graph, None
            graph.close()
            logger.warning("no CUDA graph for %s: TensorRT could not enqueue during capture (%s)",
                           self.engine_path.name, self._trt_errors())
        if self._graph is not None:
            self._details["cuda_graph_batch"] = batch

    # ---- hot path ----

    def input(self, name: str) -> np.ndarray:
        self._require_active()
        binding = self._bindings.get(name)
        if binding is None or binding not in self._inputs:
            raise BackendError(
                f"{self.engine_path.name} has no input {name!r}; inputs are {[s.name for s in self.inputs]}"
            )
        return binding.host.array

    def run(self, batch: int = 1) -> dict[str, np.ndarray]:
        self._require_active()
        self._check_batch(batch)
        if batch != self._bound_batch:
            self._set_batch(batch)
        stream, (start, copied_in, computed, copied_out) = self._stream, self._events
        if self._graph is not None and batch != self.cuda_graph_batch:
            self._drop_graph(batch)
        if self._graph is not None:
            start.record(stream)
            self._graph.launch(stream)
            copied_out.record(stream)
            stream.synchronize()
            # The graph runs as one unit; its time is reported as compute.
            self._timing.host_to_device_ms = 0.0
            self._timing.compute_ms = start.elapsed_ms(copied_out)
            self._timing.device_to_host_ms = 0.0
            return self._views[batch]
        start.record(stream)
        self._enqueue_copies_in(batch)
        copied_in.record(stream)
        if not self._context.execute_async_v3(stream.handle):
            stream.synchronize()  # the copies already queued still use the buffers
            raise BackendError(
                f"TensorRT could not run {self.engine_path.name} ({self._trt_errors()})"
            )
        computed.record(stream)
        self._enqueue_copies_out(batch)
        copied_out.record(stream)
        stream.synchronize()
        self._timing.host_to_device_ms = start.elapsed_ms(copied_in)
        self._timing.compute_ms = copied_in.elapsed_ms(computed)
        self._timing.device_to_host_ms = computed.elapsed_ms(copied_out)
        return self._views[batch]

    def _drop_graph(self, batch: int) -> None:
        # The graph replays what TensorRT enqueued for the captured shapes; once the context has run
        # other shapes, TensorRT's own state may no longer match it, so it is not replayed again.
        logger.warning("%s: run at batch %d, the CUDA graph was captured at batch %d: dropping the graph",
                       self.engine_path.name, batch, self.cuda_graph_batch)
        graph, self._graph = self._graph, None
        self._details["cuda_graph_batch"] = None
        graph.close()

    def _enqueue_copies_in(self, batch: int) -> None:
        for binding in self._inputs:
            cuda.copy_htod_async(binding.device, binding.host, self._stream, binding.nbytes(batch))

    def _enqueue_copies_out(self, batch: int) -> None:
        for binding in self._outputs:
            cuda.copy_dtoh_async(binding.host, binding.device, self._stream, binding.nbytes(batch))

    def _set_batch(self, batch: int) -> None:
        """Tell TensorRT the new shapes of the dynamic inputs (only when the batch changes)."""
        for binding in self._inputs:
            spec = binding.spec
            if spec.dynamic and not self._context.set_input_shape(spec.name, (batch, *spec.shape[1:])):
                raise BackendError(
                    f"TensorRT refused batch {batch} for {spec.name} ({self._trt_errors()})"
                )
        for binding in self._outputs:
            expected = binding.view(batch).shape
            actual = tuple(int(d) for d in self._context.get_tensor_shape(binding.spec.name))
            if actual != expected:
                raise BackendError(
                    f"engine {self.engine_path.name}: output {binding.spec.name} would be {list(actual)} at batch "
                    f"{batch}, the bundle expects {list(expected)}; {_REBUILD}"
                )
        self._bound_batch = batch

    # ---- reporting and teardown ----

    @property
    def last_timing(self) -> RunTiming:
        return self._timing

    @property
    def info(self) -> BackendInfo:
        precision = self.expected_key.precision if self.expected_key is not None else "unknown"
        device = f"cuda (sm {self._details['compute_capability']})" if self._details else "cuda"
        return BackendInfo("tensorrt", device, precision, dict(self._details))

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        """Free everything activate() made, in reverse order; raise the first CUDA error at the end."""
        first_error: CudaError | None = None
        if self._stream is not None and not self._stream.closed:
            try:
                self._stream.synchronize()  # queued copies may still be using the buffers
            except CudaError as exc:
                logger.error("while closing %s: %s", self.engine_path.name, exc)
                first_error = exc
        resources: list[Any] = []
        if self._graph is not None:
            resources.append(self._graph)
        resources += [*self._bindings.values(), *self._events]
        if self._stream is not None:
            resources.append(self._stream)
        for resource in resources:
            try:
                resource.close()
            except CudaError as exc:
                logger.error("while closing %s: %s", self.engine_path.name, exc)
                first_error = first_error or exc
        self._graph = None
        self._bindings.clear()
        self._inputs, self._outputs, self._events = [], [], []
        self._views.clear()
        self._stream = None
        # TensorRT objects go in dependency order: context, engine, runtime.
        self._context = None
        self._engine = None
        self._runtime = None
        self._bound_batch = 0
        if first_error is not None:
            raise first_error

    def _trt_errors(self) -> str:
        return self._logger.errors_since(self._log_mark)

    def _require_active(self) -> None:
        if self._context is None:
            raise BackendError(f"backend for {self.engine_path.name} is not active: call activate() first")
