"""The cache key of a TensorRT engine: what it was built from, and for which TensorRT and GPU.

A serialized engine only runs on the TensorRT version and the GPU generation (compute capability) that
built it, and it is only the policy if it was built from the graph the bundle ships, at the precision
asked for. The key holds those four facts (as jetson-inference keys its engine cache) plus the GPU's
name and multiprocessor count: AGX Orin and Orin Nano are both compute capability 8.7, and tactics
timed on one are not the fastest (or may not fit) on the other. The builder writes the key beside the
engine (``<engine>.key.json``) and into the manifest, and the runtime and the doctor compare it with
this device before loading anything. A key written before the GPU fields existed reads them as
"unknown", which never matches a device: the message says to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edge.errors import BundleError
from edge.fileio import atomic_write_text
from edge.validation import check_choice, check_pattern, check_text

PRECISIONS = ("fp32", "fp16", "int8")
# The command that builds engines for this device from the bundle's graphs (no torch needed, docs/deployment.md).
REBUILD_COMMAND = "build-engines --engines-only <bundle dir>"
UNKNOWN = "unknown"
KEY_SUFFIX = ".key.json"

_LABELS = {
    "source_sha256": "source graph sha256",
    "tensorrt_version": "TensorRT version",
    "compute_capability": "GPU compute capability",
    "precision": "precision",
    "gpu_name": "GPU",
    "multiprocessors": "GPU multiprocessors",
}
_OPTIONAL = ("gpu_name", "multiprocessors")  # absent from keys written before they were recorded
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMPUTE_CAPABILITY = re.compile(r"\d+\.\d+")
_COUNT = re.compile(r"[1-9]\d*")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def key_path(engine_path: str | Path) -> Path:
    """Where the key of an engine file lives: beside it, ``vision.int8.engine.key.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + KEY_SUFFIX)


@dataclass(frozen=True)
class EngineKey:
    source_sha256: str  # sha256 of the ONNX graph the engine was built from
    tensorrt_version: str  # tensorrt.__version__ of the builder, e.g. "10.3.0"
    compute_capability: str  # of the GPU that built it, e.g. "8.7" (Jetson Orin)
    precision: str  # "fp32", "fp16" or "int8"
    gpu_name: str = UNKNOWN  # cudaDeviceProp.name, e.g. "Orin"
    multiprocessors: str = UNKNOWN  # cudaDeviceProp.multiProcessorCount, e.g. "16" (AGX Orin 64GB)

    def __post_init__(self) -> None:
        # ValueError, not ConfigError: the fields come from the builder or a manifest, and from_dict turns
        # a malformed one into a BundleError that says to rebuild.
        check_pattern("source_sha256", self.source_sha256, _SHA256, "64 lowercase hex digits", error=ValueError)
        check_text("tensorrt_version", self.tensorrt_version, "a TensorRT version such as '10.3.0'",
                   error=ValueError)
        check_pattern("compute_capability", self.compute_capability, _COMPUTE_CAPABILITY, "like '8.7'",
                      error=ValueError)
        check_choice("precision", self.precision, PRECISIONS, error=ValueError)
        check_text("gpu_name", self.gpu_name, "the GPU's name", error=ValueError)
        if self.multiprocessors != UNKNOWN:
            check_pattern("multiprocessors", self.multiprocessors, _COUNT, "a count such as '16'", error=ValueError)

    def to_dict(self) -> dict[str, str]:
        """The fields; the GPU fields only when known, so a key from before them keeps its digest."""
        return {name: value for name, value in asdict(self).items() if name not in _OPTIONAL or value != UNKNOWN}

    @classmethod
    def from_dict(cls, raw: dict) -> EngineKey:
        """Read a key from a manifest or key file; BundleError when a field is missing or malformed."""
        names = [f.name for f in fields(cls)]
        if not isinstance(raw, dict):
            raise BundleError(f"engine key must be an object with {names}, got {type(raw).__name__}")
        missing = [name for name in names if name not in raw and name not in _OPTIONAL]
        if missing:
            raise BundleError(f"engine key lacks {missing}; rebuild the engines: {REBUILD_COMMAND}")
        try:
            return cls(**{name: str(raw[name]) for name in names if name in raw})
        except ValueError as exc:
            raise BundleError(f"engine key is malformed ({exc}); rebuild the engines: {REBUILD_COMMAND}") from exc

    def digest(self) -> str:
        """sha256 of the canonical JSON: the engine cache's identity in one string."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def mismatch(self, other: EngineKey) -> list[str]:
        """One line per field where this key (an engine's) differs from `other` (the key required); empty
        when they match."""
        problems = []
        for name, label in _LABELS.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                if name == "source_sha256":  # 12 hex digits tell graphs apart in a message
                    mine, theirs = mine[:12] + "...", theirs[:12] + "..."
                if mine == UNKNOWN:
                    mine = "unknown (a key written before the GPU was recorded: rebuild the engines)"
                problems.append(f"{label}: engine {mine}, required {theirs}")
        return problems

    def save(self, path: str | Path) -> None:
        """Write the key as JSON, atomically (a half-written key must never pass a check)."""
        path = Path(path)
        payload = json.dumps({**self.to_dict(), "digest": self.digest()}, indent=2, sort_keys=True) + "\n"
        atomic_write_text(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> EngineKey:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read engine key {path}: {exc}; rebuild: {REBUILD_COMMAND}") from exc
        key = cls.from_dict(raw)
        if "digest" in raw and raw["digest"] != key.digest():
            raise BundleError(f"engine key {path} was edited (digest does not match); rebuild: {REBUILD_COMMAND}")
        return key
