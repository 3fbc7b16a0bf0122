"""Calibrate an FP32 ONNX graph once, then write the INT8 and FP16 graphs the bundle ships.

Steps (each logs its start, end and duration; each output passes ``onnx.checker`` and is written
atomically, temporary file + ``os.replace``):

- ``calibrate``: ONNX Runtime's calibrator (entropy, percentile or min-max) runs the graph once over the
  calibration feeds and gives per-tensor ranges (``TensorRanges``, kept in the bundle as JSON).
- ``quantize_for_tensorrt``: the explicit-quantization graph TensorRT compiles (docs/architecture.md,
  "Decisions: explicit quantization"):
  Q/DQ format, symmetric int8 activations and weights (every zero point 0), per-channel weights,
  float biases, Relu/Clip kept, only the inputs of Conv/Gemm/MatMul quantized.
- ``quantize_for_cpu``: the layout ONNX Runtime's x86 CPU kernels are fast with (docs/architecture.md,
  "Decisions: one calibration, several CPU candidates"):
  asymmetric uint8 activations, symmetric per-channel int8 weights. Both INT8 graphs come from the same
  ranges, so there is one calibration, not two.
- ``quantize_dynamic_int8``: weights-only int8 with runtime activation ranges, for the sentence encoder.
- ``convert_fp16``: FP16 weights and compute with FP32 graph inputs and outputs.

The quantizers are ONNX Runtime's own (``QDQQuantizer``/``ONNXQuantizer``, given the ranges the way
``quantize_static`` gives them after its calibration), so no second calibration pass ever runs.

A bad argument raises ``ConfigError`` and malformed feeds, graphs or ranges ``InputError`` (both the
runtime's); a failure of the step itself raises ``CalibrationError`` or ``QuantizationError``
(``build_engines.errors``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QDQQuantizer,
    QuantFormat,
    QuantizationMode,
    QuantType,
    create_calibrator,
    quantize_dynamic,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData  # older ORT: not in the package root
from onnxruntime.quantization.onnx_model import ONNXModel
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer, update_opset_version

from build_engines.errors import CalibrationError, QuantizationError
from build_engines.layout import METADATA_QUANTIZATION
from calibration.ranges import Histogram, TensorRanges
from edge.errors import ConfigError, InputError
from edge.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "minmax": CalibrationMethod.MinMax,
}
# TensorRT fuses Q/DQ into the layers that consume them; quantizing only these inputs is NVIDIA's
# recommended placement (outputs stay in higher precision for the following element-wise ops).
TENSORRT_OP_TYPES = ("Conv", "Gemm", "MatMul")
# Ops ONNX Runtime's CPU provider fuses with their Q/DQ into int8 kernels (QLinearConv, QLinearAdd,
# QLinearGlobalAveragePool, ...) or moves as 8-bit data; anything else (Softmax, LayerNormalization,
# Tanh, Gather, ...) stays float, where int8 would only add error without speed.
CPU_OP_TYPES = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "LeakyRelu", "Sigmoid",
    "GlobalAveragePool", "AveragePool", "MaxPool", "Concat", "Resize",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
)
# Per-channel axis of a MatMul weight B [..., K, N] is its last axis (one scale per output column).
_PER_CHANNEL_AXES = {"MatMul": -1}
METADATA_FP16 = "vla_edge.fp16"
DEFAULT_BINS = {"entropy": 2048, "percentile": 2048}  # 2048 as TensorRT's entropy calibrator used
DEFAULT_PERCENTILE = 99.999
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\)")


@contextlib.contextmanager
def _step(name: str, detail: str) -> Iterator[None]:
    logger.info("%s: start (%s)", name, detail)
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.error("%s: failed after %.2f s (%s)", name, time.perf_counter() - started, detail)
        raise
    logger.info("%s: done in %.2f s (%s)", name, time.perf_counter() - started, detail)


# ----------------------------------------------------------------------------------------- calibration


class _FeedReader(CalibrationDataReader):
    """Hands one chunk of feeds to ONNX Runtime's calibrator."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibrate(
    fp32_model: str | os.PathLike[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    method: str,
    workdir: str | os.PathLike[str],
    *,
    chunk_size: int = 16,
    num_bins: int | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    op_types_to_calibrate: Sequence[str] | None = None,
) -> TensorRanges:
    """Run ONNX Runtime's calibrator once over ``feeds`` and return every float tensor's range.

    ``feeds`` are the graph's input dicts (name -> array), in any number; they are consumed in chunks of
    ``chunk_size`` so memory stays bounded (the histogram calibrators hold every tensor of a chunk).
    Ranges are kept asymmetric (the histograms are of real values, not magnitudes): the TensorRT graph
    makes them symmetric itself, the CPU graph uses them as they are, so one calibration serves both.
    ``num_bins`` defaults to 2048 for entropy and percentile; ``percentile`` applies to "percentile".
    ``op_types_to_calibrate`` limits calibration to tensors around those ops (default: all float tensors).
    The augmented graph is written to ``workdir`` and removed afterwards.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile!r}")
    model_path = _existing(fp32_model)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"symmetric": False, "chunk_size": chunk_size}
    options: dict[str, Any] = {"symmetric": False}
    if method in DEFAULT_BINS:
        settings["num_bins"] = options["num_bins"] = num_bins or DEFAULT_BINS[method]
    if method == "entropy":
        settings["num_quantized_bins"] = options["num_quantized_bins"] = 128
    if method == "percentile":
        settings["percentile"] = options["percentile"] = float(percentile)
    if op_types_to_calibrate is not None:
        settings["op_types"] = sorted(op_types_to_calibrate)

    with _step("calibrate", f"{model_path.name}, method {method}"):
        model = onnx.load(str(model_path))
        inputs = _graph_inputs(model)
        # The calibrator writes shape-inferred copies beside the graph it loads: give it one in workdir.
        stem = model_path.stem
        calibration_input = work / f"{stem}.calibration-input.onnx"
        augmented = work / f"{stem}.augmented.onnx"
        onnx.save(model, str(calibration_input))
        chatter = io.StringIO()  # ORT's histogram collector print()s progress; it goes to the debug log
        try:
            with contextlib.redirect_stdout(chatter):
                calibrator = create_calibrator(
                    calibration_input,
                    list(op_types_to_calibrate) if op_types_to_calibrate is not None else None,
                    augmented_model_path=str(augmented),
                    calibrate_method=CALIBRATION_METHODS[method],
                    extra_options=options,
                )
            count = 0
            feed_iter = iter(feeds)
            while chunk := list(islice(feed_iter, chunk_size)):
                checked = [_check_feed(feed, inputs, count + i) for i, feed in enumerate(chunk)]
                try:
                    with contextlib.redirect_stdout(chatter):
                        calibrator.collect_data(_FeedReader(checked))
                except ValueError as exc:
                    # np.histogram refuses infinite ranges: a tensor held Inf/NaN in this chunk.
                    raise CalibrationError(
                        f"calibrating {model_path.name} with {method} failed on feeds {count}..."
                        f"{count + len(chunk) - 1}: {exc}; a tensor probably holds Inf or NaN: check the "
                        "calibration data, or use --calib-method minmax"
                    ) from exc
                count += len(chunk)
            if count == 0:
                raise InputError(f"no calibration feeds were given for {model_path.name}")
            with contextlib.redirect_stdout(chatter):
                tensors = calibrator.compute_data()
            histograms = dict(getattr(getattr(calibrator, "collector", None), "histogram_dict", None) or {})
        finally:
            for line in chatter.getvalue().splitlines():
                logger.debug("onnxruntime calibrator: %s", line)
            for leftover in (calibration_input, augmented):
                leftover.unlink(missing_ok=True)
        ranges = _to_ranges(model, tensors, histograms, method, count, settings, _sha256(model_path))
    logger.info("calibrated %d tensors of %s from %d feeds (%s)", len(ranges), model_path.name, count, method)
    return ranges


def _to_ranges(model: onnx.ModelProto, tensors: TensorsData, histograms: Mapping[str, Any], method: str,
               count: int, settings: dict[str, Any], sha256: str) -> TensorRanges:
    order = [value.name for value in model.graph.input]
    order += [name for node in model.graph.node for name in node.output]
    position = {name: index for index, name in enumerate(order)}
    ranges: dict[str, tuple[float, float]] = {}
    kept: dict[str, Histogram] = {}
    unusable: list[str] = []
    for name in sorted(tensors.keys(), key=lambda n: (position.get(n, len(position)), n)):
        low, high = (np.asarray(v, dtype=np.float64).reshape(-1) for v in tensors[name].range_value)
        if low.size != 1 or high.size != 1:
            raise CalibrationError(f"calibrator returned a range of shape {low.shape} for tensor {name!r}, "
                                   "expected one (min, max) per tensor")
        low_f, high_f = float(low[0]), float(high[0])
        if not (np.isfinite(low_f) and np.isfinite(high_f)):
            unusable.append(name)
            continue
        if low_f > high_f:
            # ORT's percentile search can cross over on a constant tensor (e.g. min 255, max 254.75); the
            # pair still brackets the data, so keep it ordered.
            logger.debug("calibrator range of %r came back inverted (%g, %g)", name, low_f, high_f)
            low_f, high_f = high_f, low_f
        ranges[name] = (low_f, high_f)
        if name in histograms:
            counts, edges = histograms[name][0], histograms[name][1]
            kept[name] = Histogram(tuple(int(c) for c in counts), tuple(float(e) for e in edges))
    if unusable:
        # Such a tensor cannot be quantized; if a quantized op needs it, the quantizer names it then.
        logger.warning("calibration left %d tensors without a finite range (they held Inf/NaN): %s",
                       len(unusable), ", ".join(unusable[:10]))
        settings = {**settings, "unusable_tensors": unusable}
    return TensorRanges(method=method, sample_count=count, ranges=ranges, histograms=kept,
                        settings=settings, model_sha256=sha256)


def _graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return {vi.name: vi for vi in model.graph.input if vi.name not in initializers}


def _check_feed(feed: Mapping[str, np.ndarray], inputs: Mapping[str, onnx.ValueInfoProto],
                index: int) -> dict[str, np.ndarray]:
    if not isinstance(feed, Mapping):
        raise InputError(f"calibration feed #{index} is a {type(feed).__name__}, expected a dict of "
                         f"input name -> array for inputs {sorted(inputs)}")
    missing, extra = sorted(set(inputs) - set(feed)), sorted(set(feed) - set(inputs))
    if missing or extra:
        raise InputError(f"calibration feed #{index} does not match the graph inputs {sorted(inputs)}: "
                         f"missing {missing}, unexpected {extra}")
    checked = {}
    for name, value in feed.items():
        tensor_type = inputs[name].type.tensor_type
        expected = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if not isinstance(value, np.ndarray) or value.dtype != expected or value.ndim != len(dims) or any(
                want is not None and want != got for want, got in zip(dims, value.shape, strict=True)):
            shown = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            raise InputError(f"calibration feed #{index}: input {name!r} is {shown}, the graph expects "
                             f"{np.dtype(expected)} {['?' if d is None else d for d in dims]}")
        checked[name] = value
    return checked


# ---------------------------------------------------------------------------------------- quantization


def quantize_for_tensorrt(
    fp32_model: str | os.PathLike[str],
    ranges: TensorRanges,
    out_path: str | os.PathLike[str],
    *,
    op_types: Sequence[str] = TENSORRT_OP_TYPES,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Write the explicit-quantization graph TensorRT compiles (symmetric int8 Q/DQ, per-channel weights).

    Only the inputs of ``op_types`` are quantized (one dedicated Q/DQ pair per consumer, as TensorRT
    fuses best), biases stay float, Relu/Clip stay in the graph. ``nodes_to_exclude`` (node names) stay
    float; they are recorded in the graph's metadata, where ``verify_tensorrt_layout`` reads them.
    """
    extra_options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "QDQKeepRemovableActivations": True,
        "OpTypesToExcludeOutputQuantization": list(op_types),
        "DedicatedQDQPair": True,
        "QDQOpTypePerChannelSupportToAxis": dict(_PER_CHANNEL_AXES),
    }
    layout = {"target": "tensorrt", "format": "QDQ", "activations": "int8 symmetric",
              "weights": "int8 symmetric per-channel", "bias": "float"}
    return _quantize_static("quantize_for_tensorrt", fp32_model, ranges, out_path, QuantFormat.QDQ,
                            QuantType.QInt8, QuantType.QInt8, op_types, nodes_to_exclude, extra_options,
                            layout, quantize_outputs=False)


def quantize_for_cpu(
    fp32_model: str | os.PathLike[str],
    ranges: TensorRanges,
    out_path: str | os.PathLike[str],
    op_types: Sequence[str] | None = None,
    *,
    quant_format: str = "qdq",
    nodes_to_exclude: Sequence[str] = (),
    reduce_range: bool = False,
) -> Path:
    """Write the graph ONNX Runtime's CPU provider runs fastest: uint8 activations, int8 per-channel weights.

    ``op_types`` defaults to ``CPU_OP_TYPES``. ``quant_format`` "qdq" (default) or "qoperator". QDQ is the
    default: on a 2-core AVX-512 VNNI x86 CPU (ORT 1.31, EfficientNet-Lite0 224x224, batch 1;
    docs/architecture.md, "Decisions: one calibration, several CPU candidates") QDQ ran 1.8 ms and
    QOperator 1.7 ms, FP32 4.0-4.5 ms: QOperator's edge is within run-to-run noise, and QDQ is the
    format ONNX Runtime optimises and recommends since 1.11.

    On x86 CPUs without VNNI (AVX2 only), ONNX Runtime's fast u8s8 kernels saturate 16-bit sums: on such a
    CPU EfficientNet-Lite0 fell to cosine 0.79 against FP32 (0.99 with exact arithmetic) and ran no faster
    than FP32. Sessions for INT8 graphs there should set the session config entry
    ``session.x64quantprecision`` to "1", which selects ORT's exact (slower) kernels on such CPUs.

    ``reduce_range`` quantizes the weights to 7 bits (ONNX Runtime's ``reduce_range``: int8 in [-64, 64]),
    activations stay full uint8. A u8 x s7 pair sum is at most 2 * 255 * 64 = 32640, inside int16, so the
    fast u8s8 kernels are exact without VNNI and need no ``session.x64quantprecision`` (build_engines/
    cpu_candidates.py), at the cost of one bit of weight precision.
    """
    if not isinstance(reduce_range, bool):
        raise ConfigError(f"reduce_range must be True or False, got {reduce_range!r}")
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise ConfigError(f"quant_format must be one of {', '.join(formats)}, got {quant_format!r}")
    chosen = tuple(op_types) if op_types is not None else CPU_OP_TYPES
    extra_options = {
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": dict(_PER_CHANNEL_AXES),
    }
    weights = "int8 symmetric per-channel" + (", 7-bit (reduce_range)" if reduce_range else "")
    layout = {"target": "cpu", "format": "QDQ" if quant_format == "qdq" else "QOperator",
              "activations": "uint8 asymmetric", "weights": weights, "bias": "int32"}
    return _quantize_static("quantize_for_cpu", fp32_model, ranges, out_path, formats[quant_format],
                            QuantType.QUInt8, QuantType.QInt8, chosen, nodes_to_exclude, extra_options,
                            layout, quantize_outputs=True, reduce_range=reduce_range)


def _quantize_static(step: str, fp32_model: str | os.PathLike[str], ranges: TensorRanges,
                     out_path: str | os.PathLike[str], quant_format: QuantFormat, activation_type: QuantType,
                     weight_type: QuantType, op_types: Sequence[str], nodes_to_exclude: Sequence[str],
                     extra_options: dict[str, Any], layout: dict[str, Any], *, quantize_outputs: bool,
                     reduce_range: bool = False) -> Path:
    if not isinstance(ranges, TensorRanges):
        raise ConfigError(f"ranges must be TensorRanges (from calibrate or TensorRanges.load), "
                          f"got {type(ranges).__name__}")
    if not op_types:
        raise ConfigError("op_types to quantize must not be empty")
    model_path = _existing(fp32_model)
    target = Path(out_path)
    with _step(step, f"{model_path.name} -> {target}"):
        sha256 = _sha256(model_path)
        if ranges.model_sha256 and ranges.model_sha256 != sha256:
            logger.warning("ranges were calibrated on a graph with sha256 %s, %s has %s; using them by "
                           "tensor name", ranges.model_sha256[:12], model_path.name, sha256[:12])
        # Shape inference in a temporary folder: ORT's path-based loader writes next to the source graph.
        model = save_and_reload_model_with_shape_infer(onnx.load(str(model_path)))
        model = update_opset_version(model, weight_type)  # the activation type matters for 16-bit only
        excluded = sorted(set(nodes_to_exclude))
        _check_exclusions(model, excluded)
        _check_ranges_cover(model, ranges, op_types, excluded, model_path, quantize_outputs)
        args = (sorted(set(op_types)), extra_options)
        if quant_format is QuantFormat.QDQ:
            quantizer = QDQQuantizer(model, True, reduce_range, weight_type, activation_type, _tensors_data(ranges),
                                     [], excluded, *args)
        else:
            quantizer = ONNXQuantizer(model, True, reduce_range, QuantizationMode.QLinearOps, True, weight_type,
                                      activation_type, _tensors_data(ranges), [], excluded, *args)
        with _NonFloatTensors() as skipped:
            quantizer.quantize_model()
        if skipped.tensors:
            logger.info("%s: %d non-float tensors an op of op_types reads stay unquantized (e.g. %s)", step,
                        len(skipped.tensors), ", ".join(skipped.tensors[:3]))
        quantizer.model.topological_sort()  # as ORT's own save does: new Q/DQ nodes are appended unsorted
        quantized = quantizer.model.model
        _set_metadata(quantized, METADATA_QUANTIZATION, {
            **layout,
            "op_types": sorted(set(op_types)),
            "excluded_nodes": excluded,
            "calibration_method": ranges.method,
            "calibration_samples": ranges.sample_count,
            "source_sha256": sha256,
        })
        _write_checked(quantized, target)
    return target


class _NonFloatTensors(logging.Filter):
    """ONNX Runtime's QOperator quantizer warns on the root logger, with the whole type proto (a dozen
    lines each), for every integer tensor a quantizable op reads (shape arithmetic feeding a Concat):
    it leaves them unquantized, as it should. Collected here and logged as one line instead."""

    _MESSAGE = re.compile(r"Inference failed or unsupported type to quantize for tensor '([^']*)'")

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._MESSAGE.match(record.getMessage())
        if match is None:
            return True
        self.tensors.append(match.group(1))
        return False

    def __enter__(self) -> _NonFloatTensors:
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger().removeFilter(self)


def _tensors_data(ranges: TensorRanges) -> TensorsData:
    # A fresh TensorsData every time: the quantizer rewrites ranges in place (Relu/Clip, Softmax).
    data = {name: TensorData(lowest=np.float32(low), highest=np.float32(high))
            for name, (low, high) in ranges.ranges.items()}
    return TensorsData(CALIBRATION_METHODS[ranges.method], data)


def _check_exclusions(model: onnx.ModelProto, excluded: Sequence[str]) -> None:
    names = {node.name for node in model.graph.node}
    unknown = [name for name in excluded if name not in names]
    if unknown:
        raise ConfigError(f"nodes_to_exclude names nodes the graph does not have: {unknown}")


def _check_ranges_cover(model: onnx.ModelProto, ranges: TensorRanges, op_types: Sequence[str],
                        excluded: Sequence[str], model_path: Path, quantize_outputs: bool) -> None:
    """Every activation a quantized op reads (and for the CPU graph, writes) needs a calibrated range."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    wanted = set(op_types)
    missing: list[str] = []
    for node in model.graph.node:
        if node.op_type not in wanted or node.name in excluded:
            continue
        tensors = list(node.input)
        if node.op_type in ("Conv", "Gemm"):
            tensors = tensors[:2]  # the bias is not calibrated
        if quantize_outputs:
            tensors += list(node.output)
        for name in tensors:
            if name and name not in constants and types.get(name) in float_types and name not in ranges \
                    and name not in missing:
                missing.append(name)
    if missing:
        raise InputError(
            f"the calibrated ranges (method {ranges.method}, graph sha256 {ranges.model_sha256[:12] or '?'}) "
            f"have no range for {len(missing)} tensors that {model_path.name} quantizes, e.g. {missing[:5]}: "
            "they were calibrated on another graph or the tensors held Inf/NaN; calibrate this graph again"
        )


def quantize_dynamic_int8(
    fp32_model: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    per_channel: bool = False,
    op_types: Sequence[str] | None = None,
) -> Path:
    """Write a dynamically quantized graph: int8 weights, activations quantized to uint8 at run time.

    For the sentence encoder on CPU (MiniLM-L6, 32 tokens: FP32 4.0 ms, dynamic int8 1.9 ms on ONNX
    Runtime's CPU provider; docs/architecture.md, "Decisions: one calibration, several CPU candidates").
    No calibration: activation ranges are computed per call.
    """
    model_path = _existing(fp32_model)
    target = Path(out_path)
    with _step("quantize_dynamic_int8", f"{model_path.name} -> {target}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as scratch:
            scratch_path = Path(scratch) / target.name
            # A ModelProto, not a path: with a path ORT writes a shape-inferred copy beside the source.
            quantize_dynamic(onnx.load(str(model_path)), scratch_path, per_channel=per_channel,
                             weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(op_types) if op_types is not None else None)
            quantized = onnx.load(str(scratch_path))
        _set_metadata(quantized, METADATA_QUANTIZATION, {
            "target": "cpu", "format": "dynamic", "activations": "uint8 dynamic",
            "weights": "int8 symmetric" + (" per-channel" if per_channel else ""),
            "source_sha256": _sha256(model_path),
        })
        _write_checked(quantized, target)
    return target


# ------------------------------------------------------------------------------------------------ fp16


@dataclass(frozen=True)
class Fp16Graph:
    path: Path
    kept_fp32_op_types: tuple[str, ...]  # op types left in FP32 beyond the converter's default list


def convert_fp16(
    fp32_model: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    op_block_list: Sequence[str] = (),
) -> Fp16Graph:
    """Write an FP16 graph with FP32 inputs and outputs (Casts at the boundary) that ORT CPU can load.

    The graph is converted with ONNX Runtime's float16 converter (``keep_io_types``); ops in its default
    block list and in ``op_block_list`` stay FP32. The result is then loaded on the ORT CPU provider; an
    op type it has no FP16 kernel for (and cannot cast around) is added to the block list and the graph
    converted again, so the written graph is known to load. The op types kept this way are returned and
    recorded in the graph's metadata.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model_path = _existing(fp32_model)
    target = Path(out_path)
    with _step("convert_fp16", f"{model_path.name} -> {target}"):
        model = onnx.load(str(model_path))
        graph_op_types = {node.op_type for node in model.graph.node}
        blocked = set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list)
        kept: list[str] = []
        while True:
            converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True,
                                                 op_block_list=sorted(blocked))
            ONNXModel(converted).topological_sort()  # the converter appends its input Casts at the end
            missing = _missing_cpu_kernel(converted)
            if missing is None:
                break
            if missing in blocked or missing not in graph_op_types:
                raise QuantizationError(f"the FP16 graph of {model_path.name} does not load on ONNX "
                                        f"Runtime's CPU provider: no kernel for {missing}, and keeping it "
                                        "FP32 did not help")
            logger.info("convert_fp16: keeping %s in FP32: ONNX Runtime's CPU provider has no FP16 kernel",
                        missing)
            blocked.add(missing)
            kept.append(missing)
        _set_metadata(converted, METADATA_FP16, {"keep_io_types": True, "kept_fp32_op_types": kept,
                                                 "op_block_list": sorted(blocked),
                                                 "source_sha256": _sha256(model_path)})
        _write_checked(converted, target)
    return Fp16Graph(path=target, kept_fp32_op_types=tuple(kept))


def _missing_cpu_kernel(model: onnx.ModelProto) -> str | None:
    """The op type ORT's CPU provider has no kernel for, or None when the graph loads."""
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except OrtNotImplemented as exc:
        match = _MISSING_KERNEL.search(str(exc))
        if match is None:
            raise QuantizationError(f"ONNX Runtime cannot load the FP16 graph: {exc}") from exc
        return match.group(1)
    return None


# -------------------------------------------------------------------------------------------- plumbing


def _existing(path: str | os.PathLike[str]) -> Path:
    model_path = Path(path)
    if not model_path.is_file():
        raise InputError(f"ONNX graph {model_path} does not exist; export the policy first")
    return model_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_metadata(model: onnx.ModelProto, key: str, value: Mapping[str, Any]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == key:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = key
    entry.value = json.dumps(value, sort_keys=True)


def _write_checked(model: onnx.ModelProto, target: Path) -> None:
    """onnx.checker, then write to a temporary file beside the target and rename it into place."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise QuantizationError(f"the graph for {target} fails onnx.checker: {exc}") from exc
    data = model.SerializeToString()
    atomic_write_bytes(target, data)
    logger.info("wrote %s (%.1f MB)", target, len(data) / 1e6)
