"""The layout checks against Q/DQ graphs built by hand with onnx.helper: one with exactly TensorRT's layout,
and copies broken one way at a time (or all at once) that must be rejected with the node named."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from build_engines.layout import (
    METADATA_QUANTIZATION,
    LayoutError,
    LayoutReport,
    verify_cpu_layout,
    verify_tensorrt_layout,
)
from edge.errors import BundleError

RNG = np.random.default_rng(0)
CONV_W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # [C_out, C_in, kH, kW]
GEMM_W = RNG.standard_normal((5, 4)).astype(np.float32)  # transB=1: [N, K]
MATMUL_W = RNG.standard_normal((5, 6)).astype(np.float32)  # [K, N]
BIAS_CONV = RNG.standard_normal(4).astype(np.float32)
BIAS_GEMM = RNG.standard_normal(5).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int, dtype=np.int8):
    """Symmetric per-channel int8: one scale per slice along ``axis``."""
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    scale = (np.abs(moved).max(axis=1) / 127.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(dtype)
    return q, scale


class Builder:
    """x [1,3,8,8] -> Q/DQ -> Conv(+bias) -> Relu -> GlobalAveragePool -> Flatten -> Q/DQ -> Gemm(+bias)
    -> Q/DQ -> MatMul -> y [1,6]; or without any Q/DQ (the FP32 reference)."""

    def __init__(self, quantized: bool = True, act_zero_point: int = 0, act_zp_dtype=np.int8,
                 conv_weight_per_tensor: bool = False, conv_weight_axis: int = 0, conv_declared_axis=None,
                 matmul_weight_axis: int = 1,
                 int32_conv_bias: bool = False, relu: bool = True, quantize_gemm_input: bool = True) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.q = quantized
        self.act_zero_point, self.act_zp_dtype = act_zero_point, act_zp_dtype
        x = self.activation("x", "x_q")
        w_conv = self.weight("conv_w", CONV_W, conv_weight_axis, per_tensor=conv_weight_per_tensor,
                             declared_axis=conv_declared_axis)
        b_conv = self.init("conv_b", BIAS_CONV)
        if quantized and int32_conv_bias:
            scale = np.full(4, 0.001, np.float32)
            self.init("conv_b_q", np.round(BIAS_CONV / scale).astype(np.int32))
            self.init("conv_b_scale", scale)
            self.init("conv_b_zp", np.zeros(4, np.int32))
            self.nodes.append(helper.make_node("DequantizeLinear", ["conv_b_q", "conv_b_scale", "conv_b_zp"],
                                               ["conv_b_dq"], name="conv_b_DequantizeLinear", axis=0))
            b_conv = "conv_b_dq"
        self.nodes.append(helper.make_node("Conv", [x, w_conv, b_conv], ["conv_out"], name="conv", pads=[1] * 4))
        last = "conv_out"
        if relu:
            self.nodes.append(helper.make_node("Relu", [last], ["relu_out"], name="relu"))
            last = "relu_out"
        self.nodes.append(helper.make_node("GlobalAveragePool", [last], ["pool_out"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool_out"], ["flat"], name="flatten"))
        gemm_in = self.activation("flat", "flat_q") if quantize_gemm_input else "flat"
        w_gemm = self.weight("gemm_w", GEMM_W, 0)
        self.nodes.append(helper.make_node("Gemm", [gemm_in, w_gemm, self.init("gemm_b", BIAS_GEMM)],
                                           ["gemm_out"], name="gemm", transB=1))
        mm_in = self.activation("gemm_out", "gemm_out_q")
        w_mm = self.weight("mm_w", MATMUL_W, matmul_weight_axis)
        self.nodes.append(helper.make_node("MatMul", [mm_in, w_mm], ["y"], name="matmul"))

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def activation(self, tensor: str, prefix: str) -> str:
        if not self.q:
            return tensor
        self.init(f"{prefix}_scale", np.array(0.05, np.float32))
        self.init(f"{prefix}_zp", np.array(self.act_zero_point, self.act_zp_dtype))
        inputs = [tensor, f"{prefix}_scale", f"{prefix}_zp"]
        self.nodes.append(helper.make_node("QuantizeLinear", inputs, [f"{prefix}_int"], name=f"{prefix}_Quantize"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_int", *inputs[1:]], [f"{prefix}_dq"],
                                           name=f"{prefix}_Dequantize"))
        return f"{prefix}_dq"

    def weight(self, name: str, value: np.ndarray, channel_axis: int, per_tensor: bool = False,
               declared_axis: int | None = None) -> str:
        """Quantized along ``channel_axis``; the DQ node says ``declared_axis`` (default: the same)."""
        if not self.q:
            return self.init(name, value)
        q, scale = quantize_weight(value, channel_axis)
        if per_tensor:
            scale = np.array(scale.max(), np.float32)
        self.init(f"{name}_q", q)
        self.init(f"{name}_scale", scale)
        self.init(f"{name}_zp", np.zeros(scale.shape, np.int8))
        attrs = {} if per_tensor else {"axis": channel_axis if declared_axis is None else declared_axis}
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                                           [f"{name}_dq"], name=f"{name}_DequantizeLinear", **attrs))
        return f"{name}_dq"

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


@pytest.fixture
def fp32_path(tmp_path):
    path = tmp_path / "fp32.onnx"
    onnx.save(Builder(quantized=False).model(), str(path))
    return path


def save(tmp_path, model: onnx.ModelProto, name: str = "int8.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def test_a_graph_with_tensorrts_layout_passes_and_runs(tmp_path, fp32_path):
    model = Builder().model()
    onnx.checker.check_model(model)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.25 * np.abs(want).max(), "the hand-built Q/DQ graph is not the FP32 one"
    report = verify_tensorrt_layout(save(tmp_path, model), fp32_path)
    assert isinstance(report, LayoutReport)
    assert report.quantized_nodes == ("conv", "gemm", "matmul") and report.unquantized_nodes == ()
    assert report.per_channel_weights == 3 and report.quantize_linear == 3 and report.dequantize_linear == 6
    assert report.activation_counts == {"Relu": 1, "Clip": 0} == report.reference_activation_counts
    json.dumps(report.to_dict())  # goes into the manifest
    assert verify_tensorrt_layout(model).model == "graph 'tiny'"  # a ModelProto works as well


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (dict(act_zero_point=3), r"QuantizeLinear 'x_q_Quantize' has zero point 3; TensorRT needs symmetric"),
        (dict(act_zp_dtype=np.uint8, act_zero_point=128), r"QuantizeLinear 'x_q_Quantize' has a uint8 zero point"),
        (dict(conv_weight_per_tensor=True),
         r"DequantizeLinear 'conv_w_DequantizeLinear' \(weight of Conv 'conv'\) is per-tensor .* 4 values along "
         r"axis 0"),
        (dict(conv_weight_axis=1), r"'conv_w_DequantizeLinear' .* has 3 scales for 4 channels along axis 0"),
        (dict(conv_declared_axis=-3),  # -3 of a 4-D weight is axis 1, the input channels
         r"'conv_w_DequantizeLinear' \(weight of Conv 'conv'\) quantizes along axis 1; the output channels are on "
         r"axis 0"),
        (dict(matmul_weight_axis=0), r"'mm_w_DequantizeLinear' \(weight of MatMul 'matmul'\) has 5 scales for 6 "
                                     r"channels along axis 1"),
        (dict(int32_conv_bias=True), r"DequantizeLinear 'conv_b_DequantizeLinear' is an int32 DequantizeLinear"),
        (dict(quantize_gemm_input=False), r"Gemm 'gemm' input 0 \('flat'\) is not fed by DequantizeLinear"),
        (dict(relu=False), r"the graph has 0 Relu nodes, the FP32 graph 1"),
    ],
)
def test_each_break_of_the_tensorrt_layout_is_named(tmp_path, fp32_path, broken, expected):
    with pytest.raises(LayoutError, match=expected) as caught:
        verify_tensorrt_layout(save(tmp_path, Builder(**broken).model()), fp32_path)
    assert "rebuild the INT8 graphs with build_engines --int8" in str(caught.value)


def test_all_violations_are_listed_at_once(tmp_path, fp32_path):
    model = Builder(act_zero_point=5, conv_weight_per_tensor=True, int32_conv_bias=True).model()
    with pytest.raises(LayoutError) as caught:
        verify_tensorrt_layout(save(tmp_path, model), fp32_path)
    error = caught.value
    assert isinstance(error, BundleError)
    assert any("'x_q_Quantize' has zero point 5" in v for v in error.violations)
    assert any("'x_q_Dequantize' has zero point 5" in v for v in error.violations)
    assert any("'conv_w_DequantizeLinear'" in v and "per-tensor" in v for v in error.violations)
    assert any("'conv_b_DequantizeLinear' is an int32" in v for v in error.violations)
    assert any("'conv_b_DequantizeLinear' feeds the bias of Conv 'conv'" in v for v in error.violations)
    assert str(error).count("\n  - ") == len(error.violations) >= 5


def test_documented_exclusions_are_allowed_and_reported(tmp_path, fp32_path):
    model = Builder(quantize_gemm_input=False).model()
    report = verify_tensorrt_layout(save(tmp_path, model), fp32_path, excluded_nodes=["gemm"])
    assert report.unquantized_nodes == ("gemm",) and report.excluded_nodes == ("gemm",)
    entry = model.metadata_props.add()  # build_engines.quantize records its exclusions in the graph
    entry.key, entry.value = METADATA_QUANTIZATION, json.dumps({"excluded_nodes": ["gemm"]})
    assert verify_tensorrt_layout(save(tmp_path, model, "recorded.onnx")).excluded_nodes == ("gemm",)
    with pytest.raises(LayoutError, match="excluded node 'no_such_node' is not in the graph"):
        verify_tensorrt_layout(save(tmp_path, Builder().model()), excluded_nodes=["no_such_node"])


def test_an_fp32_graph_is_not_an_int8_graph(fp32_path):
    with pytest.raises(LayoutError, match="no Conv/Gemm/MatMul has quantized inputs"):
        verify_tensorrt_layout(fp32_path)
    with pytest.raises(LayoutError, match="no Conv/Gemm/MatMul has quantized inputs"):
        verify_cpu_layout(fp32_path)


def test_cpu_layout_wants_uint8_activations_and_int8_weights(tmp_path):
    cpu = Builder(act_zp_dtype=np.uint8, act_zero_point=128, int32_conv_bias=True).model()
    report = verify_cpu_layout(save(tmp_path, cpu))  # int32 biases are fine on the CPU
    assert report.quantized_nodes == ("conv", "gemm", "matmul") and report.per_channel_weights == 3
    with pytest.raises(LayoutError, match=r"QuantizeLinear 'x_q_Quantize' quantizes an activation to int8"):
        verify_cpu_layout(save(tmp_path, Builder().model(), "trt.onnx"))  # TensorRT's symmetric int8


def test_cpu_layout_rejects_uint8_weights(tmp_path):
    model = Builder(act_zp_dtype=np.uint8, act_zero_point=128).model()
    for init in model.graph.initializer:  # re-type the Conv weight and its zero point as uint8
        if init.name in ("conv_w_q", "conv_w_zp"):
            values = numpy_helper.to_array(init).astype(np.int16) + (128 if init.name == "conv_w_q" else 0)
            init.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), init.name))
    with pytest.raises(LayoutError, match=r"'conv_w_DequantizeLinear' gives Conv 'conv' uint8 weights"):
        verify_cpu_layout(save(tmp_path, model))


def test_unreadable_graphs_are_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="cannot read ONNX graph"):
        verify_tensorrt_layout(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 definitely not protobuf \xff" * 10)
    with pytest.raises(BundleError, match="garbage.onnx"):
        verify_cpu_layout(garbage)


def test_a_uint8_input_must_feed_only_a_cast(tmp_path):
    from build_engines.layout import TensorRTGraphError, verify_tensorrt_graph
    from tests.fakes.conftest_fakes import image_model

    verify_tensorrt_graph(image_model(tmp_path / "cast_first.onnx"))  # the order TensorRT parses
    old = image_model(tmp_path / "old.onnx", cast_first=False)
    with pytest.raises(TensorRTGraphError) as caught:
        verify_tensorrt_graph(old)
    assert caught.value.violations == (
        "uint8 input 'image' feeds Transpose 'to_nchw'; TensorRT accepts a uint8 input only when it feeds a Cast "
        "directly",)
    assert "cast to float first" in str(caught.value) and isinstance(caught.value, BundleError)


def test_an_activation_scale_must_be_per_tensor(tmp_path, fp32_path):
    model = Builder().model()
    for init in model.graph.initializer:  # the input's Q/DQ made per-channel (3 input channels)
        if init.name == "x_q_scale":
            init.CopyFrom(numpy_helper.from_array(np.full(3, 0.05, np.float32), init.name))
        elif init.name == "x_q_zp":
            init.CopyFrom(numpy_helper.from_array(np.zeros(3, np.int8), init.name))
    with pytest.raises(LayoutError, match=r"QuantizeLinear 'x_q_Quantize' quantizes an activation with 3 scales "
                                          r"\(shape \[3\]\); TensorRT needs one per-tensor scale"):
        verify_tensorrt_layout(save(tmp_path, model), fp32_path)
