"""A small layer over cuda-python's CUDA runtime bindings: streams, events, pinned and device memory,
async copies and CUDA graphs, each call checked.

cuda-python returns a tuple from every call, ``(err, *values)``; ``check`` turns a failed one into a
CudaError that names the call and the CUDA error (``cudaErrorMemoryAllocation``), so an operator sees
what failed instead of a crash far from the cause. Objects here own what they allocate and free it in
``close()`` (they are context managers); nothing is freed in ``__del__``, where the CUDA context may
already be gone at interpreter exit.

The runtime module is imported lazily (``cuda.bindings.runtime``, or ``cuda.cudart`` from cuda-python
before 12.6), and every function and class takes ``cudart=`` so tests can hand in a fake.
"""

from __future__ import annotations

import ctypes
import logging
import math
from types import ModuleType
from typing import Any

import numpy as np

from edge.errors import BackendError, CudaError

logger = logging.getLogger(__name__)

# 12.9.1 is the first release that releases the GIL during CUDA calls (cuda-bindings release notes, which
# also deprecate int(obj) for get_cuda_native_handle); before it a cudaStreamSynchronize stalls the
# camera and serial threads for a whole inference. docs/deployment.md.
CUDA_PYTHON_REQUIREMENT = "cuda-python>=12.9.1,<13"
INSTALL_HINT = (
    f"pip install '{CUDA_PYTHON_REQUIREMENT}' (major version 12 for the CUDA 12 of JetPack 6; see "
    "docs/deployment.md)"
)

# What an operator can do about the errors seen on a robot; the CUDA name alone rarely says it.
# cudaErrorInsufficientDriver (35) is what cuda-python returns when no driver is loaded at all, most often a
# container started without the NVIDIA runtime; cudaErrorNoDevice (100) when a driver runs but sees no GPU.
_ERROR_HINTS = {
    "cudaErrorInsufficientDriver": "no usable NVIDIA driver: in a container, start it with the NVIDIA runtime "
    "(docker run --runtime nvidia, or --gpus all); on the robot, check that the driver is loaded "
    "(`ls /dev/nvhost-* /dev/nvidia*`, `tegrastats`); if a driver is there, it is older than the CUDA this "
    f"cuda-python was built for: {INSTALL_HINT}",
    "cudaErrorNoDevice": "no CUDA GPU is visible although the NVIDIA driver is loaded: check CUDA_VISIBLE_DEVICES, "
    "that this user is in the 'video'/'render' groups, and `nvidia-smi` or `tegrastats`",
    "cudaErrorMemoryAllocation": "out of GPU or pinned memory: lower max_batch or stop other GPU processes",
    "cudaErrorIllegalAddress": "a kernel touched memory it does not own; the CUDA context is now unusable, "
    "restart the service",
}


def load_runtime() -> ModuleType:
    """The CUDA runtime bindings of cuda-python; BackendError naming the install command when absent."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        logger.debug("cuda.bindings.runtime not found, trying the pre-12.6 module cuda.cudart")
    try:
        from cuda import cudart

        return cudart
    except ImportError as exc:
        raise BackendError(f"cuda-python is not installed: {INSTALL_HINT}") from exc


def error_name(err: Any, cudart: Any = None) -> str:
    """``cudaErrorMemoryAllocation`` for an error value, through cudaGetErrorName where available."""
    if cudart is not None and hasattr(cudart, "cudaGetErrorName"):
        result = cudart.cudaGetErrorName(err)
        if int(result[0]) == 0 and result[1]:
            name = result[1]
            return name.decode() if isinstance(name, bytes) else str(name)
    return str(getattr(err, "name", err))


def check(result: tuple, call: str, cudart: Any = None) -> Any:
    """Unpack ``(err, *values)``: raise CudaError naming `call` and the error, else return the values
    (None for none, the value for one, a tuple for several)."""
    err = result[0]
    if int(err) != 0:  # cudaSuccess is 0 in every CUDA version
        name = error_name(err, cudart)
        hint = _ERROR_HINTS.get(name)
        raise CudaError(f"CUDA call {call} failed with {name}" + (f": {hint}" if hint else ""))
    if len(result) == 1:
        return None
    if len(result) == 2:
        return result[1]
    return tuple(result[1:])


def _call(cudart: Any, name: str, *args: Any) -> Any:
    return check(getattr(cudart, name)(*args), name, cudart)


def device_count(*, cudart: Any = None) -> int:
    rt = cudart if cudart is not None else load_runtime()
    return int(_call(rt, "cudaGetDeviceCount"))


def current_device(*, cudart: Any = None) -> int:
    rt = cudart if cudart is not None else load_runtime()
    return int(_call(rt, "cudaGetDevice"))


def device_compute_capability(device: int | None = None, *, cudart: Any = None) -> str:
    """``"8.7"`` for a Jetson Orin: the GPU generation that TensorRT engines are tied to."""
    rt = cudart if cudart is not None else load_runtime()
    index = current_device(cudart=rt) if device is None else device
    props = _call(rt, "cudaGetDeviceProperties", index)
    return f"{int(props.major)}.{int(props.minor)}"


def device_name(device: int | None = None, *, cudart: Any = None) -> str:
    rt = cudart if cudart is not None else load_runtime()
    index = current_device(cudart=rt) if device is None else device
    name = _call(rt, "cudaGetDeviceProperties", index).name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name)


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python handle (stream, event): ``cuda.bindings.utils.
    get_cuda_native_handle`` where present (cuda-bindings 12.9.1+, where ``int(obj)`` is deprecated),
    else ``int(obj)``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except TypeError:  # not a cuda-python object (a fake handed in through cudart=)
        return int(obj)


def device_multiprocessors(device: int | None = None, *, cudart: Any = None) -> int:
    """cudaDeviceProp.multiProcessorCount: tells GPUs of one compute capability apart (Orin Nano, AGX Orin)."""
    rt = cudart if cudart is not None else load_runtime()
    index = current_device(cudart=rt) if device is None else device
    return int(_call(rt, "cudaGetDeviceProperties", index).multiProcessorCount)


class Stream:
    """A CUDA stream; non-blocking by default so it never serialises with the legacy default stream."""

    def __init__(self, *, non_blocking: bool = True, cudart: Any = None):
        self._rt = cudart if cudart is not None else load_runtime()
        flags = self._rt.cudaStreamNonBlocking if non_blocking else self._rt.cudaStreamDefault
        self._stream = _call(self._rt, "cudaStreamCreateWithFlags", flags)
        # TensorRT's execute_async_v3 takes the stream as a plain integer handle.
        self.handle = native_handle(self._stream)

    @property
    def raw(self) -> Any:
        """The cuda-python stream object, for calls this module does not wrap."""
        self._require_open()
        return self._stream

    @property
    def runtime(self) -> Any:
        return self._rt

    @property
    def closed(self) -> bool:
        return self._stream is None

    def synchronize(self) -> None:
        self._require_open()
        _call(self._rt, "cudaStreamSynchronize", self._stream)

    def begin_capture(self) -> None:
        """Start recording this stream's work into a CUDA graph instead of running it.

        Thread-local mode: other threads of the process (camera, serial) may keep making CUDA calls
        that would otherwise invalidate a global-mode capture.
        """
        self._require_open()
        mode = self._rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _call(self._rt, "cudaStreamBeginCapture", self._stream, mode)

    def end_capture(self) -> CudaGraph:
        """Stop recording and instantiate what was recorded; always ends the capture, even on error."""
        self._require_open()
        graph = _call(self._rt, "cudaStreamEndCapture", self._stream)
        try:
            graph_exec = _call(self._rt, "cudaGraphInstantiate", graph, 0)
        except CudaError:
            _call(self._rt, "cudaGraphDestroy", graph)
            raise
        return CudaGraph(graph, graph_exec, self._rt)

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            _call(self._rt, "cudaStreamDestroy", stream)

    def _require_open(self) -> None:
        if self._stream is None:
            raise BackendError("CUDA stream is closed")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CudaGraph:
    """An instantiated CUDA graph: replaying it launches all its recorded work with one call."""

    def __init__(self, graph: Any, graph_exec: Any, cudart: Any):
        self._rt = cudart
        self._graph = graph
        self._exec = graph_exec

    def launch(self, stream: Stream) -> None:
        if self._exec is None:
            raise BackendError("CUDA graph is closed")
        _call(self._rt, "cudaGraphLaunch", self._exec, stream.raw)

    def close(self) -> None:
        if self._exec is not None:
            graph_exec, self._exec = self._exec, None
            _call(self._rt, "cudaGraphExecDestroy", graph_exec)
        if self._graph is not None:
            graph, self._graph = self._graph, None
            _call(self._rt, "cudaGraphDestroy", graph)

    def __enter__(self) -> CudaGraph:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Event:
    """A CUDA event: recorded on a stream, it marks when the GPU got there (for timing stages)."""

    def __init__(self, *, cudart: Any = None):
        self._rt = cudart if cudart is not None else load_runtime()
        self._event = _call(self._rt, "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        if self._event is None:
            raise BackendError("CUDA event is closed")
        _call(self._rt, "cudaEventRecord", self._event, stream.raw)

    def synchronize(self) -> None:
        _call(self._rt, "cudaEventSynchronize", self._event)

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds of GPU time from this event to `end` (both recorded and completed)."""
        return float(_call(self._rt, "cudaEventElapsedTime", self._event, end._event))

    def close(self) -> None:
        if self._event is not None:
            event, self._event = self._event, None
            _call(self._rt, "cudaEventDestroy", event)

    def __enter__(self) -> Event:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PinnedBuffer:
    """Page-locked host memory with a numpy view over it: the GPU copies from and to it asynchronously.

    The view (``array``) points into memory freed by ``close()``; do not keep it past that.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, *, cudart: Any = None):
        self._rt = cudart if cudart is not None else load_runtime()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        count = math.prod(self.shape)
        self.nbytes = count * self.dtype.itemsize
        size = max(self.nbytes, 1)  # a zero-byte allocation is an error in CUDA
        if hasattr(self._rt, "cudaHostAlloc"):
            self.ptr = int(_call(self._rt, "cudaHostAlloc", size, self._rt.cudaHostAllocDefault))
        else:
            self.ptr = int(_call(self._rt, "cudaMallocHost", size))
        raw = (ctypes.c_uint8 * size).from_address(self.ptr)
        self.array: np.ndarray | None = np.frombuffer(raw, dtype=self.dtype, count=count).reshape(self.shape)

    def close(self) -> None:
        if self.array is not None:
            self.array = None
            _call(self._rt, "cudaFreeHost", self.ptr)

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DeviceBuffer:
    """GPU memory of `nbytes` bytes at device address ``ptr``."""

    def __init__(self, nbytes: int, *, cudart: Any = None):
        self._rt = cudart if cudart is not None else load_runtime()
        self.nbytes = int(nbytes)
        self.ptr: int | None = int(_call(self._rt, "cudaMalloc", max(self.nbytes, 1)))

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            _call(self._rt, "cudaFree", ptr)

    close = free

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()


def _checked_size(nbytes: int | None, *limits: int) -> int:
    size = min(limits) if nbytes is None else int(nbytes)
    if not 0 <= size <= min(limits):
        raise BackendError(f"copy of {size} bytes does not fit buffers of {min(limits)} bytes")
    return size


def copy_htod_async(dst: DeviceBuffer, src: PinnedBuffer, stream: Stream, nbytes: int | None = None) -> None:
    """Queue a host-to-device copy of `nbytes` (default: all that fits) on `stream`."""
    size = _checked_size(nbytes, dst.nbytes, src.nbytes)
    rt = stream.runtime
    _call(rt, "cudaMemcpyAsync", dst.ptr, src.ptr, size, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw)


def copy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, stream: Stream, nbytes: int | None = None) -> None:
    """Queue a device-to-host copy of `nbytes` (default: all that fits) on `stream`."""
    size = _checked_size(nbytes, dst.nbytes, src.nbytes)
    rt = stream.runtime
    _call(rt, "cudaMemcpyAsync", dst.ptr, src.ptr, size, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw)
