"""The policy bundle: one directory the build writes and the runtime loads (docs/architecture.md,
"Contracts: Policy bundle").

    manifest.json          schema version, graphs per precision and target, IO specs, tokenizer, action
                           and dropout description, uncertainty threshold, accuracy summary, engines,
                           and a sha256 for every other file in the bundle
    graphs/*.onnx          FP32, FP16, INT8 (TensorRT Q/DQ layout and CPU layout) graphs
    engines/*.engine       TensorRT engines, where the build had TensorRT and a GPU
    tokenizer.json         HF tokenizers JSON
    embeddings.npz         precomputed sentence embeddings of the known instructions
    reference/             inputs/outputs for re-verification on the target (polygraphy JSON + npz)
    reports/               accuracy and calibration reports (JSON + Markdown)
    calibration/ranges.json

The runtime refuses a bundle whose files do not match their hashes, with a message that names the
command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.inference.backends.base import TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REBUILD = "build-engines --int8 --out <bundle dir> --force"
GRAPH_NAMES = ("vision", "language", "head")


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GraphEntry:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]  # variant ("fp32", "fp16", "int8_cpu", "int8_trt", ...) -> relative path


@dataclass(frozen=True)
class EngineEntry:
    graph: str
    variant: str
    path: str
    source_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: str


class Bundle:
    """A verified bundle directory. Construct with Bundle.load(path)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.graphs = {
            name: GraphEntry(
                name,
                tuple(TensorSpec.from_dict(s) for s in raw["inputs"]),
                tuple(TensorSpec.from_dict(s) for s in raw["outputs"]),
                dict(raw["files"]),
            )
            for name, raw in manifest["graphs"].items()
        }
        fields = EngineEntry.__dataclass_fields__
        try:
            self.engines = tuple(EngineEntry(**{k: str(raw[k]) for k in fields}) for raw in manifest.get("engines", []))
        except (KeyError, TypeError) as exc:
            raise BundleError(f"bundle {root}: malformed engines table ({exc}); rebuild with: {REBUILD}") from exc

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a policy bundle: {MANIFEST} is missing. Build one with: {REBUILD}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); rebuild with: {REBUILD}") from exc
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_path} has schema version {version}; this runtime reads version {SCHEMA_VERSION}. "
                f"Rebuild the bundle with this package's build: {REBUILD}"
            )
        for key in ("graphs", "targets", "files", "tokenizer", "action", "dropout", "uncertainty"):
            if key not in manifest:
                raise BundleError(f"{manifest_path} lacks the '{key}' section; rebuild with: {REBUILD}")
        try:
            bundle = cls(root, manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{manifest_path} is malformed ({exc!r}); rebuild with: {REBUILD}") from exc
        if verify_hashes:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every file listed in the manifest exists and matches its sha256."""
        problems = []
        for relative, expected in sorted(self.manifest["files"].items()):
            path = self.root / relative
            if not path.is_file():
                problems.append(f"{relative} is missing")
            elif file_sha256(path) != expected:
                problems.append(f"{relative} does not match its sha256 (corrupt or modified)")
        if problems:
            raise BundleError(f"bundle {self.root} failed verification: " + "; ".join(problems)
                              + f". Rebuild it with: {REBUILD}")

    def path(self, relative: str) -> Path:
        if relative not in self.manifest["files"]:
            raise BundleError(f"bundle {self.root} does not list {relative}; rebuild with: {REBUILD}")
        return self.root / relative

    def graph_path(self, graph: str, variant: str) -> Path:
        entry = self.graphs.get(graph)
        if entry is None or variant not in entry.files:
            available = sorted(entry.files) if entry else []
            raise BundleError(
                f"bundle {self.root} has no {variant} {graph} graph (it has {available}); "
                f"rebuild with: {REBUILD}"
            )
        return self.path(entry.files[variant])

    def target_variants(self, target: str) -> dict[str, str]:
        targets = self.manifest["targets"]
        if target not in targets:
            raise BundleError(f"bundle {self.root} has no target {target!r}; it has {sorted(targets)}")
        return dict(targets[target])

    @property
    def tokenizer_path(self) -> Path:
        return self.path(self.manifest["tokenizer"]["path"])

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["tokenizer"]["max_tokens"])

    @property
    def action(self) -> dict:
        return self.manifest["action"]

    @property
    def dropout(self) -> dict:
        return self.manifest["dropout"]

    def uncertainty_threshold(self, target: str) -> float:
        thresholds = self.manifest["uncertainty"]["threshold"]
        if target not in thresholds:
            raise BundleError(f"bundle {self.root} has no uncertainty threshold for target {target!r}; "
                              f"it has {sorted(thresholds)}")
        return float(thresholds[target])

    def embeddings(self) -> dict[str, np.ndarray]:
        """Precomputed sentence embeddings of the known instructions: text -> float32 [1, dim]."""
        section = self.manifest.get("embeddings")
        if not section:
            return {}
        with np.load(self.path(section["path"])) as data:
            vectors = data["embeddings"].astype(np.float32)
        texts = section["instructions"]
        if len(texts) != len(vectors):
            raise BundleError(f"bundle {self.root}: {len(texts)} instructions but {len(vectors)} embeddings")
        return {text: vectors[i : i + 1] for i, text in enumerate(texts)}
