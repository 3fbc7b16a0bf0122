"""The interface every inference backend implements (ONNX Runtime, TensorRT).

Life cycle, as Polygraphy's runners: construct (cheap) -> `activate()` once (load the graph or engine,
check its input/output metadata against what the bundle declares, allocate every host and device
buffer at the maximum shape) -> many `run()` calls in the hot loop (no allocation, no metadata
checks) -> `close()`.

Only the leading dimension of a tensor may be dynamic (the frame batch N of the vision graph, the
Monte-Carlo sample count T of the head's masks and actions). It is written -1 in a TensorSpec and is
bounded by `max_batch`. Callers write inputs into the views returned by `input(name)` and read the
outputs from the dict `run()` returns; both are views of buffers owned by the backend and are
overwritten by the next run.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from edge.errors import BackendError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "uint8", "int64", "float32", ...
    shape: tuple[int, ...]  # -1 marks the dynamic leading dimension

    @property
    def dynamic(self) -> bool:
        return bool(self.shape) and self.shape[0] == -1

    def max_shape(self, max_batch: int) -> tuple[int, ...]:
        return (max_batch, *self.shape[1:]) if self.dynamic else self.shape

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: dict) -> TensorSpec:
        return cls(str(raw["name"]), str(raw["dtype"]), tuple(int(d) for d in raw["shape"]))


@dataclass
class RunTiming:
    """Milliseconds of the last run, per stage; copies are 0 where the backend has none (CPU)."""

    host_to_device_ms: float = 0.0
    compute_ms: float = 0.0
    device_to_host_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.host_to_device_ms + self.compute_ms + self.device_to_host_ms


@dataclass
class BackendInfo:
    name: str
    device: str
    precision: str
    details: dict = field(default_factory=dict)


def check_io(
    kind: str,
    expected: tuple[TensorSpec, ...],
    actual: tuple[TensorSpec, ...],
    source: str,
    fix: str,
) -> None:
    """Raise BackendError when a graph/engine does not have the inputs or outputs the bundle declares."""
    by_name = {spec.name: spec for spec in actual}
    problems = []
    for spec in expected:
        found = by_name.get(spec.name)
        if found is None:
            problems.append(f"missing {kind} '{spec.name}'")
            continue
        if found.dtype != spec.dtype:
            problems.append(f"{kind} '{spec.name}' is {found.dtype}, expected {spec.dtype}")
        if len(found.shape) != len(spec.shape) or any(
            a != b and a != -1 and b != -1 for a, b in zip(found.shape, spec.shape)
        ):
            problems.append(f"{kind} '{spec.name}' has shape {list(found.shape)}, expected {list(spec.shape)}")
    extra = sorted(set(by_name) - {spec.name for spec in expected})
    if extra:
        problems.append(f"unexpected {kind}s {extra}")
    if problems:
        raise BackendError(f"{source}: " + "; ".join(problems) + f". {fix}")


class InferenceBackend(abc.ABC):
    """One graph or engine, activated once, run many times without allocating."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int

    @abc.abstractmethod
    def activate(self) -> None:
        """Load, check IO metadata, allocate every buffer. Raises BackendError naming the fix."""

    @abc.abstractmethod
    def input(self, name: str) -> np.ndarray:
        """The host buffer of an input at its maximum shape (pinned memory where the backend has it)."""

    @abc.abstractmethod
    def run(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Run on the first `batch` rows of every dynamic input; returns views of the output buffers."""

    @property
    @abc.abstractmethod
    def last_timing(self) -> RunTiming: ...

    @property
    @abc.abstractmethod
    def info(self) -> BackendInfo: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> InferenceBackend:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_batch(self, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise BackendError(f"batch {batch} is outside 1..{self.max_batch} that buffers were allocated for")
