"""Check that an INT8 graph has the layout its target needs, listing every violation by node.

TensorRT (docs/architecture.md, "Decisions: explicit quantization") compiles an explicitly quantized
graph and takes precision from it, so its graph must be exactly: symmetric int8 Q/DQ (every zero point
0), per-channel weight scales along the output-channel axis, float biases (no int32 DequantizeLinear),
both inputs of every Conv/Gemm/MatMul fed by DequantizeLinear (unless the node is a documented
exclusion), activation (non-constant) Q/DQ scales per-tensor, and Relu/Clip kept as in the FP32 graph.
Every graph meant for TensorRT, FP16 as well as INT8 (``verify_tensorrt_graph``), must also feed each
uint8 graph input only into Cast nodes: TensorRT has uint8 only as a network input or output
(onnx-tensorrt ``ModelImporter.cpp`` refuses any node with a uint8 output that is not a graph output,
"TensorRT does not support UINT8 types for intermediate tensors!"; NVIDIA/TensorRT issue 3985: "All UINT8
inputs must directly feed into a cast layer", even Reshape/Transpose).
The CPU graph (docs/architecture.md, "Decisions: one calibration, several CPU candidates") must use
uint8 activations and int8 weights. A graph that breaks its layout raises ``LayoutError``
(``build_engines.errors``), with every violation listed.

The checks read only the ONNX graph (no ONNX Runtime), so they can run wherever a bundle is inspected.
Documented exclusions are node names passed in, plus those ``build_engines.quantize`` recorded in the
graph's metadata (key ``vla_edge.quantization``, field ``excluded_nodes``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from build_engines.errors import LayoutError
from edge.errors import BundleError

logger = logging.getLogger(__name__)

METADATA_QUANTIZATION = "vla_edge.quantization"
COMPUTE_OP_TYPES = ("Conv", "Gemm", "MatMul")
KEPT_ACTIVATIONS = ("Relu", "Clip")
# Quantized compute ops of ONNX Runtime's QOperator and dynamic formats.
_QOPERATOR_COMPUTE = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                      "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@dataclass(frozen=True)
class LayoutReport:
    """What a passing graph looks like, for the build log and the manifest."""

    model: str
    target: str  # "tensorrt" or "cpu"
    quantized_nodes: tuple[str, ...]  # Conv/Gemm/MatMul (or QOperator equivalents) with int8 inputs
    unquantized_nodes: tuple[str, ...]  # Conv/Gemm/MatMul left float
    excluded_nodes: tuple[str, ...]  # documented exclusions
    quantize_linear: int
    dequantize_linear: int
    per_channel_weights: int
    activation_counts: Mapping[str, int] = field(default_factory=dict)
    reference_activation_counts: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "quantized_nodes": list(self.quantized_nodes),
            "unquantized_nodes": list(self.unquantized_nodes),
            "excluded_nodes": list(self.excluded_nodes),
            "quantize_linear": self.quantize_linear,
            "dequantize_linear": self.dequantize_linear,
            "per_channel_weights": self.per_channel_weights,
            "activation_counts": dict(self.activation_counts),
            "reference_activation_counts": (None if self.reference_activation_counts is None
                                            else dict(self.reference_activation_counts)),
        }

    def summary(self) -> str:
        return (f"{self.model}: {self.target} INT8 layout ok: {len(self.quantized_nodes)} quantized "
                f"Conv/Gemm/MatMul, {len(self.unquantized_nodes)} float, {self.per_channel_weights} "
                f"per-channel weights, {self.quantize_linear} QuantizeLinear, {self.dequantize_linear} "
                f"DequantizeLinear, activations {dict(self.activation_counts)}")


class TensorRTGraphError(LayoutError):
    """A graph meant for TensorRT (FP16 or INT8) that TensorRT's ONNX parser would refuse."""

    def __init__(self, model: str, violations: list[str]) -> None:
        super().__init__(model, "TensorRT", violations)
        listed = "\n".join(f"  - {v}" for v in self.violations)
        Exception.__init__(self, f"{model} cannot be parsed by TensorRT ({len(self.violations)} violations):\n"
                                 f"{listed}\nexport the policy so that each uint8 input is cast to float first "
                                 "(cast, then layout and normalisation), then rebuild the bundle")


def verify_tensorrt_graph(model_path: str | os.PathLike[str] | onnx.ModelProto) -> None:
    """Raise TensorRTGraphError unless every uint8 graph input feeds only Cast nodes.

    Applies to every graph TensorRT compiles (FP16, FP32 and INT8); the INT8 layout check includes it.
    """
    graph = _Graph(model_path)
    violations = _uint8_input_problems(graph)
    if violations:
        raise TensorRTGraphError(graph.description, violations)


def _uint8_input_problems(graph: _Graph) -> list[str]:
    # TensorRT has UINT8 only as network I/O (onnx-tensorrt docs/operators.md: "UINT8 is only supported as
    # network input or output tensor types"); only Cast consumes it (NVIDIA/TensorRT issue 3985).
    problems = []
    for value in graph.model.graph.input:
        if value.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            continue
        for consumer, _ in graph.consumers.get(value.name, []):
            if consumer.op_type != "Cast":
                problems.append(f"uint8 input '{value.name}' feeds {consumer.op_type} '{graph.label(consumer)}'; "
                                "TensorRT accepts a uint8 input only when it feeds a Cast directly")
    return problems


def verify_tensorrt_layout(
    model_path: str | os.PathLike[str] | onnx.ModelProto,
    fp32_reference: str | os.PathLike[str] | onnx.ModelProto | None = None,
    *,
    excluded_nodes: Iterable[str] = (),
) -> LayoutReport:
    """Raise LayoutError listing every way the graph breaks the TensorRT INT8 layout; else report on it."""
    graph = _Graph(model_path)
    excluded = graph.exclusions(excluded_nodes)
    violations = [f"excluded node '{name}' is not in the graph" for name in excluded if name not in graph.names]
    violations += _uint8_input_problems(graph)

    for node in graph.qdq_nodes:
        who = f"{node.op_type} '{graph.label(node)}'"
        if node.domain not in ("", "ai.onnx"):
            violations.append(f"{who} is in domain '{node.domain}'; TensorRT parses only the standard ONNX op")
        violations += graph.scale_problems(node, who)
        scale = graph.constant(node.input[1]) if len(node.input) > 1 else None
        if graph.weight_of(node) is None and scale is not None and scale.size != 1:
            # onnx-tensorrt QuantDequantLinearHelper: "Activations-quantization does not support per-axis
            # quantization" (a scale of more than one value is taken as a weight's per-channel scale).
            violations.append(f"{who} quantizes an activation with {scale.size} scales (shape "
                              f"{list(scale.shape)}); TensorRT needs one per-tensor scale for activations")
        zero_point = graph.zero_point(node)
        if zero_point is None:
            violations.append(f"{who} has no constant zero point (a missing one means uint8); "
                              "TensorRT needs an int8 zero point of 0")
            continue
        if zero_point.dtype == np.int32:
            violations.append(f"{who} is an int32 DequantizeLinear (a quantized bias); TensorRT layout keeps "
                              "biases float")
        elif zero_point.dtype != np.int8:
            violations.append(f"{who} has a {zero_point.dtype} zero point; TensorRT needs int8")
        if np.any(zero_point != 0):
            violations.append(f"{who} has zero point {_show(zero_point)}; TensorRT needs symmetric "
                              "quantization (zero point 0)")

    per_channel = 0
    for node in graph.nodes_of("DequantizeLinear"):
        weight = graph.weight_of(node)
        if weight is None:
            continue
        who = f"DequantizeLinear '{graph.label(node)}'"
        for consumer, index in graph.consumers.get(node.output[0], []):
            if consumer.op_type in ("Conv", "Gemm") and index == 2:
                violations.append(f"{who} feeds the bias of {consumer.op_type} '{graph.label(consumer)}'; "
                                  "TensorRT layout keeps biases float")
                continue
            expected = _weight_axis(consumer, index, weight.ndim)
            if expected is None:
                continue
            problem = graph.per_channel_problem(node, weight, expected)
            if problem:
                violations.append(f"{who} (weight of {consumer.op_type} '{graph.label(consumer)}') {problem}")
            else:
                per_channel += 1

    quantized, unquantized = [], []
    for node in graph.nodes_of(*COMPUTE_OP_TYPES):
        name = graph.label(node)
        if name in excluded:
            unquantized.append(name)
            continue
        float_inputs = [i for i in range(min(2, len(node.input))) if not graph.fed_by_dq(node.input[i])]
        if float_inputs:
            unquantized.append(name)
            violations += [f"{node.op_type} '{name}' input {i} ('{node.input[i]}') is not fed by "
                           "DequantizeLinear" for i in float_inputs]
        else:
            quantized.append(name)
    if not quantized:
        violations.append("no Conv/Gemm/MatMul has quantized inputs: the graph is not INT8")

    counts = graph.activation_counts()
    reference_counts = None
    if fp32_reference is not None:
        reference_counts = _Graph(fp32_reference).activation_counts()
        for op_type in KEPT_ACTIVATIONS:
            if counts[op_type] != reference_counts[op_type]:
                violations.append(f"the graph has {counts[op_type]} {op_type} nodes, the FP32 graph "
                                  f"{reference_counts[op_type]}; TensorRT layout keeps every Relu/Clip")

    return _passed_or_raise(graph, "tensorrt", violations, quantized, unquantized, excluded, per_channel,
                            counts, reference_counts)


def verify_cpu_layout(
    model_path: str | os.PathLike[str] | onnx.ModelProto,
    *,
    excluded_nodes: Iterable[str] = (),
    max_weight: int | None = None,
) -> LayoutReport:
    """Raise LayoutError unless activations are uint8 and Conv/Gemm/MatMul weights int8 (QDQ or QOperator).

    ``max_weight`` (e.g. 64 for reduce-range weights) also bounds every quantized weight's magnitude."""
    graph = _Graph(model_path)
    excluded = graph.exclusions(excluded_nodes)
    violations: list[str] = []

    def check_bound(weight: np.ndarray, who: str) -> None:
        if max_weight is not None and weight.size and int(np.abs(weight.astype(np.int32)).max()) > max_weight:
            violations.append(f"{who} has int8 weights up to {int(np.abs(weight.astype(np.int32)).max())}; this "
                              f"layout keeps them within +-{max_weight}")

    for node in graph.qdq_nodes:
        who = f"{node.op_type} '{graph.label(node)}'"
        violations += graph.scale_problems(node, who)
        if graph.weight_of(node) is not None:
            continue  # constants: weights and biases are checked through their consumers below
        zero_point = graph.zero_point(node)
        dtype = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
        if dtype != np.uint8:
            violations.append(f"{who} quantizes an activation to {dtype}; the CPU layout uses uint8 activations")

    per_channel = 0
    for node in graph.nodes_of("DequantizeLinear"):
        weight = graph.weight_of(node)
        if weight is None:
            continue
        for consumer, index in graph.consumers.get(node.output[0], []):
            if consumer.op_type in COMPUTE_OP_TYPES and index == 1:
                if weight.dtype != np.int8:
                    violations.append(f"DequantizeLinear '{graph.label(node)}' gives {consumer.op_type} "
                                      f"'{graph.label(consumer)}' {weight.dtype} weights; the CPU layout "
                                      "uses int8 weights")
                else:
                    check_bound(weight, f"DequantizeLinear '{graph.label(node)}'")
                    per_channel += _scale_is_per_channel(graph, node)

    for node in graph.nodes:
        if node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
            # Inputs: x, x_scale, x_zp, w, w_scale, w_zp, ... then the output zero point.
            out_zp_index = 8 if node.op_type == "QGemm" else 7
            for index, role in ((2, "input zero point"), (out_zp_index, "output zero point")):
                value = graph.constant(node.input[index]) if len(node.input) > index and node.input[index] \
                    else None
                if value is not None and value.dtype != np.uint8:
                    violations.append(f"{node.op_type} '{graph.label(node)}' {role} is {value.dtype}; "
                                      "the CPU layout uses uint8 activations")
            weight = graph.constant(node.input[3])
            if weight is not None and weight.dtype != np.int8:
                violations.append(f"{node.op_type} '{graph.label(node)}' weight is {weight.dtype}; "
                                  "the CPU layout uses int8 weights")
            elif weight is not None:
                check_bound(weight, f"{node.op_type} '{graph.label(node)}'")
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            weight = graph.constant(node.input[1])
            if weight is not None and weight.dtype != np.int8:
                violations.append(f"{node.op_type} '{graph.label(node)}' weight is {weight.dtype}; "
                                  "the CPU layout uses int8 weights")

    quantized = [graph.label(n) for n in graph.nodes_of(*_QOPERATOR_COMPUTE)]
    unquantized = []
    for node in graph.nodes_of(*COMPUTE_OP_TYPES):
        inputs_dq = all(graph.fed_by_dq(name) for name in node.input[:2])
        (quantized if inputs_dq else unquantized).append(graph.label(node))
    if not quantized:
        violations.append("no Conv/Gemm/MatMul has quantized inputs: the graph is not INT8")

    return _passed_or_raise(graph, "cpu", violations, quantized, unquantized, excluded, per_channel,
                            graph.activation_counts())


def _passed_or_raise(graph: _Graph, target: str, violations: list[str], quantized: list[str],
                     unquantized: list[str], excluded: list[str], per_channel: int, counts: Mapping[str, int],
                     reference_counts: Mapping[str, int] | None = None) -> LayoutReport:
    """Both layout checks end here: every violation at once, or the report of a passing graph."""
    if violations:
        raise LayoutError(graph.description, "TensorRT" if target == "tensorrt" else "CPU", violations)
    report = LayoutReport(model=graph.description, target=target, quantized_nodes=tuple(quantized),
                          unquantized_nodes=tuple(unquantized), excluded_nodes=tuple(excluded),
                          quantize_linear=len(graph.nodes_of("QuantizeLinear")),
                          dequantize_linear=len(graph.nodes_of("DequantizeLinear")),
                          per_channel_weights=per_channel, activation_counts=counts,
                          reference_activation_counts=reference_counts)
    logger.info("%s", report.summary())
    return report


def _weight_axis(consumer: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis a weight fed to ``consumer`` input ``index`` must be quantized along."""
    if consumer.op_type == "Conv" and index == 1:
        return 0  # [C_out, C_in/groups, kH, kW]
    if consumer.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # B is [N, K] when transposed, else [K, N]
    if consumer.op_type == "MatMul" and index == 1 and rank >= 2:
        return rank - 1  # B is [..., K, N]
    return None


def _scale_is_per_channel(graph: _Graph, node: onnx.NodeProto) -> bool:
    scale = graph.constant(node.input[1])
    return scale is not None and scale.ndim == 1


def _show(values: np.ndarray) -> str:
    flat = values.reshape(-1)
    shown = ", ".join(str(v) for v in flat[:4])
    return f"[{shown}{', ...' if flat.size > 4 else ''}]" if values.ndim else shown


class _Graph:
    """An ONNX graph indexed for the layout checks (main graph only; subgraphs are not inspected)."""

    def __init__(self, source: str | os.PathLike[str] | onnx.ModelProto) -> None:
        if isinstance(source, onnx.ModelProto):
            self.model = source
            self.description = f"graph '{source.graph.name or 'unnamed'}'"
        else:
            path = Path(source)
            try:
                self.model = onnx.load(str(path))
            except OSError as exc:
                raise BundleError(f"cannot read ONNX graph {path}: {exc.strerror or exc}") from exc
            except DecodeError as exc:
                raise BundleError(f"{path} is not an ONNX graph ({exc})") from exc
            self.description = str(path)
        graph = self.model.graph
        self.nodes = list(graph.node)
        self.names = {self.label(n) for n in self.nodes}
        self.producers = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.nodes:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, index))
        self._initializers = {init.name: init for init in graph.initializer}
        self._constant_nodes = {node.output[0]: node for node in self.nodes
                                if node.op_type == "Constant" and node.output}
        self._cache: dict[str, np.ndarray | None] = {}
        self.qdq_nodes = self.nodes_of("QuantizeLinear", "DequantizeLinear")

    def label(self, node: onnx.NodeProto) -> str:
        if node.name:
            return node.name
        return f"{node.op_type} producing {node.output[0]}" if node.output else f"unnamed {node.op_type}"

    def nodes_of(self, *op_types: str) -> list[onnx.NodeProto]:
        return [node for node in self.nodes if node.op_type in op_types]

    def exclusions(self, given: Iterable[str]) -> tuple[str, ...]:
        names = set(given)
        for prop in self.model.metadata_props:
            if prop.key == METADATA_QUANTIZATION:
                try:
                    recorded = json.loads(prop.value).get("excluded_nodes", [])
                except (json.JSONDecodeError, AttributeError) as exc:
                    raise BundleError(f"{self.description}: metadata {METADATA_QUANTIZATION} is not a JSON "
                                      f"object ({exc})") from exc
                names.update(str(n) for n in recorded)
        return tuple(sorted(names))

    def constant(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            value = None
            if name in self._initializers:
                value = numpy_helper.to_array(self._initializers[name])
            elif name in self._constant_nodes:
                attribute = next((a for a in self._constant_nodes[name].attribute if a.name == "value"), None)
                if attribute is not None:
                    value = numpy_helper.to_array(attribute.t)
            self._cache[name] = value
        return self._cache[name]

    def zero_point(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    def weight_of(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The constant a DequantizeLinear (or its QuantizeLinear) reads, or None for an activation."""
        if node.op_type == "QuantizeLinear":
            return self.constant(node.input[0])
        value = self.constant(node.input[0])
        if value is not None:
            return value
        producer = self.producers.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self.constant(producer.input[0])  # a Q/DQ pair on a float weight
        return None

    def fed_by_dq(self, name: str) -> bool:
        producer = self.producers.get(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def scale_problems(self, node: onnx.NodeProto, who: str) -> list[str]:
        scale = self.constant(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            return [f"{who} has no constant scale"]
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            return [f"{who} has scale {_show(scale)}; scales must be finite and positive"]
        return []

    def per_channel_problem(self, node: onnx.NodeProto, weight: np.ndarray, axis: int) -> str | None:
        scale = self.constant(node.input[1])
        channels = weight.shape[axis]
        if scale is None or scale.ndim != 1:
            shape = "unknown" if scale is None else list(scale.shape)
            return (f"is per-tensor (scale shape {shape}); TensorRT layout needs per-channel scales: "
                    f"1-D, {channels} values along axis {axis}")
        if scale.shape[0] != channels:
            return f"has {scale.shape[0]} scales for {channels} channels along axis {axis}"
        declared = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX default axis is 1
        if declared < 0:
            declared += weight.ndim
        if declared != axis:
            return f"quantizes along axis {declared}; the output channels are on axis {axis}"
        return None

    def activation_counts(self) -> dict[str, int]:
        counts = Counter(node.op_type for node in self.nodes)
        return {op_type: counts.get(op_type, 0) for op_type in KEPT_ACTIVATIONS}
