"""The rules TensorRT's ONNX parser and builder apply to a graph, for the fake TensorRT.

Each rule cites where TensorRT states it. Sources read: onnx/onnx-tensorrt at commit 96e7811 (the
parser of TensorRT 10: ``ModelImporter.cpp``, ``onnxOpImporters.cpp``, ``docs/operators.md``), the
TensorRT developer guide ("Explicit Quantization") and NVIDIA/TensorRT issue 3985.

``parser_errors(model)`` gives the errors ``OnnxParser.parse`` reports, in node order, at most one per
node (TensorRT 10's parser checks every node statically, ``parseNodeStaticCheck``, and reports them all); ``builder_errors(model)`` those the builder
logs for a parsed network (quantization rules checked when layers are fused, not when imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_T = TensorProto
_FLOATS = {_T.FLOAT, _T.FLOAT16, _T.BFLOAT16}
_FLOATS_INTS = _FLOATS | {_T.INT32, _T.INT64}
_MOVEMENT = _FLOATS_INTS | {_T.BOOL}

# docs/operators.md ("Operator Support Matrix", TensorRT 10.0): the types each op accepts, for the ops a
# policy bundle's graphs use (vision CNN, BERT encoder, MLP head, their Q/DQ and FP16 forms). An op not
# listed fails as an op without importer. "UINT8 is only supported as network input or output tensor
# types", so UINT8 is in no list but Cast's.
SUPPORTED_TYPES: dict[str, set[int]] = {
    "Abs": _FLOATS_INTS, "Add": _FLOATS_INTS, "ArgMax": _FLOATS_INTS,
    "Cast": _MOVEMENT | {_T.UINT8},
    "Clip": _FLOATS, "Concat": _MOVEMENT, "Constant": _MOVEMENT, "ConstantOfShape": _MOVEMENT,
    "Conv": _FLOATS, "DequantizeLinear": {_T.INT8}, "Div": _FLOATS_INTS, "Equal": _FLOATS_INTS,
    "Erf": _FLOATS, "Exp": _FLOATS, "Expand": _MOVEMENT, "Flatten": _MOVEMENT,
    "Gather": _MOVEMENT, "Gemm": _FLOATS, "GlobalAveragePool": _FLOATS, "Greater": _FLOATS_INTS,
    "HardSigmoid": _FLOATS, "HardSwish": _FLOATS,
    "Identity": _MOVEMENT, "LayerNormalization": _FLOATS, "Less": _FLOATS_INTS, "Log": _FLOATS,
    "MatMul": _FLOATS, "Max": _FLOATS_INTS, "Min": _FLOATS_INTS, "Mul": _FLOATS_INTS,
    "Neg": _FLOATS_INTS, "Not": {_T.BOOL}, "Pow": _FLOATS, "QuantizeLinear": _FLOATS,
    "Range": _FLOATS_INTS, "ReduceL2": _FLOATS_INTS, "ReduceMean": _FLOATS_INTS,
    "ReduceSum": _FLOATS_INTS, "Relu": _FLOATS_INTS, "Reshape": _MOVEMENT, "Shape": _MOVEMENT,
    "Sigmoid": _FLOATS, "Slice": _MOVEMENT, "Softmax": _FLOATS, "Softplus": _FLOATS,
    "Split": _MOVEMENT, "Sqrt": _FLOATS, "Squeeze": _MOVEMENT, "Sub": _FLOATS_INTS, "Tanh": _FLOATS,
    "Tile": _MOVEMENT, "Transpose": _MOVEMENT, "Unsqueeze": _MOVEMENT, "Where": _MOVEMENT,
    "BatchNormalization": _FLOATS, "AveragePool": _FLOATS, "MaxPool": _FLOATS,
    "ReduceMax": _FLOATS_INTS, "Dropout": _FLOATS, "Pad": _FLOATS_INTS, "Ceil": _FLOATS, "Floor": _FLOATS,
    "Round": _FLOATS, "Reciprocal": _FLOATS, "Sign": _FLOATS_INTS, "ReduceProd": _FLOATS_INTS,
    "Einsum": _FLOATS,
}


@dataclass(frozen=True)
class RuleError:
    code: str  # an ErrorCode member name
    desc: str
    node: int = -1
    node_name: str = ""
    op: str = ""


def _typed(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor (inputs, initializers, inferred intermediates)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in model.graph.node:  # Constant nodes: the type of their value
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def parser_errors(model: onnx.ModelProto, unsupported_ops: set[str] = frozenset()) -> list[RuleError]:
    types = _typed(model)
    constants = _constants(model)
    errors = []
    for index, node in enumerate(model.graph.node):
        error = _node_error(node, types, constants, {value.name for value in model.graph.output}, unsupported_ops)
        if error is not None:
            code, desc = error
            errors.append(RuleError(code, desc, index, node.name, node.op_type))
    return errors


def _node_error(node: onnx.NodeProto, types: dict[str, int], constants: dict[str, np.ndarray],
                graph_outputs: set[str], unsupported_ops: set[str]) -> tuple[str, str] | None:
    if node.op_type in unsupported_ops or node.op_type not in SUPPORTED_TYPES or node.domain not in ("", "ai.onnx"):
        # onnxOpImporters / ModelImporter.cpp: an op without a builtin importer is tried as a plugin.
        return ("UNSUPPORTED_NODE", f"No importer registered for op: {node.op_type}. Attempting to import as "
                "plugin. Plugin not found, are the plugin name, version, and namespace correct?")
    for output in node.output:
        # ModelImporter.cpp (parseNode, after the importer ran): "UINT8 is only allowed as network inputs and
        # outputs", so a node producing a UINT8 tensor that is not a graph output fails; a data-movement op
        # (Transpose, Reshape) on a uint8 input fails this way (NVIDIA/TensorRT issue 3985).
        if output and types.get(output) == _T.UINT8 and output not in graph_outputs:
            return ("UNSUPPORTED_NODE", "TensorRT does not support UINT8 types for intermediate tensors!")
    data = node.input[0] if node.input else ""
    if data and data in types and types[data] not in SUPPORTED_TYPES[node.op_type]:
        # docs/operators.md: each op's "Supported Types"; the importers check the input's type.
        supported = ", ".join(sorted(TensorProto.DataType.Name(t) for t in SUPPORTED_TYPES[node.op_type]))
        return ("UNSUPPORTED_NODE_DATATYPE", f"{node.op_type} does not support input '{data}' of type "
                f"{TensorProto.DataType.Name(types[data])}; supported: {supported}")
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        problem = _qdq_problem(node, constants)
        if problem:
            return ("INVALID_NODE", problem)
    return None


def _qdq_problem(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str | None:
    """onnxOpImporters.cpp, QuantDequantLinearHelper."""
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is not None:
        if scale.size == 0:
            return "Cannot have scale with no coefficients."
        if not np.all(scale > 0):
            return "Scale coefficients must all be positive"
    if len(node.input) > 2 and node.input[2]:
        zero_point = constants.get(node.input[2])
        if zero_point is not None:
            # "TensorRT only supports symmetric quantization" (a UINT8 zero point is read as INT8, with a warning).
            if np.any(zero_point != 0):
                return ("TensorRT only supports symmetric quantization. The zero point for the "
                        "QuantizeLinear/DequantizeLinear operator must be all zeros.")
            if scale is not None and zero_point.size != scale.size:
                return (f"The scale and zero point must have the same volume. Size of zero point = "
                        f"{zero_point.size}, size of the scale = {scale.size}.")
    return None


def builder_errors(model: onnx.ModelProto) -> list[str]:
    """Build-time rules on a parsed network."""
    constants = _constants(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    errors = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        data = node.input[0]
        if node.op_type == "DequantizeLinear" and data in producers and producers[data].op_type == "QuantizeLinear":
            data = producers[data].input[0]
        scale = constants.get(node.input[1])
        if data not in constants and scale is not None and scale.size != 1:
            # TensorRT developer guide, "Explicit Quantization": activations are quantized per-tensor only;
            # per-channel scales are for weights (onnxOpImporters.cpp: "Activations-quantization does not
            # support per-axis quantization").
            errors.append(f"Error Code 4: Internal Error ({node.op_type} {node.name or node.output[0]}: "
                          f"per-channel quantization of activation tensor '{data}' is not supported; "
                          "activations are quantized per-tensor)")
    return errors
