"""Calibrate once, quantize twice, on tiny graphs exported from PyTorch: a conv net shaped like the vision
encoder (uint8 NHWC in, Cast/Div/Sub/Div inside, Conv+BN folded, ReLU6 as Clip, Conv, Relu, global pool,
Gemm) and a head shaped like the policy head (MatMul, LayerNorm, Relu, a dropout-mask input, Tanh, Gemm,
Softmax). Every graph is run on ONNX Runtime's CPU provider and compared with FP32."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from build_engines import quantize
from build_engines.layout import LayoutError, verify_cpu_layout, verify_tensorrt_layout
from build_engines.quantize import (
    calibrate,
    convert_fp16,
    quantize_dynamic_int8,
    quantize_for_cpu,
    quantize_for_tensorrt,
)
from calibration.ranges import TensorRanges
from edge.errors import ConfigError, InputError

torch = pytest.importorskip("torch")
nn = torch.nn

METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_FEEDS = 24
MIN_COSINE = 0.98
SIDE = 24  # frame side in pixels
MASK_WIDTH, MC_SAMPLES = 32, 8


class TinyVision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        self.register_buffer("mean", torch.tensor([0.45, 0.45, 0.40]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.23, 0.22, 0.22]).view(1, 3, 1, 1))

    def forward(self, image):  # uint8 [N, H, W, 3]
        x = image.float().permute(0, 3, 1, 2) / 255.0  # cast first, as TensorRT requires of a uint8 input
        x = (x - self.mean) / self.std
        x = nn.functional.relu6(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class TinyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(20, MASK_WIDTH) * 0.3)
        self.b1 = nn.Parameter(torch.randn(MASK_WIDTH) * 0.1)
        self.norm = nn.LayerNorm(MASK_WIDTH)
        self.w2 = nn.Parameter(torch.randn(MASK_WIDTH, 4) * 0.3)
        self.gate = nn.Linear(MASK_WIDTH, 3)

    def forward(self, features, proprio, mask):  # [1, 16], [1, 4], [T, width]
        h = torch.relu(self.norm(torch.cat([features, proprio], -1) @ self.w1 + self.b1)) * mask
        return torch.tanh(h @ self.w2), torch.softmax(self.gate(h), -1)


class TinyEncoder(nn.Module):
    """Token ids -> embedding -> two Linear layers on [N, L, C] (MatMul + Add) -> LayerNorm -> mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.inner = nn.Linear(32, 64)
        self.outer = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        x = self.norm(x + self.outer(nn.functional.gelu(self.inner(x))))
        mask = attention_mask.to(x.dtype)[..., None]
        return (x * mask).sum(1) / mask.sum(1)


def export(module, args, path: Path, inputs, outputs, dynamic=None) -> Path:
    module.eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and what the build uses
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=17,
                          dynamic_axes=dynamic, dynamo=False)
    return path


def frames(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Smooth random BGR frames: upsampled noise, closer to camera images than white noise."""
    return [cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (SIDE, SIDE),
                       interpolation=cv2.INTER_CUBIC)[None] for _ in range(count)]


def vision_feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    return [{"image": f} for f in frames(np.random.default_rng(seed), count)]


def head_feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{
        "features": rng.uniform(-1.5, 1.5, (1, 16)).astype(np.float32),  # bounded, like pooled features
        "proprio": rng.uniform(-1, 1, (1, 4)).astype(np.float32),
        "mask": (rng.random((MC_SAMPLES, MASK_WIDTH)) > 0.2).astype(np.float32) / 0.8,
    } for _ in range(count)]


FEEDS = {"vision": vision_feeds, "head": head_feeds}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fp32")
    torch.manual_seed(0)
    vision = TinyVision()
    with torch.no_grad():  # a BatchNorm with non-trivial statistics, folded into the Conv by the export
        vision.bn1.running_mean.uniform_(-0.3, 0.3)
        vision.bn1.running_var.uniform_(0.5, 2.0)
        vision.fc.bias.zero_()  # so the logits are mostly input-dependent, not a constant bias vector
    return {
        "vision": export(vision, (torch.zeros(1, SIDE, SIDE, 3, dtype=torch.uint8),), folder / "vision.onnx",
                         ["image"], ["features"], {"image": {0: "n"}, "features": {0: "n"}}),
        "head": export(TinyHead(), (torch.zeros(1, 16), torch.zeros(1, 4), torch.ones(MC_SAMPLES, MASK_WIDTH)),
                       folder / "head.onnx", ["features", "proprio", "mask"], ["actions", "gate"],
                       {"mask": {0: "t"}, "actions": {0: "t"}, "gate": {0: "t"}}),
        "encoder": export(TinyEncoder(), (torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64)),
                          folder / "encoder.onnx", ["input_ids", "attention_mask"], ["embedding"]),
    }


@pytest.fixture(scope="module")
def built(graphs, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Each graph calibrated once per method; each calibration quantized for TensorRT and for the CPU."""
    out = tmp_path_factory.mktemp("int8")
    results = {}
    for name in ("vision", "head"):
        for method in METHODS:
            workdir = out / f"work_{name}_{method}"
            # Entropy's KL search is quadratic in bins; 256 keeps the test fast, the build default is 2048.
            ranges = calibrate(graphs[name], FEEDS[name](1, CALIBRATION_FEEDS), method, workdir,
                               chunk_size=10, num_bins=256 if method == "entropy" else None)
            trt = quantize_for_tensorrt(graphs[name], ranges, out / f"{name}_{method}_trt.onnx")
            cpu = quantize_for_cpu(graphs[name], ranges, out / f"{name}_{method}_cpu.onnx")
            results[(name, method)] = {"ranges": ranges, "trt": trt, "cpu": cpu, "workdir": workdir}
    return results


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # x86 CPUs without VNNI saturate 16-bit sums in ORT's fast u8s8 kernels; this selects exact kernels
    # there, so the comparison measures the quantization, not this machine's CPU.
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def worst_cosine(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Per output, the cosine between FP32 and candidate over all held-out feeds, after subtracting the
    FP32 mean output; the worst output's value.

    Centring removes what every input shares (for a tiny random net, mostly the biases), which would make
    any two outputs look alike; what is compared is the part that depends on the input.
    """
    fp32, other = session(reference), session(candidate)
    want = [fp32.run(None, feed) for feed in feeds]
    got = [other.run(None, feed) for feed in feeds]
    worst = 1.0
    for index in range(len(want[0])):
        expected = np.stack([w[index] for w in want]).astype(np.float64)
        actual = np.stack([g[index] for g in got]).astype(np.float64)
        centre = expected.mean(axis=0)
        spread = np.linalg.norm(expected - centre) / np.linalg.norm(expected)
        assert spread > 0.05, "held-out inputs give near-identical outputs: the comparison would be empty"
        worst = min(worst, cosine(expected - centre, actual - centre))
    return worst


CASES = [(name, method) for name in ("vision", "head") for method in METHODS]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_calibration_gives_graph_ordered_ranges_for_every_activation(graphs, built, name, method):
    ranges = built[(name, method)]["ranges"]
    assert ranges.method == method and ranges.sample_count == CALIBRATION_FEEDS
    model = onnx.load(str(graphs[name]))
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            assert node.input[0] in ranges, f"no range for the input of {node.name}"
    if method == "minmax":
        assert not ranges.histograms
    else:
        assert set(ranges.histograms) == set(ranges.ranges)
        assert ranges.settings["num_bins"] == (256 if method == "entropy" else 2048)
    if name == "vision":  # ReLU6's output lies in [0, 6]; the uint8 frame cast to float in [0, 255]
        clip = next(n for n in model.graph.node if n.op_type == "Clip")
        low, high = ranges[clip.output[0]]
        assert 0.0 <= low < high <= 6.0
        cast = next(n for n in model.graph.node if n.op_type == "Cast")
        low, high = ranges[cast.output[0]]
        assert 0.0 <= low < 100.0 < high <= 255.0
    assert not list(built[(name, method)]["workdir"].glob("*.onnx")), "augmented graph left in workdir"


@pytest.mark.parametrize(("name", "method"), CASES)
def test_tensorrt_graph_has_the_layout_and_matches_fp32(graphs, built, name, method):
    path = built[(name, method)]["trt"]
    onnx.checker.check_model(str(path))
    report = verify_tensorrt_layout(path, graphs[name])
    compute = [n for n in onnx.load(str(graphs[name])).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(report.quantized_nodes) == len(compute) and report.per_channel_weights == len(compute)
    assert report.activation_counts == report.reference_activation_counts
    assert worst_cosine(graphs[name], path, FEEDS[name](99, 8)) >= MIN_COSINE


@pytest.mark.parametrize(("name", "method"), CASES)
def test_cpu_graph_has_the_layout_and_matches_fp32(graphs, built, name, method):
    path = built[(name, method)]["cpu"]
    onnx.checker.check_model(str(path))
    report = verify_cpu_layout(path)
    assert report.quantized_nodes and report.per_channel_weights == len(report.quantized_nodes)
    assert worst_cosine(graphs[name], path, FEEDS[name](99, 8)) >= MIN_COSINE
    with pytest.raises(LayoutError, match="zero point"):  # uint8 asymmetric is not TensorRT's layout
        verify_tensorrt_layout(path)


def test_same_ranges_give_identical_graphs_also_after_a_json_round_trip(graphs, built, tmp_path):
    ranges = built[("vision", "percentile")]["ranges"]
    reloaded = TensorRanges.load(ranges.save(tmp_path / "ranges.json"))
    assert reloaded == ranges
    for make in (quantize_for_tensorrt, quantize_for_cpu):
        first = make(graphs["vision"], ranges, tmp_path / "first.onnx").read_bytes()
        second = make(graphs["vision"], reloaded, tmp_path / "second.onnx").read_bytes()
        assert first == second, f"{make.__name__} is not deterministic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.onnx", "ranges.json", "second.onnx"]


def test_layout_check_rejects_a_broken_copy_of_a_real_tensorrt_graph(graphs, built, tmp_path):
    """Asymmetric activation zero point, per-tensor weight and int32 bias, in ORT's own Q/DQ output."""
    model = onnx.load(str(built[("vision", "minmax")]["trt"]))
    inits = {i.name: i for i in model.graph.initializer}
    q_node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    inits[q_node.input[2]].CopyFrom(numpy_helper.from_array(np.array(1, np.int8), q_node.input[2]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    scale = numpy_helper.to_array(inits[weight_dq.input[1]])
    inits[weight_dq.input[1]].CopyFrom(numpy_helper.from_array(np.array(scale.max(), np.float32),
                                                               weight_dq.input[1]))
    inits[weight_dq.input[2]].CopyFrom(numpy_helper.from_array(np.array(0, np.int8), weight_dq.input[2]))
    del weight_dq.attribute[:]
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = numpy_helper.to_array(inits[gemm.input[2]])
    model.graph.initializer.extend([
        numpy_helper.from_array(np.round(bias / 1e-4).astype(np.int32), "bias_q"),
        numpy_helper.from_array(np.full(bias.shape, 1e-4, np.float32), "bias_scale"),
        numpy_helper.from_array(np.zeros(bias.shape, np.int32), "bias_zp"),
    ])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["bias_q", "bias_scale", "bias_zp"],
                                                ["bias_dq"], name="fc_bias_DequantizeLinear", axis=0))
    gemm.input[2] = "bias_dq"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(LayoutError) as caught:
        verify_tensorrt_layout(broken, graphs["vision"])
    message = str(caught.value)
    assert f"QuantizeLinear '{q_node.name}' has zero point 1" in message
    assert f"DequantizeLinear '{weight_dq.name}' (weight of Conv '{conv.name}') is per-tensor" in message
    assert "DequantizeLinear 'fc_bias_DequantizeLinear' is an int32 DequantizeLinear" in message


def test_quantization_metadata_records_layout_and_calibration(built):
    model = onnx.load(str(built[("head", "entropy")]["trt"]))
    recorded = {p.key: p.value for p in model.metadata_props}
    assert '"calibration_method": "entropy"' in recorded[quantize.METADATA_QUANTIZATION]
    assert '"activations": "int8 symmetric"' in recorded[quantize.METADATA_QUANTIZATION]


def test_cpu_graph_in_qoperator_format(graphs, built, tmp_path):
    ranges = built[("vision", "minmax")]["ranges"]
    path = quantize_for_cpu(graphs["vision"], ranges, tmp_path / "vision_qop.onnx", quant_format="qoperator")
    report = verify_cpu_layout(path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops and len(report.quantized_nodes) >= 2
    assert worst_cosine(graphs["vision"], path, vision_feeds(99, 8)) >= MIN_COSINE
    with pytest.raises(ConfigError, match="quant_format"):
        quantize_for_cpu(graphs["vision"], ranges, tmp_path / "x.onnx", quant_format="int4")


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_reduce_range_weights_stay_within_7_bits_and_match_fp32(graphs, built, tmp_path, quant_format):
    """7-bit weights keep a u8 x s7 pair sum inside int16 (the fast kernels' accumulator without VNNI)."""
    for name in ("vision", "head"):
        ranges = built[(name, "minmax")]["ranges"]
        path = quantize_for_cpu(graphs[name], ranges, tmp_path / f"{name}_rr.onnx", quant_format=quant_format,
                                reduce_range=True)
        report = verify_cpu_layout(path, max_weight=64)
        assert len(report.quantized_nodes) >= 2
        assert worst_cosine(graphs[name], path, FEEDS[name](99, 8)) >= MIN_COSINE
        recorded = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert "reduce_range" in recorded[quantize.METADATA_QUANTIZATION]
    # the full-range graph uses weights up to 127: the bound catches a graph that was not reduced
    with pytest.raises(LayoutError, match="within \\+-64"):
        verify_cpu_layout(built[("vision", "minmax")]["cpu"], max_weight=64)
    with pytest.raises(ConfigError, match="reduce_range"):
        quantize_for_cpu(graphs["vision"], ranges, tmp_path / "x.onnx", reduce_range="yes")


def test_qoperator_summarises_the_integer_tensors_it_leaves_unquantized(tmp_path, caplog):
    """Shape arithmetic (int64) into a Concat: ONNX Runtime's QOperator quantizer leaves it alone, and its
    one multi-line root-logger warning per tensor becomes one line of the step's log."""
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    tail = numpy_helper.from_array(np.array([1], np.int64), "tail")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
         helper.make_node("Shape", ["y"], ["shape"], name="shape"),
         helper.make_node("Concat", ["shape", "tail"], ["dims"], name="concat", axis=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("dims", TensorProto.INT64, [3])], [weight, tail])
    path = tmp_path / "shape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    rng = np.random.default_rng(0)
    ranges = calibrate(path, [{"x": rng.normal(size=(1, 4)).astype(np.float32)} for _ in range(8)], "minmax",
                       tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="build_engines.quantize"):  # an earlier build may set it to WARNING
        out = quantize_for_cpu(path, ranges, tmp_path / "qop.onnx", quant_format="qoperator")
    assert not [r for r in caplog.records if "Inference failed" in r.getMessage()]
    [line] = [r.getMessage() for r in caplog.records if "non-float tensors" in r.getMessage()]
    assert "'shape'" not in line and "shape" in line and line.startswith("quantize_for_cpu: ")
    assert logging.getLogger().filters == []  # the filter is gone after the step
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QLinearMatMul" in ops and "Concat" in ops


def test_excluded_nodes_stay_float_and_are_documented_for_the_layout_check(graphs, built, tmp_path):
    ranges = built[("vision", "minmax")]["ranges"]
    gemm = next(n.name for n in onnx.load(str(graphs["vision"])).graph.node if n.op_type == "Gemm")
    path = quantize_for_tensorrt(graphs["vision"], ranges, tmp_path / "excluded.onnx", nodes_to_exclude=[gemm])
    report = verify_tensorrt_layout(path, graphs["vision"])
    assert report.unquantized_nodes == (gemm,) and report.excluded_nodes == (gemm,)
    with pytest.raises(ConfigError, match="no_such_node"):
        quantize_for_tensorrt(graphs["vision"], ranges, tmp_path / "x.onnx", nodes_to_exclude=["no_such_node"])


def test_quantize_steps_log_start_and_duration(graphs, built, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="build_engines.quantize"):
        quantize_for_tensorrt(graphs["head"], built[("head", "minmax")]["ranges"], tmp_path / "h.onnx")
    messages = [r.getMessage() for r in caplog.records if r.name == "build_engines.quantize"]
    assert any(m.startswith("quantize_for_tensorrt: start") for m in messages)
    assert any(m.startswith("quantize_for_tensorrt: done in ") and " s " in m for m in messages)


def test_ranges_of_another_graph_are_refused_and_the_old_output_kept(graphs, built, tmp_path):
    out = tmp_path / "head_trt.onnx"
    out.write_bytes(b"previous build")
    with pytest.raises(InputError, match="have no range for .* tensors that head.onnx quantizes"):
        quantize_for_tensorrt(graphs["head"], built[("vision", "minmax")]["ranges"], out)
    assert out.read_bytes() == b"previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head_trt.onnx"]


def test_calibration_input_errors(graphs, tmp_path):
    model = graphs["vision"]
    with pytest.raises(ConfigError, match="calibration method"):
        calibrate(model, vision_feeds(0, 2), "kl-divergence", tmp_path)
    with pytest.raises(InputError, match=r"missing \['image'\], unexpected \['img'\]"):
        calibrate(model, [{"img": vision_feeds(0, 1)[0]["image"]}], "minmax", tmp_path)
    with pytest.raises(InputError, match=r"input 'image' is float32 \[1, 24, 24, 3\], the graph expects uint8"):
        calibrate(model, [{"image": np.zeros((1, SIDE, SIDE, 3), np.float32)}], "minmax", tmp_path)
    with pytest.raises(InputError, match="no calibration feeds"):
        calibrate(model, iter([]), "percentile", tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        calibrate(tmp_path / "nope.onnx", vision_feeds(0, 1), "minmax", tmp_path)
    assert not list(tmp_path.glob("*.onnx")), "a failed calibration left graphs behind"


def test_dynamic_int8_encoder_runs_and_matches_fp32(graphs, tmp_path):
    path = quantize_dynamic_int8(graphs["encoder"], tmp_path / "encoder_int8.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(int8_weights) >= 2
    rng = np.random.default_rng(5)
    feeds = [{"input_ids": rng.integers(0, 50, (1, 8), dtype=np.int64),
              "attention_mask": np.ones((1, 8), np.int64)} for _ in range(4)]
    assert worst_cosine(graphs["encoder"], path, feeds) >= MIN_COSINE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder_int8.onnx"]


@pytest.mark.parametrize("name", ["vision", "head"])
def test_fp16_graph_has_fp32_io_fp16_weights_and_matches(graphs, tmp_path, name):
    result = convert_fp16(graphs[name], tmp_path / f"{name}_fp16.onnx")
    assert result.kept_fp32_op_types == ()
    fp32_model, model = onnx.load(str(graphs[name])), onnx.load(str(result.path))
    onnx.checker.check_model(model)
    io_types = [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]
    assert io_types == [(v.name, v.type.tensor_type.elem_type)
                        for v in [*fp32_model.graph.input, *fp32_model.graph.output]]
    assert all(t in (TensorProto.FLOAT, TensorProto.UINT8) for _, t in io_types)
    float_inits = [i for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert float_inits and all(i.data_type == TensorProto.FLOAT16 for i in float_inits)
    fp32, fp16 = session(graphs[name]), session(result.path)
    for feed in FEEDS[name](7, 4):
        for want, got in zip(fp32.run(None, feed), fp16.run(None, feed), strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * float(np.abs(want).max()))


def test_fp16_keeps_ops_without_a_cpu_kernel_in_fp32(graphs, tmp_path, monkeypatch):
    """When ORT reports an op type it cannot run in FP16, that type is converted again as FP32."""
    asked = []

    def tanh_has_no_fp16_kernel(model):
        blocked = all(n.op_type != "Tanh" or _reads_fp32(model, n) for n in model.graph.node)
        asked.append(blocked)
        return None if blocked else "Tanh"

    monkeypatch.setattr(quantize, "_missing_cpu_kernel", tanh_has_no_fp16_kernel)
    result = convert_fp16(graphs["head"], tmp_path / "head_fp16.onnx")
    assert asked == [False, True] and result.kept_fp32_op_types == ("Tanh",)
    model = onnx.load(str(result.path))
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    assert _reads_fp32(model, tanh)
    metadata = {p.key: p.value for p in model.metadata_props}[quantize.METADATA_FP16]
    assert '"kept_fp32_op_types": ["Tanh"]' in metadata
    fp32, fp16 = session(graphs["head"]), session(result.path)
    feed = head_feeds(3, 1)[0]
    np.testing.assert_allclose(fp16.run(None, feed)[0], fp32.run(None, feed)[0], atol=2e-2)


def _reads_fp32(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """True when the node's input is produced by a Cast to float (the converter's guard for blocked ops)."""
    producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
    return producer is not None and producer.op_type == "Cast" and any(
        a.name == "to" and a.i == TensorProto.FLOAT for a in producer.attribute)
