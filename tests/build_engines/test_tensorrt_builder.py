"""The engine builder against the fake TensorRT 10.x and 11.x: call order and precision flags found by
feature detection, profiles, the persistent timing cache, parser and build failures, the engine key,
saving, and verification against reference outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from build_engines import tensorrt_builder
from build_engines.tensorrt_builder import (
    BuildError,
    Tolerance,
    build_engine,
    engine_key_for,
    save_engine,
    tensorrt_status,
    verify_engine,
)
from edge import fileio
from edge.errors import BundleError
from edge.inference.backends.base import TensorSpec
from edge.inference.engine_key import EngineKey, file_sha256, key_path
from tests.fakes.conftest_fakes import (
    fake_gpu,
    fp16_model,
    head_model,
    image_model,
    mlp_model,
    ort_run,
    qdq_model,
)
from tests.fakes.fake_cuda import FakeCudaRuntime
from tests.fakes.fake_tensorrt import fake_plan_header, make_fake_tensorrt

PROFILE = {"x": ((1, 4), (4, 4), (8, 4))}
X = (TensorSpec("x", "float32", (-1, 4)),)
Y = (TensorSpec("y", "float32", (-1, 3)),)

BUILD_ORDER = [
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "OnnxParser",
    "OnnxParser.parse",
    "Builder.create_optimization_profile",
    "IOptimizationProfile.set_shape",
    "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "Builder.build_serialized_network",
    "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize",
]


def build(tmp_path: Path, trt, precision: str, graph=mlp_model, cache: Path | None = None, **kwargs) -> bytes:
    onnx_path = graph(tmp_path / f"{graph.__name__}.onnx")
    return build_engine(onnx_path, precision=precision, profile=kwargs.pop("profile", PROFILE),
                        timing_cache_path=cache if cache is not None else tmp_path / "timing.cache", trt=trt,
                        **kwargs)


def calls(trt, name: str) -> list[tuple]:
    return [args for call, args in trt.fake.calls if call == name]


@pytest.mark.parametrize(
    ("version", "precision", "graph", "flags", "network_flags", "strongly_typed"),
    [
        ("10.3.0", "fp32", mlp_model, [], 0, False),
        ("10.3.0", "fp16", mlp_model, ["FP16"], 0, False),
        ("10.3.0", "int8", qdq_model, ["INT8", "FP16"], 0, False),
        # 10.12+: weak typing deprecated, so strongly typed as on 11 (precision from the graph)
        ("10.12.0", "fp32", mlp_model, [], 1 << 1, True),
        ("10.12.0", "fp16", fp16_model, [], 1 << 1, True),
        ("10.12.0", "int8", qdq_model, [], 1 << 1, True),
        ("11.0.0", "fp32", mlp_model, [], 1 << 1, True),
        ("11.0.0", "fp16", fp16_model, [], 1 << 1, True),
        ("11.0.0", "int8", qdq_model, [], 1 << 1, True),
    ],
)
def test_call_order_and_precision_by_version(tmp_path, version, precision, graph, flags, network_flags,
                                             strongly_typed):
    trt, _ = fake_gpu(version)
    engine = build(tmp_path, trt, precision, graph)
    names = trt.fake.call_names()
    assert [n for n in names if n != "IBuilderConfig.set_flag"] == BUILD_ORDER
    assert [args[0] for args in calls(trt, "IBuilderConfig.set_flag")] == flags
    if flags:  # precision flags go on the config before the graph is parsed into the network
        assert names.index("IBuilderConfig.set_flag") < names.index("OnnxParser.parse")
    assert calls(trt, "Builder.create_network") == [(network_flags,)]
    assert calls(trt, "IBuilderConfig.set_memory_pool_limit") == [("WORKSPACE", 1024 << 20)]
    header = fake_plan_header(engine)
    assert header["strongly_typed"] is strongly_typed
    assert header["builder_flags"] == sorted(flags)
    assert header["tensorrt_version"] == version


def test_tensorrt_11_has_no_precision_flags_to_set():
    trt11 = make_fake_tensorrt("11.0.0")
    assert not hasattr(trt11.BuilderFlag, "FP16") and not hasattr(trt11.BuilderFlag, "INT8")
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not tensorrt_builder.weakly_typed(trt11)
    assert tensorrt_builder.weakly_typed(make_fake_tensorrt("10.3.0"))


def test_parse_gets_the_model_path_so_external_weights_resolve(tmp_path):
    trt, _ = fake_gpu()
    onnx_path = mlp_model(tmp_path / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                          location="external.weights", size_threshold=0)
    assert (tmp_path / "external.weights").is_file()
    engine = build_engine(onnx_path, precision="fp32", profile=PROFILE, timing_cache_path=None, trt=trt)
    assert calls(trt, "OnnxParser.parse")[0][1] == str(onnx_path)
    assert fake_plan_header(engine)["inputs"] == [["x", 0, [-1, 4]]]


def test_workspace_size_is_passed_in_bytes(tmp_path):
    trt, _ = fake_gpu()
    engine = build(tmp_path, trt, "fp32", workspace_mib=256)
    assert fake_plan_header(engine)["workspace_bytes"] == 256 << 20


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_int8_needs_a_qdq_graph(tmp_path, version):
    trt, _ = fake_gpu(version)
    with pytest.raises(BuildError, match="no QuantizeLinear/DequantizeLinear nodes"):
        build(tmp_path, trt, "int8", mlp_model)
    assert "Builder" not in trt.fake.call_names()


def test_fp16_on_tensorrt_11_needs_an_fp16_graph(tmp_path):
    trt, _ = fake_gpu("11.0.0")
    with pytest.raises(BuildError, match="takes precision from the graph .* no FP16 tensors"):
        build(tmp_path, trt, "fp16", mlp_model)


def test_unknown_precision_is_refused(tmp_path):
    trt, _ = fake_gpu()
    with pytest.raises(BuildError, match="precision must be one of"):
        build(tmp_path, trt, "int4")


# ---- profiles ----


def test_profile_covers_every_sample_count_from_one_to_max(tmp_path):
    trt, cudart = fake_gpu()
    onnx_path = head_model(tmp_path / "head.onnx")
    profile = {"mask": ((1, 8), (16, 8), (32, 8))}
    engine = build_engine(onnx_path, precision="fp16", profile=profile, timing_cache_path=None, trt=trt)
    assert calls(trt, "IOptimizationProfile.set_shape") == [("mask", (1, 8), (16, 8), (32, 8))]
    assert fake_plan_header(engine)["profiles"] == [{"mask": [[1, 8], [16, 8], [32, 8]]}]
    features = np.full((1, 8), 0.5, np.float32)
    inputs = (TensorSpec("features", "float32", (1, 8)), TensorSpec("mask", "float32", (-1, 8)))
    outputs = (TensorSpec("actions", "float32", (-1, 2)),)
    from edge.inference.backends.tensorrt import TensorRTBackend

    (tmp_path / "head.engine").write_bytes(engine)
    with TensorRTBackend(tmp_path / "head.engine", None, inputs, outputs, max_batch=32, trt=trt,
                         cudart=cudart) as backend:
        backend.input("features")[:] = features
        mask = np.random.default_rng(3).random((32, 8)).astype(np.float32)
        backend.input("mask")[:] = mask
        for samples in range(1, 33):
            expected = ort_run(onnx_path, {"features": features, "mask": mask[:samples]})["actions"]
            np.testing.assert_allclose(backend.run(samples)["actions"], expected, rtol=1e-6, atol=1e-6)


def test_dynamic_input_without_a_profile_is_refused(tmp_path):
    trt, _ = fake_gpu()
    with pytest.raises(BuildError, match=r"inputs \['x'\] have dynamic dimensions"):
        build(tmp_path, trt, "fp32", profile={})


def test_profile_for_an_unknown_input_is_refused(tmp_path):
    trt, _ = fake_gpu()
    with pytest.raises(BuildError, match=r"profile names \['image'\]"):
        build(tmp_path, trt, "fp32", profile={**PROFILE, "image": ((1, 3), (1, 3), (1, 3))})


def test_inconsistent_profile_shapes_are_refused_by_tensorrt(tmp_path):
    trt, _ = fake_gpu()
    with pytest.raises(BuildError, match="rejected the optimisation profile .*min <= opt <= max"):
        build(tmp_path, trt, "fp32", profile={"x": ((8, 4), (4, 4), (1, 4))})


# ---- timing cache ----


def test_timing_cache_is_created_then_reused(tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    trt, _ = fake_gpu()
    build(tmp_path, trt, "fp16", cache=cache)
    assert calls(trt, "IBuilderConfig.create_timing_cache") == [(b"",)]
    assert trt.fake.last_build["timing_cache_misses"] == 3 and trt.fake.last_build["timing_cache_hits"] == 0
    first = cache.read_bytes()
    assert first

    trt, _ = fake_gpu()  # a new process: only the file carries the timings over
    build(tmp_path, trt, "fp16", cache=cache)
    assert calls(trt, "IBuilderConfig.create_timing_cache") == [(first,)]
    assert calls(trt, "IBuilderConfig.set_timing_cache") == [(False,)]  # ignore_mismatch=False
    assert trt.fake.last_build["timing_cache_hits"] == 3 and trt.fake.last_build["timing_cache_misses"] == 0


def test_timing_cache_is_written_atomically(tmp_path, monkeypatch):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"")
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst), Path(src).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)  # the builder writes through edge.fileio
    trt, _ = fake_gpu()
    build(tmp_path, trt, "fp32", cache=cache)
    assert len(replaced) == 1
    src, dst, data = replaced[0]
    assert dst == cache and src.parent == cache.parent and src != cache
    assert data == cache.read_bytes() and data.startswith(b"FAKE-TRT-TIMING-CACHE")
    assert not src.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp_model.onnx", "timing.cache"]


def test_failed_build_leaves_the_timing_cache_alone(tmp_path):
    cache = tmp_path / "timing.cache"
    trt, _ = fake_gpu()
    build(tmp_path, trt, "fp32", cache=cache)
    before = cache.read_bytes()
    trt, _ = fake_gpu()
    trt.fake.build_failure = "Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)"
    with pytest.raises(BuildError):
        build(tmp_path, trt, "fp16", cache=cache)
    assert cache.read_bytes() == before


def test_cache_from_another_device_or_corrupt_is_replaced(tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    other = make_fake_tensorrt("10.3.0", cudart=FakeCudaRuntime(compute_capability=(8, 6)))
    build(tmp_path, other, "fp32", cache=cache)
    trt, _ = fake_gpu()
    with caplog.at_level(logging.WARNING):
        build(tmp_path, trt, "fp32", cache=cache)
    assert "made by another TensorRT or GPU" in caplog.text
    assert b'"compute_capability": "8.7"' in cache.read_bytes()

    cache.write_bytes(b"not a timing cache")
    trt, _ = fake_gpu()
    with caplog.at_level(logging.WARNING):
        build(tmp_path, trt, "fp32", cache=cache)
    assert "is unreadable" in caplog.text
    assert cache.read_bytes().startswith(b"FAKE-TRT-TIMING-CACHE")


# ---- failures ----


def test_parse_failure_lists_every_error(tmp_path):
    trt, _ = fake_gpu(unsupported_ops=("MatMul", "Relu"))
    with pytest.raises(BuildError) as caught:
        build(tmp_path, trt, "fp32")
    message = str(caught.value)
    assert "rejected" in message and "mlp_model.onnx" in message
    assert "node 0 (matmul, MatMul): UNSUPPORTED_NODE: No importer registered for op: MatMul" in message
    assert "node 2 (relu, Relu): UNSUPPORTED_NODE: No importer registered for op: Relu" in message
    assert "Builder.build_serialized_network" not in trt.fake.call_names()


def test_parse_failure_on_a_file_that_is_not_onnx(tmp_path):
    trt, _ = fake_gpu()
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(BuildError, match="node -1: MODEL_DESERIALIZE_FAILED"):
        build_engine(tmp_path / "broken.onnx", precision="fp32", profile={}, timing_cache_path=None, trt=trt)


def test_build_returning_none_raises_with_tensorrt_errors(tmp_path):
    trt, _ = fake_gpu()
    trt.fake.build_failure = "Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)"
    with pytest.raises(BuildError, match="failed to build mlp_model.onnx .*OutOfMemory"):
        build(tmp_path, trt, "fp16")


def test_missing_graph_is_refused(tmp_path):
    trt, _ = fake_gpu()
    with pytest.raises(BuildError, match="does not exist"):
        build_engine(tmp_path / "none.onnx", precision="fp32", profile={}, timing_cache_path=None, trt=trt)


# ---- key, save, status ----


def test_engine_key_for_this_device(tmp_path):
    trt, cudart = fake_gpu("10.3.0", compute_capability=(8, 7))
    onnx_path = mlp_model(tmp_path / "m.onnx")
    key = engine_key_for(onnx_path, "fp16", trt, cudart)
    assert key == EngineKey(file_sha256(onnx_path), "10.3.0", "8.7", "fp16", "Orin (fake)", "16")


def test_save_engine_writes_the_engine_and_its_key(tmp_path):
    key = EngineKey("c" * 64, "10.3.0", "8.7", "int8")
    path = save_engine(b"engine bytes", key, tmp_path / "engines" / "vision.int8.engine")
    assert path.read_bytes() == b"engine bytes"
    assert EngineKey.load(key_path(path)) == key


def test_tensorrt_status_says_what_is_missing():
    trt, cudart = fake_gpu()
    assert tensorrt_status(trt, cudart) == (True, "TensorRT 10.3.0, GPU compute capability 8.7")
    available, reason = tensorrt_status(trt, FakeCudaRuntime(device_count=0))
    assert not available and "cudaErrorNoDevice" in reason and "\n" not in reason
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        available, reason = tensorrt_status()
        assert not available and "--system-site-packages" in reason and "\n" not in reason


# ---- verification ----


def test_verify_engine_accepts_matching_outputs_and_refuses_others(tmp_path):
    trt, cudart = fake_gpu()
    onnx_path = mlp_model(tmp_path / "m.onnx")
    engine = build_engine(onnx_path, precision="fp16", profile=PROFILE, timing_cache_path=None, trt=trt)
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    reference = ort_run(onnx_path, {"x": x})
    key = engine_key_for(onnx_path, "fp16", trt, cudart)
    report = verify_engine(engine, {"x": x}, reference, Tolerance(atol=1e-3, rtol=1e-2), input_specs=X,
                           output_specs=Y, key=key, trt=trt, cudart=cudart)
    assert report.passed and report.batch == 6 and report.outputs[0].within
    assert report.outputs[0].max_abs_error < 1e-5

    wrong = {"y": reference["y"] + 0.5}
    with pytest.raises(BuildError, match=r"y: max \|err\| 0.5 \(OUT OF TOLERANCE\)"):
        verify_engine(engine, {"x": x}, wrong, {"y": Tolerance(atol=1e-3, rtol=1e-2)}, input_specs=X,
                      output_specs=Y, trt=trt, cudart=cudart)
    with pytest.raises(BuildError, match=r"reference outputs lack \['y'\]"):
        verify_engine(engine, {"x": x}, {}, Tolerance(1e-3, 1e-2), input_specs=X, output_specs=Y, trt=trt,
                      cudart=cudart)
    assert cudart.live_allocations()["device"] == 0


def test_verify_engine_with_a_key_runs_the_device_check(tmp_path):
    trt, cudart = fake_gpu()
    onnx_path = mlp_model(tmp_path / "m.onnx")
    engine = build_engine(onnx_path, precision="fp32", profile=PROFILE, timing_cache_path=None, trt=trt)
    stale = EngineKey(file_sha256(onnx_path), "10.2.0", "8.7", "fp32")
    x = np.ones((1, 4), np.float32)
    with pytest.raises(BundleError, match="TensorRT version: engine 10.2.0, required 10.3.0"):
        verify_engine(engine, {"x": x}, ort_run(onnx_path, {"x": x}), Tolerance(1e-3, 1e-2), input_specs=X,
                      output_specs=Y, key=stale, trt=trt, cudart=cudart)


IMAGE_PROFILE = {"image": ((1, 4, 4, 3), (1, 4, 4, 3), (1, 4, 4, 3))}


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_the_old_uint8_graph_fails_tensorrts_parser_and_the_cast_first_one_builds(tmp_path, version):
    trt, cudart = fake_gpu(version)
    logger = trt.Logger(trt.Logger.WARNING)
    old = image_model(tmp_path / "old.onnx", cast_first=False)
    network = trt.Builder(logger).create_network(tensorrt_builder._network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(old.read_bytes(), str(old))
    error = parser.get_error(0)
    assert (error.node_name(), error.node_operator(), error.code().name) == ("to_nchw", "Transpose", "UNSUPPORTED_NODE")
    assert error.desc() == "TensorRT does not support UINT8 types for intermediate tensors!"
    # build_engine names the problem before the parser is reached
    with pytest.raises(BuildError, match=r"uint8 input 'image' feeds Transpose 'to_nchw'"):
        build_engine(old, precision="fp16", profile=IMAGE_PROFILE, timing_cache_path=None, trt=trt)

    new = image_model(tmp_path / "new.onnx")
    engine = build_engine(new, precision="fp32", profile=IMAGE_PROFILE, timing_cache_path=None, trt=trt)
    image = np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
    verify_engine(engine, {"image": image}, ort_run(new, {"image": image}), Tolerance(1e-5, 1e-5),
                  input_specs=(TensorSpec("image", "uint8", (-1, 4, 4, 3)),),
                  output_specs=(TensorSpec("features", "float32", (-1, 2)),), trt=trt, cudart=cudart)


def _edited_qdq(tmp_path: Path, edit) -> Path:
    import onnx
    from onnx import numpy_helper

    path = qdq_model(tmp_path / "qdq.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        value = edit(init.name, numpy_helper.to_array(init))
        if value is not None:
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(model, str(path))
    return path


def test_the_fake_parser_refuses_a_nonzero_zero_point(tmp_path):
    trt, _ = fake_gpu("10.3.0")
    path = _edited_qdq(tmp_path, lambda name, v: np.array(3, np.int8) if name == "x_zero" else None)
    with pytest.raises(BuildError, match=r"quant_x, QuantizeLinear\): INVALID_NODE: TensorRT only supports "
                                         r"symmetric quantization"):
        build_engine(path, precision="int8", profile=PROFILE, timing_cache_path=None, trt=trt)


def test_the_fake_builder_refuses_per_channel_activation_scales(tmp_path):
    trt, _ = fake_gpu("10.3.0")

    def per_channel(name, value):
        if name == "x_scale":
            return np.full(4, 0.05, np.float32)
        return np.zeros(4, np.int8) if name == "x_zero" else None

    path = _edited_qdq(tmp_path, per_channel)
    with pytest.raises(BuildError, match=r"per-channel quantization of activation tensor 'x' is not supported"):
        build_engine(path, precision="int8", profile=PROFILE, timing_cache_path=None, trt=trt)


def test_an_op_tensorrt_has_no_importer_for_is_refused_by_the_fake(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["picked"], name="nms")],
                              "nms", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
                                      helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("picked", TensorProto.INT64, [4, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nms.onnx"))
    with pytest.raises(BuildError, match=r"No importer registered for op: NonMaxSuppression"):
        build_engine(tmp_path / "nms.onnx", precision="fp32", profile={}, timing_cache_path=None,
                     trt=fake_gpu("10.3.0")[0])


def test_tensorrt_8_is_refused_naming_jetpack_6_1(tmp_path):
    trt8 = make_fake_tensorrt("8.6.2")
    with pytest.raises(BuildError, match=r"TensorRT 8.6.2 is too old: .*JetPack 6.1\+"):
        build(tmp_path, trt8, "fp32")
    assert "Builder" not in trt8.fake.call_names()
    available, reason = tensorrt_status(trt8, FakeCudaRuntime())  # the full build skips engines, saying why
    assert not available and "JetPack 6.1+" in reason
    # what the refusal spares the user: the 8.x parser refuses the implicit-batch network create_network(0) gives
    logger = trt8.Logger()
    parser = trt8.OnnxParser(trt8.Builder(logger).create_network(0), logger)
    path = mlp_model(tmp_path / "m.onnx")
    assert not parser.parse(path.read_bytes(), str(path))
    assert "explicit batch dimension" in parser.get_error(0).desc()
