"""A faithful fake of the part of cuda-python's ``cuda.bindings.runtime`` that edge/inference/cuda.py uses.

Same calling convention as the real bindings: every call returns a tuple ``(cudaError_t, *values)``;
error names and numbers are CUDA's own (checked against the real module by a test where cuda-python is
installed). Device memory is host memory from ctypes, so copies are real ``memmove``s, but they are
*asynchronous* like on a GPU: work queued on a stream (copies, event records, kernels enqueued by the
fake TensorRT) runs only when the stream is synchronised, in order. Code that reads an output before
synchronising therefore reads stale bytes here, as it would on a Jetson.

Time is virtual: every queued operation advances a clock by a fixed cost, so event timings are
deterministic. A test can make the next call(s) of a function fail with an error of its choice
(``fail``), and can count calls (``calls``) to prove that nothing is allocated in a hot loop.
Kernel faults (a bad device address) are sticky, as on a GPU: every later call returns the error.
"""

from __future__ import annotations

import ctypes
import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - the real enum's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInitializationError = 3
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureImplicit = 906
    cudaErrorStreamCaptureWrongThread = 908
    cudaErrorUnknown = 999


_ERROR_STRINGS = {
    cudaError_t.cudaSuccess: "no error",
    cudaError_t.cudaErrorInvalidValue: "invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: "out of memory",
    cudaError_t.cudaErrorNoDevice: "no CUDA-capable device is detected",
    cudaError_t.cudaErrorInsufficientDriver: "CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorIllegalAddress: "an illegal memory access was encountered",
}


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """cudaStream_t / cudaEvent_t / cudaGraph_t / cudaGraphExec_t: an opaque pointer that int() reads."""

    def __init__(self, address: int = 0):
        self._address = int(address)

    def __int__(self) -> int:
        return self._address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and int(other) == self._address

    def __hash__(self) -> int:
        return hash(self._address)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._address:#x}>"


class cudaStream_t(_Handle):  # noqa: N801
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    pass


class cudaGraph_t(_Handle):  # noqa: N801
    pass


class cudaGraphExec_t(_Handle):  # noqa: N801
    pass


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int = 8 << 30  # noqa: N815 - the real field's name
    integrated: int = 1
    multiProcessorCount: int = 16  # noqa: N815 - the real field's name (cudaDeviceProp)


class FakeCudaFault(Exception):
    """Raised inside queued work when a kernel or copy would fault on a GPU; becomes a sticky error."""

    def __init__(self, error: cudaError_t, what: str):
        super().__init__(f"{error.name}: {what}")
        self.error = error


@dataclass
class _Op:
    label: str
    cost_ms: float
    run: Callable[[], None]


@dataclass
class _Stream:
    pending: list[_Op] = field(default_factory=list)
    capture: list[_Op] | None = None  # not None while the stream is being captured into a graph
    capture_invalidated: bool = False


@dataclass
class _EventState:
    recorded: bool = False
    completed: bool = False
    time_ms: float = 0.0


COPY_OVERHEAD_MS = 0.005
COPY_BYTES_PER_MS = 1e7  # 10 GB/s
KERNEL_COST_MS = 0.1


class FakeCudaRuntime:
    """Stands in for the module ``cuda.bindings.runtime``: pass it as ``cudart=``."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStream_t = cudaStream_t
    cudaEvent_t = cudaEvent_t
    cudaGraph_t = cudaGraph_t
    cudaGraphExec_t = cudaGraphExec_t
    cudaDeviceProp = cudaDeviceProp
    cudaStreamDefault = 0
    cudaStreamNonBlocking = 1
    cudaHostAllocDefault = 0
    cudaHostAllocPortable = 1
    cudaHostAllocMapped = 2
    cudaHostAllocWriteCombined = 4
    cudaEventDefault = 0

    def __init__(self, compute_capability: tuple[int, int] = (8, 7), device_count: int = 1,
                 name: str = "Orin (fake)", *, driver: bool = True, multiprocessors: int = 16):
        self.compute_capability = compute_capability
        self.device_count = device_count
        self.device_name = name
        self.multiprocessors = multiprocessors
        # driver=False: no libcuda at all (a container started without the NVIDIA runtime). The CUDA runtime
        # then fails every call with cudaErrorInsufficientDriver (35), not cudaErrorNoDevice (100), which needs
        # a driver that sees no GPU (device_count=0): NVIDIA/nvidia-docker issue 24 ("cudaGetDeviceCount
        # returned 35" in a container without the driver mounted) and the CUDA runtime API's error docs.
        self.driver = driver
        self.calls: Counter[str] = Counter()
        self.clock_ms = 0.0
        self.pageable_copies = 0  # async copies from/to memory that was not pinned (silently synchronous)
        self._failures: dict[str, list[cudaError_t]] = {}
        self._sticky: cudaError_t | None = None
        self._host: dict[int, ctypes.Array] = {}
        self._device: dict[int, ctypes.Array] = {}
        self._streams: dict[int, _Stream] = {}
        self._events: dict[int, _EventState] = {}
        self._graphs: dict[int, list[_Op]] = {}
        self._graph_execs: dict[int, list[_Op]] = {}
        self._next_handle = 0x1000

    # ---- test controls (not part of the CUDA API) ----

    def fail(self, call: str, error: cudaError_t, times: int = 1) -> None:
        """Make the next `times` calls of function `call` return `error` without doing anything."""
        self._failures.setdefault(call, []).extend([error] * times)

    def live_allocations(self) -> dict[str, int]:
        return {"host": len(self._host), "device": len(self._device), "streams": len(self._streams),
                "events": len(self._events), "graph_execs": len(self._graph_execs)}

    def allocation_calls(self) -> int:
        return sum(self.calls[name] for name in ("cudaMalloc", "cudaHostAlloc", "cudaMallocHost"))

    def fake_enqueue(self, stream: Any, label: str, run: Callable[[], None], cost_ms: float = KERNEL_COST_MS) -> None:
        """Queue work (a TensorRT kernel, say) on a stream, as a launch would."""
        self._enqueue(int(stream), _Op(label, cost_ms, run))

    def fake_device_array(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A numpy view of device memory; FakeCudaFault(illegal address) outside every allocation."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        self._region(self._device, ptr, nbytes, "device")
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    # ---- helpers ----

    def _enter(self, name: str) -> cudaError_t | None:
        self.calls[name] += 1
        if not self.driver:
            return cudaError_t.cudaErrorInsufficientDriver
        if self._sticky is not None:
            return self._sticky
        queued = self._failures.get(name)
        if queued:
            return queued.pop(0)
        return None

    def _handle(self, kind: type[_Handle]) -> _Handle:
        self._next_handle += 0x10
        return kind(self._next_handle)

    @staticmethod
    def _region(table: dict[int, ctypes.Array], ptr: int, nbytes: int, kind: str) -> None:
        for base, buffer in table.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buffer):
                return
        raise FakeCudaFault(cudaError_t.cudaErrorIllegalAddress, f"{nbytes} bytes at {ptr:#x} are not {kind} memory")

    def _alloc(self, table: dict[int, ctypes.Array], size: int) -> tuple:
        if size <= 0:
            return (cudaError_t.cudaErrorInvalidValue, None)
        buffer = ctypes.create_string_buffer(int(size))
        ptr = ctypes.addressof(buffer)
        table[ptr] = buffer
        return (cudaError_t.cudaSuccess, ptr)

    def _enqueue(self, handle: int, op: _Op) -> None:
        stream = self._streams.get(handle)
        if handle != 0 and stream is None:
            raise FakeCudaFault(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {handle:#x}")
        if stream is not None and stream.capture is not None:
            stream.capture.append(op)
        elif stream is None:  # the legacy default stream: run now, as a blocking launch would
            self._execute([op])
        else:
            stream.pending.append(op)

    def _execute(self, ops: list[_Op]) -> None:
        for op in ops:
            self.clock_ms += op.cost_ms
            try:
                op.run()
            except FakeCudaFault as fault:
                self._sticky = fault.error
                return

    def _drain(self, handle: int) -> cudaError_t:
        stream = self._streams[handle]
        ops, stream.pending = stream.pending, []
        self._execute(ops)
        return self._sticky or cudaError_t.cudaSuccess

    # ---- device ----

    def cudaGetDeviceCount(self) -> tuple:  # noqa: N802 - CUDA's names
        if (err := self._enter("cudaGetDeviceCount")) is not None:
            return (err, None)
        if self.device_count == 0:
            return (cudaError_t.cudaErrorNoDevice, None)
        return (cudaError_t.cudaSuccess, self.device_count)

    def cudaGetDevice(self) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGetDevice")) is not None:
            return (err, None)
        return (cudaError_t.cudaSuccess, 0)

    def cudaGetDeviceProperties(self, device: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGetDeviceProperties")) is not None:
            return (err, None)
        if not 0 <= int(device) < self.device_count:
            return (cudaError_t.cudaErrorInvalidDevice, None)
        major, minor = self.compute_capability
        return (cudaError_t.cudaSuccess, cudaDeviceProp(self.device_name.encode(), major, minor,
                                                        multiProcessorCount=self.multiprocessors))

    def cudaGetErrorName(self, error: cudaError_t) -> tuple:  # noqa: N802
        self.calls["cudaGetErrorName"] += 1
        return (cudaError_t.cudaSuccess, cudaError_t(int(error)).name.encode())

    def cudaGetErrorString(self, error: cudaError_t) -> tuple:  # noqa: N802
        self.calls["cudaGetErrorString"] += 1
        text = _ERROR_STRINGS.get(cudaError_t(int(error)), "unknown error")
        return (cudaError_t.cudaSuccess, text.encode())

    # ---- memory ----

    def cudaMalloc(self, size: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaMalloc")) is not None:
            return (err, None)
        return self._alloc(self._device, size)

    def cudaFree(self, ptr: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaFree")) is not None:
            return (err,)
        if self._device.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaHostAlloc(self, size: int, flags: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaHostAlloc")) is not None:
            return (err, None)
        if int(flags) & ~0x7:
            return (cudaError_t.cudaErrorInvalidValue, None)
        return self._alloc(self._host, size)

    def cudaMallocHost(self, size: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaMallocHost")) is not None:
            return (err, None)
        return self._alloc(self._host, size)

    def cudaFreeHost(self, ptr: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaFreeHost")) is not None:
            return (err,)
        if self._host.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaMemcpyAsync")) is not None:
            return (err,)
        dst, src, count = int(dst), int(src), int(count)
        kind = cudaMemcpyKind(int(kind))
        if count == 0:
            return (cudaError_t.cudaSuccess,)
        if kind not in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToHost):
            return (cudaError_t.cudaErrorInvalidValue,)  # the adapter only ever copies across
        device_ptr, host_ptr = (dst, src) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else (src, dst)
        try:
            self._region(self._device, device_ptr, count, "device")
        except FakeCudaFault:
            # Pointers that do not match the direction: undefined behaviour in CUDA, an error here.
            return (cudaError_t.cudaErrorInvalidMemcpyDirection,)
        try:
            self._region(self._host, host_ptr, count, "pinned host")
        except FakeCudaFault:
            self.pageable_copies += 1

        def copy() -> None:
            self._region(self._device, device_ptr, count, "device")  # freed before the copy ran?
            ctypes.memmove(dst, src, count)

        try:
            self._enqueue(int(stream), _Op(f"memcpy {kind.name} {count}B", COPY_OVERHEAD_MS + count / COPY_BYTES_PER_MS,
                                           copy))
        except FakeCudaFault as fault:
            return (fault.error,)
        return (cudaError_t.cudaSuccess,)

    # ---- streams ----

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaStreamCreateWithFlags")) is not None:
            return (err, None)
        if int(flags) not in (self.cudaStreamDefault, self.cudaStreamNonBlocking):
            return (cudaError_t.cudaErrorInvalidValue, None)
        handle = self._handle(cudaStream_t)
        self._streams[int(handle)] = _Stream()
        return (cudaError_t.cudaSuccess, handle)

    def cudaStreamSynchronize(self, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaStreamSynchronize")) is not None:
            return (err,)
        state = self._streams.get(int(stream))
        if state is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if state.capture is not None:  # not legal while capturing; it also invalidates the capture
            state.capture_invalidated = True
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (self._drain(int(stream)),)

    def cudaStreamDestroy(self, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaStreamDestroy")) is not None:
            return (err,)
        if int(stream) not in self._streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._drain(int(stream))  # CUDA lets queued work finish before the stream goes
        del self._streams[int(stream)]
        return (cudaError_t.cudaSuccess,)

    # ---- events ----

    def cudaEventCreate(self) -> tuple:  # noqa: N802
        if (err := self._enter("cudaEventCreate")) is not None:
            return (err, None)
        handle = self._handle(cudaEvent_t)
        self._events[int(handle)] = _EventState()
        return (cudaError_t.cudaSuccess, handle)

    def cudaEventRecord(self, event: Any, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaEventRecord")) is not None:
            return (err,)
        state = self._events.get(int(event))
        if state is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        target = self._streams.get(int(stream))
        if target is not None and target.capture is not None:
            # Inside a capture a plain record only orders work; it is not a timestamp node.
            return (cudaError_t.cudaSuccess,)
        state.recorded, state.completed = True, False

        def stamp() -> None:
            state.completed, state.time_ms = True, self.clock_ms

        try:
            self._enqueue(int(stream), _Op("event record", 0.0, stamp))
        except FakeCudaFault as fault:
            return (fault.error,)
        return (cudaError_t.cudaSuccess,)

    def cudaEventSynchronize(self, event: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaEventSynchronize")) is not None:
            return (err,)
        state = self._events.get(int(event))
        if state is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if state.recorded and not state.completed:
            for handle in list(self._streams):
                self._drain(handle)
        return (self._sticky or cudaError_t.cudaSuccess,)

    def cudaEventElapsedTime(self, start: Any, end: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaEventElapsedTime")) is not None:
            return (err, None)
        first, last = self._events.get(int(start)), self._events.get(int(end))
        if first is None or last is None or not (first.recorded and last.recorded):
            return (cudaError_t.cudaErrorInvalidResourceHandle, None)
        if not (first.completed and last.completed):
            return (cudaError_t.cudaErrorNotReady, None)
        return (cudaError_t.cudaSuccess, float(last.time_ms - first.time_ms))

    def cudaEventDestroy(self, event: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaEventDestroy")) is not None:
            return (err,)
        if self._events.pop(int(event), None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (cudaError_t.cudaSuccess,)

    # ---- graphs ----

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple:  # noqa: N802
        if (err := self._enter("cudaStreamBeginCapture")) is not None:
            return (err,)
        state = self._streams.get(int(stream))
        if state is None:  # the legacy default stream cannot be captured
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        if state.capture is not None:
            return (cudaError_t.cudaErrorIllegalState,)
        cudaStreamCaptureMode(int(mode))
        state.capture, state.capture_invalidated = [], False
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaStreamEndCapture")) is not None:
            state = self._streams.get(int(stream))
            if state is not None:
                state.capture = None
            return (err, None)
        state = self._streams.get(int(stream))
        if state is None or state.capture is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        ops, state.capture = state.capture, None
        if state.capture_invalidated:
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        handle = self._handle(cudaGraph_t)
        self._graphs[int(handle)] = ops
        return (cudaError_t.cudaSuccess, handle)

    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGraphInstantiate")) is not None:
            return (err, None)
        ops = self._graphs.get(int(graph))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        handle = self._handle(cudaGraphExec_t)
        self._graph_execs[int(handle)] = list(ops)
        return (cudaError_t.cudaSuccess, handle)

    def cudaGraphLaunch(self, graph_exec: Any, stream: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGraphLaunch")) is not None:
            return (err,)
        ops = self._graph_execs.get(int(graph_exec))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        try:
            for op in ops:
                self._enqueue(int(stream), op)
        except FakeCudaFault as fault:
            return (fault.error,)
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGraphExecDestroy")) is not None:
            return (err,)
        if self._graph_execs.pop(int(graph_exec), None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph: Any) -> tuple:  # noqa: N802
        if (err := self._enter("cudaGraphDestroy")) is not None:
            return (err,)
        if self._graphs.pop(int(graph), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)
