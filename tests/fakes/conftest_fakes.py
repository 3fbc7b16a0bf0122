"""Helpers shared by the TensorRT tests: tiny ONNX graphs made on the fly, a fake GPU (TensorRT + CUDA
runtime fakes wired together) and onnxruntime as the reference. Imported explicitly by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge.inference.backends.onnxruntime import session_options
from tests.fakes.fake_cuda import FakeCudaRuntime
from tests.fakes.fake_tensorrt import make_fake_tensorrt

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.17+ reads it; newer onnx writes a higher one by default


def fake_gpu(version: str = "10.3.0", *, compute_capability: tuple[int, int] = (8, 7),
             unsupported_ops: tuple[str, ...] = ()):
    """A fake TensorRT of `version` running on a fake CUDA GPU of `compute_capability`."""
    cudart = FakeCudaRuntime(compute_capability=compute_capability)
    trt = make_fake_tensorrt(version, cudart=cudart, unsupported_ops=unsupported_ops)
    return trt, cudart


def _save(graph: onnx.GraphProto, path: Path, **save_args) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path), **save_args)
    return path


def mlp_model(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 0, **save_args) -> Path:
    """y = relu(x @ W + b), x [N, in_dim] float32 with a dynamic N."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    bias = rng.standard_normal(out_dim).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["pre"], name="add"),
            helper.make_node("Relu", ["pre"], ["y"], name="relu"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _save(graph, path, **save_args)


def head_model(path: Path, width: int = 8, actions: int = 2, seed: int = 1) -> Path:
    """A policy head in miniature: features [1, width] (static) times T dropout masks [T, width]
    (dynamic T), then relu(. @ W) -> actions [T, actions]."""
    weight = np.random.default_rng(seed).standard_normal((width, actions)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["features", "mask"], ["dropped"], name="dropout_mask"),
            helper.make_node("MatMul", ["dropped", "W"], ["pre"], name="matmul"),
            helper.make_node("Relu", ["pre"], ["actions"], name="relu"),
        ],
        "head",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, width]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["T", width]),
        ],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["T", actions])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)


def qdq_model(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 2) -> Path:
    """The MLP explicitly quantized as TensorRT wants it: symmetric int8 (zero point 0), per-channel
    weights, quantized MatMul input, Relu kept, bias not quantized."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    weight_scale = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    weight_q = np.clip(np.round(weight / weight_scale), -127, 127).astype(np.int8)
    bias = rng.standard_normal(out_dim).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="quant_x"),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dequant_x"),
            helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zero"], ["W_dq"], name="dequant_w", axis=1),
            helper.make_node("MatMul", ["x_dq", "W_dq"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["pre"], name="add"),
            helper.make_node("Relu", ["pre"], ["y"], name="relu"),
        ],
        "mlp_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
            numpy_helper.from_array(weight_q, "W_q"),
            numpy_helper.from_array(weight_scale, "W_scale"),
            numpy_helper.from_array(np.zeros(out_dim, np.int8), "W_zero"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    return _save(graph, path)


def fp16_model(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 3) -> Path:
    """The MLP with FP16 written into the graph (as TensorRT 11 needs), float32 at its edges."""
    weight = np.random.default_rng(seed).standard_normal((in_dim, out_dim)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x16"], name="to_fp16", to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["x16", "W"], ["pre"], name="matmul"),
            helper.make_node("Relu", ["pre"], ["y16"], name="relu"),
            helper.make_node("Cast", ["y16"], ["y"], name="to_fp32", to=TensorProto.FLOAT),
        ],
        "mlp_fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference: the same graph on onnxruntime's CPU provider."""
    session = ort.InferenceSession(str(path), session_options(ort, threads=1), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def image_model(path: Path, *, cast_first: bool = True, size: int = 4, seed: int = 4) -> Path:
    """A vision encoder's preprocessing in miniature: uint8 BGR [N, size, size, 3] -> float [N, 2].

    ``cast_first`` (what TensorRT parses): Cast, then Transpose to NCHW and Gather BGR -> RGB.
    ``cast_first=False`` is the order TensorRT refuses (the old reference encoder): Transpose and Gather
    on uint8, then Cast.
    """
    weight = np.random.default_rng(seed).standard_normal((3, 2)).astype(np.float32)
    cast = helper.make_node("Cast", ["image" if cast_first else "rgb"], ["as_float" if cast_first else "rgb_f"],
                            name="to_float", to=TensorProto.FLOAT)
    source = "as_float" if cast_first else "image"
    layout = [
        helper.make_node("Transpose", [source], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Gather", ["nchw", "bgr_to_rgb"], ["rgb"], name="bgr_to_rgb", axis=1),
    ]
    nodes = [cast, *layout] if cast_first else [*layout, cast]
    rgb = "rgb" if cast_first else "rgb_f"
    nodes += [
        helper.make_node("Sub", [rgb, "mean"], ["centred"], name="centre"),
        helper.make_node("Div", ["centred", "std"], ["normalised"], name="scale"),
        helper.make_node("GlobalAveragePool", ["normalised"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "W"], ["features"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "image_prep",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr_to_rgb"),
         numpy_helper.from_array(np.array(127.0, np.float32), "mean"),
         numpy_helper.from_array(np.array(128.0, np.float32), "std"),
         numpy_helper.from_array(weight, "W")],
    )
    return _save(graph, path)
