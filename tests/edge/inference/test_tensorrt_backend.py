"""TensorRTBackend and EngineKey, end to end on the fake TensorRT + fake CUDA runtime: the fake engine
really computes (onnxruntime on the bytes at the bound device addresses, queued on the fake stream), so
outputs are compared with onnxruntime on the same graph. A gpu-marked test does the same for real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from build_engines.tensorrt_builder import build_engine, engine_key_for, save_engine
from edge.errors import BackendError, BundleError, CudaError
from edge.inference.backends.base import TensorSpec
from edge.inference.backends.tensorrt import TensorRTBackend
from edge.inference.engine_key import REBUILD_COMMAND, EngineKey, file_sha256, key_path
from tests.fakes.conftest_fakes import fake_gpu, head_model, mlp_model, ort_run
from tests.fakes.fake_cuda import FakeCudaRuntime, cudaError_t
from tests.fakes.fake_tensorrt import make_fake_tensorrt
from tests.gpu import real_cuda_runtime

X = (TensorSpec("x", "float32", (-1, 4)),)
Y = (TensorSpec("y", "float32", (-1, 3)),)
HEAD_IN = (TensorSpec("features", "float32", (1, 8)), TensorSpec("mask", "float32", (-1, 8)))
HEAD_OUT = (TensorSpec("actions", "float32", (-1, 2)),)
SHA_A, SHA_B = "a" * 64, "b" * 64


def make_engine(tmp_path: Path, trt, cudart, *, graph=mlp_model, profile=None, precision="fp32",
                name="mlp") -> tuple[Path, Path, EngineKey]:
    onnx_path = graph(tmp_path / f"{name}.onnx")
    profile = profile or {"x": ((1, 4), (4, 4), (8, 4))}
    engine = build_engine(onnx_path, precision=precision, profile=profile, timing_cache_path=None, trt=trt)
    key = engine_key_for(onnx_path, precision, trt, cudart)
    engine_path = save_engine(engine, key, tmp_path / f"{name}.{precision}.engine")
    return onnx_path, engine_path, key


@pytest.fixture
def gpu():
    return fake_gpu("10.3.0")


@pytest.fixture
def mlp(tmp_path, gpu):
    trt, cudart = gpu
    return make_engine(tmp_path, trt, cudart)


def backend_for(engine_path, key, gpu, max_batch=8, **kwargs) -> TensorRTBackend:
    trt, cudart = gpu
    return TensorRTBackend(engine_path, key, X, Y, max_batch=max_batch, trt=trt, cudart=cudart, **kwargs)


# ---- EngineKey ----


def test_engine_key_digest_is_canonical_and_covers_every_field():
    key = EngineKey(SHA_A, "10.3.0", "8.7", "int8")
    assert key.digest() == EngineKey(**key.to_dict()).digest()
    others = [dataclasses.replace(key, source_sha256=SHA_B), dataclasses.replace(key, tensorrt_version="10.4.0"),
              dataclasses.replace(key, compute_capability="8.6"), dataclasses.replace(key, precision="fp16")]
    assert len({key.digest(), *(o.digest() for o in others)}) == 5
    assert key.mismatch(key) == []
    problems = key.mismatch(dataclasses.replace(key, tensorrt_version="10.4.0", compute_capability="7.2"))
    assert problems == ["TensorRT version: engine 10.3.0, required 10.4.0",
                        "GPU compute capability: engine 8.7, required 7.2"]


def test_engine_key_names_the_gpu_and_reads_old_keys_as_unknown(tmp_path):
    key = EngineKey(SHA_A, "10.3.0", "8.7", "int8", "Orin", "16")
    nano = dataclasses.replace(key, multiprocessors="8")  # Orin Nano: also compute capability 8.7
    assert key.mismatch(nano) == ["GPU multiprocessors: engine 16, required 8"]
    old = {"source_sha256": SHA_A, "tensorrt_version": "10.3.0", "compute_capability": "8.7", "precision": "int8"}
    legacy = EngineKey.from_dict(old)  # a key written before the GPU fields
    assert (legacy.gpu_name, legacy.multiprocessors) == ("unknown", "unknown")
    assert legacy.to_dict() == old  # ...keeps its digest, so its key file still loads
    path = tmp_path / "old.key.json"
    path.write_text(json.dumps({**old, "digest": legacy.digest()}))
    assert EngineKey.load(path) == legacy
    assert legacy.mismatch(key)[0].startswith("GPU: engine unknown (a key written before the GPU was recorded: "
                                              "rebuild the engines), required Orin")
    with pytest.raises(ValueError, match="multiprocessors"):
        EngineKey(SHA_A, "10.3.0", "8.7", "int8", "Orin", "sixteen")


def test_an_engine_from_another_gpu_of_the_same_generation_is_refused(tmp_path):
    trt, cudart = fake_gpu("10.3.0")
    _, engine_path, key = make_engine(tmp_path, trt, cudart)
    nano_rt = FakeCudaRuntime(multiprocessors=8)
    nano = make_fake_tensorrt("10.3.0", cudart=nano_rt)
    with pytest.raises(BundleError, match="GPU multiprocessors: engine 16, required 8"):
        TensorRTBackend(engine_path, key, X, Y, max_batch=8, trt=nano, cudart=nano_rt).activate()


def test_engine_key_rejects_malformed_values():
    with pytest.raises(ValueError, match="precision"):
        EngineKey(SHA_A, "10.3.0", "8.7", "int4")
    with pytest.raises(ValueError, match="compute_capability"):
        EngineKey(SHA_A, "10.3.0", "sm87", "fp16")
    with pytest.raises(BundleError, match=r"lacks \['precision'\]"):
        EngineKey.from_dict({"source_sha256": SHA_A, "tensorrt_version": "10.3.0", "compute_capability": "8.7"})
    with pytest.raises(BundleError, match="malformed"):
        EngineKey.from_dict({"source_sha256": "short", "tensorrt_version": "10.3.0", "compute_capability": "8.7",
                             "precision": "fp16"})


def test_engine_key_file_round_trip_and_tamper_check(tmp_path):
    key = EngineKey(SHA_A, "10.3.0", "8.7", "fp16")
    path = key_path(tmp_path / "head.fp16.engine")
    assert path.name == "head.fp16.engine.key.json"
    key.save(path)
    assert EngineKey.load(path) == key
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    raw = json.loads(path.read_text())
    raw["precision"] = "int8"
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="digest does not match"):
        EngineKey.load(path)


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob", chunk_bytes=4096) == hashlib.sha256(data).hexdigest()


# ---- end to end ----


def test_outputs_equal_onnxruntime_for_batch_one_and_larger(mlp, gpu):
    onnx_path, engine_path, key = mlp
    rng = np.random.default_rng(5)
    with backend_for(engine_path, key, gpu) as backend:
        for batch in (1, 5, 8, 1):
            x = rng.standard_normal((batch, 4)).astype(np.float32)
            backend.input("x")[:batch] = x
            out = backend.run(batch)
            assert out["y"].shape == (batch, 3)
            np.testing.assert_allclose(out["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-6, atol=1e-6)
        info = backend.info
    assert info.name == "tensorrt" and info.precision == "fp32"
    assert info.details["tensorrt_version"] == "10.3.0" and info.details["compute_capability"] == "8.7"


def test_static_and_dynamic_inputs_together(tmp_path, gpu):
    trt, cudart = gpu
    onnx_path, engine_path, key = make_engine(tmp_path, trt, cudart, graph=head_model, name="head",
                                              profile={"mask": ((1, 8), (16, 8), (32, 8))})
    rng = np.random.default_rng(6)
    features = rng.standard_normal((1, 8)).astype(np.float32)
    with TensorRTBackend(engine_path, key, HEAD_IN, HEAD_OUT, max_batch=32, trt=trt, cudart=cudart) as backend:
        assert backend.input("features").shape == (1, 8) and backend.input("mask").shape == (32, 8)
        backend.input("features")[:] = features
        for samples in (32, 3):
            mask = (rng.random((samples, 8)) > 0.3).astype(np.float32) / 0.7
            backend.input("mask")[:samples] = mask
            actions = backend.run(samples)["actions"]
            expected = ort_run(onnx_path, {"features": features, "mask": mask})["actions"]
            np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)


def test_host_buffers_are_pinned_memory(mlp, gpu):
    _, engine_path, key = mlp
    trt, cudart = gpu
    with backend_for(engine_path, key, gpu) as backend:
        assert backend.input("x").ctypes.data in cudart._host
        assert backend.run(1)["y"].ctypes.data in cudart._host


def test_run_allocates_nothing_and_sets_shapes_only_on_batch_change(mlp, gpu):
    _, engine_path, key = mlp
    trt, cudart = gpu
    with backend_for(engine_path, key, gpu) as backend:
        backend.input("x")[:] = 1.0
        backend.run(1)
        allocations = cudart.allocation_calls()
        contexts = trt.fake.call_names().count("ICudaEngine.create_execution_context")
        batches = [1] * 40 + [4] * 30 + [8] * 29 + [1]
        for batch in batches:
            backend.run(batch)
        assert cudart.allocation_calls() == allocations
        assert trt.fake.call_names().count("ICudaEngine.create_execution_context") == contexts
    shapes = [args for name, args in trt.fake.calls if name == "IExecutionContext.set_input_shape"]
    assert shapes == [("x", (1, 4)), ("x", (4, 4)), ("x", (8, 4)), ("x", (1, 4))]
    addresses = [name for name, _ in trt.fake.calls if name == "IExecutionContext.set_tensor_address"]
    assert len(addresses) == 2  # once per tensor, at activation
    assert trt.fake.call_names().count("IExecutionContext.execute_async_v3") == 101
    assert cudart.calls["cudaStreamSynchronize"] >= 101


def test_timing_comes_from_events_around_each_stage(mlp, gpu):
    _, engine_path, key = mlp
    with backend_for(engine_path, key, gpu) as backend:
        backend.run(1)
        small = dataclasses.replace(backend.last_timing)
        backend.run(8)
        large = backend.last_timing
    assert small.host_to_device_ms > 0 and small.compute_ms > 0 and small.device_to_host_ms > 0
    assert large.host_to_device_ms > small.host_to_device_ms  # eight rows are more bytes than one
    assert large.total_ms == pytest.approx(large.host_to_device_ms + large.compute_ms + large.device_to_host_ms)


def test_tensorrt_11_engine_runs_the_same(tmp_path):
    trt, cudart = fake_gpu("11.0.0")
    onnx_path, engine_path, key = make_engine(tmp_path, trt, cudart)
    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    with TensorRTBackend(engine_path, key, X, Y, max_batch=8, trt=trt, cudart=cudart) as backend:
        backend.input("x")[:3] = x
        np.testing.assert_allclose(backend.run(3)["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-6)


def test_cuda_graph_replays_the_whole_run_at_its_batch(mlp, gpu, caplog):
    onnx_path, engine_path, key = mlp
    trt, cudart = gpu
    rng = np.random.default_rng(8)

    def run_and_check(backend, batch):
        x = rng.standard_normal((batch, 4)).astype(np.float32)
        backend.input("x")[:batch] = x  # fresh inputs each time: the graph must copy them, not replay old ones
        np.testing.assert_allclose(backend.run(batch)["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-6)

    with backend_for(engine_path, key, gpu, cuda_graph_batch=4) as backend:
        assert backend.info.details["cuda_graph_batch"] == 4
        executes = trt.fake.call_names().count("IExecutionContext.execute_async_v3")
        for _ in range(3):
            run_and_check(backend, 4)
        assert cudart.calls["cudaGraphLaunch"] == 3
        assert trt.fake.call_names().count("IExecutionContext.execute_async_v3") == executes  # replays only
        assert backend.last_timing.compute_ms > 0

        run_and_check(backend, 2)  # another batch: the graph is dropped, the ordinary path runs
        assert "dropping the graph" in caplog.text and backend.info.details["cuda_graph_batch"] is None
        assert cudart.live_allocations()["graph_execs"] == 0
        run_and_check(backend, 4)
        assert cudart.calls["cudaGraphLaunch"] == 3
        assert trt.fake.call_names().count("IExecutionContext.execute_async_v3") == executes + 2


@pytest.mark.parametrize(
    ("call", "error"),
    [("cudaStreamBeginCapture", cudaError_t.cudaErrorStreamCaptureUnsupported),
     ("cudaStreamEndCapture", cudaError_t.cudaErrorStreamCaptureInvalidated)],
)
def test_cuda_graph_falls_back_when_capture_is_impossible(mlp, gpu, call, error, caplog):
    onnx_path, engine_path, key = mlp
    trt, cudart = gpu
    cudart.fail(call, error)
    x = np.ones((4, 4), np.float32)
    with backend_for(engine_path, key, gpu, cuda_graph_batch=4) as backend:
        assert backend.info.details["cuda_graph_batch"] is None
        assert "no CUDA graph for mlp.fp32.engine" in caplog.text and error.name in caplog.text
        backend.input("x")[:4] = x
        np.testing.assert_allclose(backend.run(4)["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-6)
    assert cudart.calls["cudaGraphLaunch"] == 0


def test_close_frees_everything_and_allows_a_second_activation(mlp, gpu):
    _, engine_path, key = mlp
    trt, cudart = gpu
    backend = backend_for(engine_path, key, gpu)
    backend.activate()
    backend.activate()  # idempotent
    assert cudart.allocation_calls() == 4  # pinned + device for x and for y
    backend.close()
    backend.close()
    assert cudart.live_allocations() == {"host": 0, "device": 0, "streams": 0, "events": 0, "graph_execs": 0}
    with pytest.raises(BackendError, match="not active"):
        backend.run(1)
    backend.activate()
    assert backend.run(2)["y"].shape == (2, 3)
    backend.close()


# ---- refusals ----


def test_batch_outside_the_buffers_and_unknown_inputs_are_refused(mlp, gpu):
    _, engine_path, key = mlp
    with backend_for(engine_path, key, gpu, max_batch=4) as backend:
        with pytest.raises(BackendError, match=r"batch 5 is outside 1\.\.4"):
            backend.run(5)
        with pytest.raises(BackendError, match="no input 'image'"):
            backend.input("image")
        with pytest.raises(BackendError, match="no input 'y'"):
            backend.input("y")


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ((TensorSpec("x", "float16", (-1, 4)),), Y, "input 'x' is float32, expected float16"),
        ((TensorSpec("x", "float32", (-1, 5)),), Y, r"input 'x' has shape \[-1, 4\], expected \[-1, 5\]"),
        ((TensorSpec("image", "float32", (-1, 4)),), Y, "missing input 'image'"),
        (X, (), r"unexpected outputs \['y'\]"),
    ],
)
def test_io_metadata_mismatch_is_refused_with_the_rebuild_command(mlp, gpu, inputs, outputs, message):
    _, engine_path, key = mlp
    trt, cudart = gpu
    backend = TensorRTBackend(engine_path, key, inputs, outputs, max_batch=4, trt=trt, cudart=cudart)
    with pytest.raises(BackendError, match=message) as caught:
        backend.activate()
    assert REBUILD_COMMAND in str(caught.value)
    assert cudart.live_allocations()["host"] == 0 and cudart.live_allocations()["device"] == 0


def test_profile_smaller_than_max_batch_is_refused(mlp, gpu):
    _, engine_path, key = mlp  # built for batch 1..8
    with pytest.raises(BackendError, match=r"'?x'? accepts batch 1\.\.8 but the bundle needs 1\.\.16"):
        backend_for(engine_path, key, gpu, max_batch=16).activate()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tensorrt_version": "10.2.0"}, "TensorRT version: engine 10.2.0, required 10.3.0"),
        ({"compute_capability": "8.6"}, "GPU compute capability: engine 8.6, required 8.7"),
        ({"source_sha256": SHA_B}, "source graph sha256: engine bbbbbbbbbbbb..., required"),
        ({"precision": "fp16"}, "precision: engine fp16, required fp32"),
    ],
)
def test_engine_built_for_something_else_is_refused_before_loading(mlp, gpu, change, message):
    _, engine_path, key = mlp
    trt, _ = gpu
    dataclasses.replace(key, **change).save(key_path(engine_path))  # the engine's own record says so
    with pytest.raises(BundleError, match=message) as caught:
        backend_for(engine_path, key, gpu).activate()
    assert REBUILD_COMMAND in str(caught.value) and "on this device" in str(caught.value)
    assert "Runtime.deserialize_cuda_engine" not in trt.fake.call_names()


def test_bundle_asking_for_another_graph_is_refused(mlp, gpu):
    _, engine_path, key = mlp
    required = dataclasses.replace(key, source_sha256=SHA_B)  # the bundle now ships another graph
    with pytest.raises(BundleError, match="source graph sha256: engine .*, required bbbbbbbbbbbb"):
        backend_for(engine_path, required, gpu).activate()


def test_without_a_key_file_the_manifest_key_is_checked_against_this_device(mlp, gpu):
    _, engine_path, key = mlp
    key_path(engine_path).unlink()
    other_gpu = fake_gpu("10.3.0", compute_capability=(7, 2))
    with pytest.raises(BundleError, match="GPU compute capability: engine 8.7, required 7.2"):
        backend_for(engine_path, key, other_gpu).activate()
    with backend_for(engine_path, key, gpu) as backend:
        assert backend.run(1)["y"].shape == (1, 3)


def test_unchecked_engine_from_another_tensorrt_is_refused_by_tensorrt(mlp, caplog):
    _, engine_path, _ = mlp
    key_path(engine_path).unlink()
    newer = fake_gpu("10.4.0")
    with pytest.raises(BundleError, match="TensorRT 10.4.0 cannot load engine .*Version tag does not match") as caught:
        backend_for(engine_path, None, newer).activate()
    assert REBUILD_COMMAND in str(caught.value)
    assert "not checked against this device" in caplog.text


def test_missing_engine_names_the_build_command(tmp_path, gpu):
    with pytest.raises(BundleError, match=f"missing; rebuild the engines on this device: {REBUILD_COMMAND}"):
        backend_for(tmp_path / "nothing.engine", None, gpu).activate()


def test_cuda_failure_during_run_carries_the_error_name(mlp, gpu):
    _, engine_path, key = mlp
    trt, cudart = gpu
    with backend_for(engine_path, key, gpu) as backend:
        cudart.fail("cudaMemcpyAsync", cudaError_t.cudaErrorLaunchFailure)
        with pytest.raises(CudaError, match="cudaMemcpyAsync failed with cudaErrorLaunchFailure"):
            backend.run(1)
        assert backend.run(1)["y"].shape == (1, 3)  # the failure was the call's, not the context's


def test_tensorrt_refusing_to_run_is_a_backend_error(mlp, gpu):
    _, engine_path, key = mlp
    trt, cudart = gpu
    with backend_for(engine_path, key, gpu) as backend:
        backend._context.set_tensor_address("y", 0)  # as if an address had been lost
        with pytest.raises(BackendError, match=r"could not run .*no address set for \['y'\]"):
            backend.run(1)


# ---- real GPU ----


@pytest.mark.gpu
def test_real_tensorrt_matches_onnxruntime(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    runtime = real_cuda_runtime()
    onnx_path, engine_path, key = make_engine(tmp_path, trt, runtime)
    x = np.random.default_rng(9).standard_normal((5, 4)).astype(np.float32)
    with TensorRTBackend(engine_path, key, X, Y, max_batch=8, trt=trt, cudart=runtime,
                         cuda_graph_batch=5) as backend:
        backend.input("x")[:5] = x
        for _ in range(2):
            np.testing.assert_allclose(backend.run(5)["y"], ort_run(onnx_path, {"x": x})["y"], rtol=1e-3, atol=1e-4)


def test_tensorrt_8_is_refused_at_activation(mlp):
    _, engine_path, key = mlp
    rt = FakeCudaRuntime()
    with pytest.raises(BackendError, match=r"TensorRT 8.6.2 is too old: .*JetPack 6.1\+"):
        TensorRTBackend(engine_path, key, X, Y, max_batch=8, trt=make_fake_tensorrt("8.6.2", cudart=rt),
                        cudart=rt).activate()
