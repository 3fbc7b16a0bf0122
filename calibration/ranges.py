"""Calibrated tensor ranges: the one calibration artifact both INT8 graphs are quantized from.

A ``TensorRanges`` holds, per activation tensor, the (min, max) range ONNX Runtime's calibrator chose,
the method and how many samples it saw, the calibrator's settings, and for the histogram methods
(entropy, percentile) the histogram it chose the range from. It is saved as JSON in the bundle, so the
TensorRT graph and the CPU graph can be rebuilt from it (and audited) without calibrating again.

Floats are stored as the shortest decimal that reads back to the same float64; ranges come from float32
values, so save -> load gives back bit-identical ranges, hence bit-identical quantized graphs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BundleError, InputError
from edge.fileio import atomic_write_text

SCHEMA = "vla-edge.tensor-ranges/1"
METHODS = ("entropy", "percentile", "minmax")


@dataclass(frozen=True)
class Histogram:
    """A histogram ONNX Runtime's calibrator built for one tensor: ``len(edges) == len(counts) + 1``."""

    counts: tuple[int, ...]
    edges: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(f"a histogram needs one more edge than counts, got {len(self.edges)} edges "
                             f"for {len(self.counts)} counts")

    def clipped_fraction(self, low: float, high: float) -> float:
        """Share of the observed values whose bin lies outside [low, high], i.e. what the range clips."""
        total = sum(self.counts)
        if total == 0:
            return 0.0
        clipped = 0
        for count, left, right in zip(self.counts, self.edges[:-1], self.edges[1:], strict=True):
            centre = 0.5 * (left + right)
            if centre < low or centre > high:
                clipped += count
        return clipped / total


@dataclass(frozen=True)
class TensorRanges:
    """Per-tensor calibrated (min, max), in graph order, with how they were obtained."""

    method: str  # one of METHODS
    sample_count: int  # calibration feeds the calibrator ran
    ranges: Mapping[str, tuple[float, float]]
    histograms: Mapping[str, Histogram] = field(default_factory=dict)  # entropy / percentile only
    settings: Mapping[str, Any] = field(default_factory=dict)  # calibrator options (bins, percentile, ...)
    model_sha256: str = ""  # the FP32 graph the ranges belong to

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise InputError("calibrated ranges are not usable: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.ranges)

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def __getitem__(self, name: str) -> tuple[float, float]:
        return self.ranges[name]

    def to_dict(self) -> dict[str, Any]:
        tensors: dict[str, Any] = {}
        for name, (low, high) in self.ranges.items():
            entry: dict[str, Any] = {"min": low, "max": high}
            histogram = self.histograms.get(name)
            if histogram is not None:
                entry["histogram"] = {"counts": list(histogram.counts), "edges": list(histogram.edges)}
            tensors[name] = entry
        return {
            "schema": SCHEMA,
            "method": self.method,
            "sample_count": self.sample_count,
            "settings": dict(self.settings),
            "model_sha256": self.model_sha256,
            "tensors": tensors,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "calibration ranges") -> TensorRanges:
        """Rebuild from ``to_dict()`` output; a malformed document raises BundleError naming the key."""
        if not isinstance(data, Mapping):
            raise BundleError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise BundleError(f"{origin}: schema is {data.get('schema')!r}, expected {SCHEMA!r}; "
                              "re-run the calibration step of build_engines to regenerate it")
        for key in ("method", "sample_count", "tensors"):
            if key not in data:
                raise BundleError(f"{origin}: key {key!r} is missing")
        tensors = data["tensors"]
        if not isinstance(tensors, Mapping):
            raise BundleError(f"{origin}: 'tensors' must be an object of name -> {{min, max}}")
        ranges: dict[str, tuple[float, float]] = {}
        histograms: dict[str, Histogram] = {}
        for name, entry in tensors.items():
            try:
                ranges[name] = (float(entry["min"]), float(entry["max"]))
                if "histogram" in entry:
                    hist = entry["histogram"]
                    histograms[name] = Histogram(tuple(int(c) for c in hist["counts"]),
                                                 tuple(float(e) for e in hist["edges"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{origin}: tensor {name!r} is malformed ({exc}); expected "
                                  "{'min': float, 'max': float, optional 'histogram': {counts, edges}}") from exc
        try:
            return cls(method=data["method"], sample_count=data["sample_count"], ranges=ranges,
                       histograms=histograms, settings=dict(data.get("settings", {})),
                       model_sha256=str(data.get("model_sha256", "")))
        except InputError as exc:
            raise BundleError(f"{origin}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON atomically (temporary file + rename), so a crash never leaves half a file."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TensorRanges:
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise BundleError(f"cannot read calibration ranges {source}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"calibration ranges {source} are not valid JSON ({exc})") from exc
        return cls.from_dict(data, origin=f"calibration ranges {source}")

    def report(self, *, max_rows: int | None = None) -> str:
        """A fixed-width table for the calibration report: one row per tensor, widest ranges kept."""
        lines = [
            f"calibration method: {self.method}, samples: {self.sample_count}, tensors: {len(self.ranges)}",
        ]
        if self.settings:
            lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items())))
        if self.model_sha256:
            lines.append(f"fp32 graph sha256: {self.model_sha256}")
        name_width = max([len("tensor"), *(len(n) for n in self.ranges)])
        name_width = min(name_width, 60)
        header = f"{'tensor':<{name_width}}  {'min':>12}  {'max':>12}  {'|max|':>12}"
        if self.histograms:
            header += f"  {'bins':>6}  {'clipped %':>9}"
        lines += [header, "-" * len(header)]
        rows = list(self.ranges.items())
        if max_rows is not None and len(rows) > max_rows:
            rows = rows[:max_rows]
        for name, (low, high) in rows:
            shown = name if len(name) <= name_width else "..." + name[-(name_width - 3):]
            row = f"{shown:<{name_width}}  {low:>12.5g}  {high:>12.5g}  {max(abs(low), abs(high)):>12.5g}"
            if self.histograms:
                histogram = self.histograms.get(name)
                if histogram is None:
                    row += f"  {'-':>6}  {'-':>9}"
                else:
                    clipped = 100.0 * histogram.clipped_fraction(low, high)
                    row += f"  {len(histogram.counts):>6}  {clipped:>9.4f}"
            lines.append(row)
        if len(rows) < len(self.ranges):
            lines.append(f"... {len(self.ranges) - len(rows)} more tensors")
        return "\n".join(lines) + "\n"


def _problems(ranges: TensorRanges) -> list[str]:
    problems = []
    if ranges.method not in METHODS:
        problems.append(f"method {ranges.method!r} is not one of {', '.join(METHODS)}")
    if isinstance(ranges.sample_count, bool) or not isinstance(ranges.sample_count, int) \
            or ranges.sample_count < 1:
        problems.append(f"sample_count must be a positive integer, got {ranges.sample_count!r}")
    if not ranges.ranges:
        problems.append("no tensor ranges")
    for name, value in ranges.ranges.items():
        if not isinstance(name, str):
            problems.append(f"tensor name {name!r} is not a string")
            continue
        if not isinstance(value, tuple) or len(value) != 2:
            problems.append(f"tensor {name!r}: range must be a (min, max) tuple, got {value!r}")
            continue
        low, high = value
        if not (isinstance(low, float) and isinstance(high, float)):
            problems.append(f"tensor {name!r}: min and max must be floats, got {low!r}, {high!r}")
        elif not (math.isfinite(low) and math.isfinite(high)):
            problems.append(f"tensor {name!r}: range ({low}, {high}) is not finite "
                            "(the calibration data produced NaN or Inf here)")
        elif low > high:
            problems.append(f"tensor {name!r}: min {low} > max {high}")
    for name in ranges.histograms:
        if name not in ranges.ranges:
            problems.append(f"histogram for {name!r} has no range")
    return problems
