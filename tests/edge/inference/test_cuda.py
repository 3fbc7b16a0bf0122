"""edge/inference/cuda.py against the fake CUDA runtime (asynchronous like a GPU, virtual clock), and against the
real cuda-python on a GPU where there is one (marked gpu; skipped here)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from edge.errors import BackendError, CudaError
from edge.inference import cuda
from tests.fakes.fake_cuda import FakeCudaRuntime, cudaError_t
from tests.gpu import real_cuda_runtime


@pytest.fixture
def rt() -> FakeCudaRuntime:
    return FakeCudaRuntime()


def test_check_unpacks_the_result_tuple():
    ok = cudaError_t.cudaSuccess
    assert cuda.check((ok,), "cudaFree") is None
    assert cuda.check((ok, 7), "cudaMalloc") == 7
    assert cuda.check((ok, 1, 2), "twoValues") == (1, 2)


def test_check_raises_with_the_call_and_the_error_name(rt):
    with pytest.raises(CudaError) as caught:
        cuda.check((cudaError_t.cudaErrorLaunchFailure, None), "cudaStreamSynchronize", rt)
    assert "cudaStreamSynchronize" in str(caught.value)
    assert "cudaErrorLaunchFailure" in str(caught.value)
    assert rt.calls["cudaGetErrorName"] == 1  # the name comes from CUDA itself where it can


def test_a_failed_allocation_names_the_call_the_error_and_what_to_do(rt):
    rt.fail("cudaMalloc", cudaError_t.cudaErrorMemoryAllocation)
    with pytest.raises(CudaError, match=r"cudaMalloc failed with cudaErrorMemoryAllocation: out of GPU"):
        cuda.DeviceBuffer(1024, cudart=rt)
    with cuda.DeviceBuffer(1024, cudart=rt) as buffer:  # only the next call was told to fail
        assert buffer.nbytes == 1024
    assert rt.live_allocations()["device"] == 0


def test_no_device_is_a_cuda_error_with_a_hint():
    rt = FakeCudaRuntime(device_count=0)
    with pytest.raises(CudaError, match=r"cudaGetDeviceCount failed with cudaErrorNoDevice: no CUDA GPU"):
        cuda.device_count(cudart=rt)


def test_no_driver_and_no_device_get_different_hints():
    # Without a driver (a container started without the NVIDIA runtime) real cuda-python returns 35.
    no_driver = FakeCudaRuntime(driver=False)
    with pytest.raises(CudaError) as caught:
        cuda.device_count(cudart=no_driver)
    assert int(cudaError_t.cudaErrorInsufficientDriver) == 35 and int(cudaError_t.cudaErrorNoDevice) == 100
    assert "cudaErrorInsufficientDriver: no usable NVIDIA driver: in a container, start it with the NVIDIA " \
           "runtime" in str(caught.value)
    with pytest.raises(CudaError) as caught:
        cuda.device_count(cudart=FakeCudaRuntime(device_count=0))
    assert "although the NVIDIA driver is loaded" in str(caught.value)
    assert "container" not in str(caught.value)


def test_the_stream_handle_is_the_native_address(rt):
    with cuda.Stream(cudart=rt) as stream:
        assert stream.handle == int(stream.raw) != 0  # int() here: cuda.bindings.utils is absent off-GPU


def test_compute_capability_and_name_come_from_the_device_properties():
    assert cuda.device_compute_capability(cudart=FakeCudaRuntime()) == "8.7"
    assert cuda.device_compute_capability(cudart=FakeCudaRuntime(compute_capability=(7, 2))) == "7.2"
    assert cuda.device_name(cudart=FakeCudaRuntime(name="Xavier")) == "Xavier"
    with pytest.raises(CudaError, match="cudaErrorInvalidDevice"):
        cuda.device_compute_capability(3, cudart=FakeCudaRuntime())


def test_pinned_buffer_is_a_writable_numpy_view_of_pinned_memory(rt):
    with cuda.PinnedBuffer((3, 4), "float32", cudart=rt) as pinned:
        assert pinned.array.shape == (3, 4) and pinned.array.dtype == np.float32
        assert pinned.nbytes == 48
        assert pinned.array.ctypes.data == pinned.ptr
        pinned.array[:] = 2.5
        assert np.frombuffer(rt._host[pinned.ptr], np.float32, count=12).tolist() == [2.5] * 12
    assert pinned.array is None
    assert rt.live_allocations()["host"] == 0
    assert rt.calls["cudaHostAlloc"] == 1 and rt.calls["cudaFreeHost"] == 1


def test_round_trip_is_asynchronous_until_the_stream_is_synchronised(rt):
    with (cuda.Stream(cudart=rt) as stream, cuda.PinnedBuffer((256,), "int32", cudart=rt) as src,
          cuda.PinnedBuffer((256,), "int32", cudart=rt) as dst, cuda.DeviceBuffer(1024, cudart=rt) as dev):
        src.array[:] = np.arange(256)
        cuda.copy_htod_async(dev, src, stream)
        cuda.copy_dtoh_async(dst, dev, stream)
        assert not dst.array.any()  # nothing has run yet: reading before a sync sees stale bytes
        stream.synchronize()
        np.testing.assert_array_equal(dst.array, np.arange(256))

        src.array[:] = -1
        cuda.copy_htod_async(dev, src, stream, nbytes=16)  # only the first four values
        cuda.copy_dtoh_async(dst, dev, stream)
        stream.synchronize()
        assert dst.array[:4].tolist() == [-1] * 4 and dst.array[4:].tolist() == list(range(4, 256))
    assert rt.live_allocations() == {"host": 0, "device": 0, "streams": 0, "events": 0, "graph_execs": 0}


def test_copy_larger_than_a_buffer_is_refused(rt):
    with (cuda.Stream(cudart=rt) as stream, cuda.PinnedBuffer((4,), "float32", cudart=rt) as src,
          cuda.DeviceBuffer(8, cudart=rt) as dev):
        with pytest.raises(BackendError, match="does not fit"):
            cuda.copy_htod_async(dev, src, stream, nbytes=16)
    assert rt.calls["cudaMemcpyAsync"] == 0


def test_events_time_the_work_between_them(rt):
    with (cuda.Stream(cudart=rt) as stream, cuda.PinnedBuffer((1 << 20,), "uint8", cudart=rt) as src,
          cuda.DeviceBuffer(1 << 20, cudart=rt) as dev):
        marks = [cuda.Event(cudart=rt) for _ in range(3)]
        marks[0].record(stream)
        cuda.copy_htod_async(dev, src, stream, nbytes=1024)
        marks[1].record(stream)
        cuda.copy_htod_async(dev, src, stream)
        marks[2].record(stream)
        with pytest.raises(CudaError, match="cudaEventElapsedTime failed with cudaErrorNotReady"):
            marks[0].elapsed_ms(marks[1])
        stream.synchronize()
        small, large = marks[0].elapsed_ms(marks[1]), marks[1].elapsed_ms(marks[2])
        assert 0 < small < large  # a megabyte takes longer than a kilobyte
        for mark in marks:
            mark.close()
            mark.close()  # closing twice is harmless
    assert rt.calls["cudaEventDestroy"] == 3


def test_graph_replays_the_captured_copies(rt):
    with (cuda.Stream(cudart=rt) as stream, cuda.PinnedBuffer((8,), "float32", cudart=rt) as src,
          cuda.PinnedBuffer((8,), "float32", cudart=rt) as dst, cuda.DeviceBuffer(32, cudart=rt) as dev):
        stream.begin_capture()
        cuda.copy_htod_async(dev, src, stream)
        cuda.copy_dtoh_async(dst, dev, stream)
        graph = stream.end_capture()
        stream.synchronize()
        assert not dst.array.any()  # capturing records work, it does not run it
        for value in (1.0, 2.0):
            src.array[:] = value  # each launch copies what the buffer holds then
            graph.launch(stream)
            stream.synchronize()
            assert dst.array.tolist() == [value] * 8
        graph.close()
    assert rt.live_allocations()["graph_execs"] == 0


def test_synchronising_during_capture_fails_and_invalidates_it(rt):
    with cuda.Stream(cudart=rt) as stream:
        stream.begin_capture()
        with pytest.raises(CudaError, match="cudaErrorStreamCaptureUnsupported"):
            stream.synchronize()
        with pytest.raises(CudaError, match="cudaStreamEndCapture failed with cudaErrorStreamCaptureInvalidated"):
            stream.end_capture()
        stream.synchronize()  # the stream works again after the failed capture


def test_a_kernel_fault_is_sticky(rt):
    stream = cuda.Stream(cudart=rt)
    rt.fake_enqueue(stream.handle, "bad kernel", lambda: rt.fake_device_array(0x10, (4,), "float32"))
    with pytest.raises(CudaError, match="cudaErrorIllegalAddress: a kernel touched memory"):
        stream.synchronize()
    # As on a GPU, the context is unusable from then on: every later call reports the fault.
    with pytest.raises(CudaError, match="cudaMalloc failed with cudaErrorIllegalAddress"):
        cuda.DeviceBuffer(4, cudart=rt)
    with pytest.raises(CudaError, match="cudaStreamDestroy failed with cudaErrorIllegalAddress"):
        stream.close()


def test_missing_cuda_python_names_the_install_command(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail as if not installed
    with pytest.raises(BackendError, match=re.escape("pip install 'cuda-python>=12.9.1,<13'")):
        cuda.load_runtime()


def test_fake_error_codes_match_the_real_bindings():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    for error in cudaError_t:
        assert int(getattr(runtime.cudaError_t, error.name)) == error.value
    used = ["cudaStreamCreateWithFlags", "cudaStreamSynchronize", "cudaStreamDestroy", "cudaEventCreate",
            "cudaEventRecord", "cudaEventElapsedTime", "cudaEventDestroy", "cudaHostAlloc", "cudaFreeHost",
            "cudaMalloc", "cudaFree", "cudaMemcpyAsync", "cudaGetErrorName", "cudaGetDeviceProperties",
            "cudaGetDevice", "cudaGetDeviceCount", "cudaStreamBeginCapture", "cudaStreamEndCapture",
            "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy", "cudaGraphDestroy"]
    for name in used:
        assert hasattr(runtime, name) and hasattr(FakeCudaRuntime, name), name
    assert runtime.cudaStreamNonBlocking == FakeCudaRuntime.cudaStreamNonBlocking
    assert int(runtime.cudaMemcpyKind.cudaMemcpyHostToDevice) == 1


# ---- real GPU ----


@pytest.mark.gpu
def test_real_gpu_round_trip_and_timing():
    runtime = real_cuda_runtime()
    assert re.fullmatch(r"\d+\.\d+", cuda.device_compute_capability(cudart=runtime))
    with (cuda.Stream(cudart=runtime) as stream, cuda.PinnedBuffer((1 << 16,), "float32", cudart=runtime) as src,
          cuda.PinnedBuffer((1 << 16,), "float32", cudart=runtime) as dst,
          cuda.DeviceBuffer(1 << 18, cudart=runtime) as dev, cuda.Event(cudart=runtime) as start,
          cuda.Event(cudart=runtime) as end):
        src.array[:] = np.arange(1 << 16, dtype=np.float32)
        start.record(stream)
        cuda.copy_htod_async(dev, src, stream)
        cuda.copy_dtoh_async(dst, dev, stream)
        end.record(stream)
        stream.synchronize()
        np.testing.assert_array_equal(dst.array, src.array)
        assert start.elapsed_ms(end) >= 0.0


@pytest.mark.gpu
def test_real_gpu_graph_replay():
    runtime = real_cuda_runtime()
    with (cuda.Stream(cudart=runtime) as stream, cuda.PinnedBuffer((64,), "int32", cudart=runtime) as src,
          cuda.PinnedBuffer((64,), "int32", cudart=runtime) as dst, cuda.DeviceBuffer(256, cudart=runtime) as dev):
        stream.begin_capture()
        cuda.copy_htod_async(dev, src, stream)
        cuda.copy_dtoh_async(dst, dev, stream)
        with stream.end_capture() as graph:
            for value in (3, 4):
                src.array[:] = value
                graph.launch(stream)
                stream.synchronize()
                assert dst.array.tolist() == [value] * 64
