"""The policy bundle: one directory the build writes and the runtime loads (docs/bundle.md).

    manifest.json          schema version 2: the policy spec, graphs with IO specs and variants (fp32,
                           fp16, int8-cpu, int8-cpu-qop, int8-cpu-rr, int8-tensorrt: path, sha256,
                           latency, accuracy vs FP32, the ONNX Runtime session config a variant needs),
                           targets (target -> variant per graph), dropout masks, tokenizer, uncertainty
                           thresholds, calibration and gate reports, engines, reference data, and a
                           sha256 for every other file in the bundle
    manifest.sha256        the manifest's own digest, checked before the manifest is trusted
    graphs/*.onnx          the graphs of every variant
    engines/*.engine       TensorRT engines, where the build had TensorRT and a GPU
    tokenizer.json         HF tokenizers JSON (policies with language only)
    embeddings.npz         precomputed sentence embeddings of the known instructions (with language)
    reference/             inputs/outputs for re-verification on the target (polygraphy JSON + npz)
    reports/               accuracy and calibration reports (JSON + Markdown)
    calibration/*.json     activation ranges

The manifest is validated against bundle.schema.json (shipped beside this module) at load. The runtime
refuses a bundle whose manifest or files do not match their hashes, or of another schema version, with
a message that names the command that rebuilds it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import BundleError, EdgeError
from edge.inference.backends.base import TensorSpec
from edge.inference.spec import PolicySpec

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
SCHEMA_FILE = Path(__file__).with_name("bundle.schema.json")
REBUILD = "build-engines --int8 --out <bundle dir> --force"


def rebuild_hint(manifest: object = None) -> str:
    """The command that rebuilds a bundle: REBUILD with the --policy it was built from, when known (a
    bundle of the user's policy rebuilt without it would become the reference policy's)."""
    policy = manifest.get("policy") if isinstance(manifest, dict) else None
    factory = policy.get("factory") if isinstance(policy, dict) else None
    return f"{REBUILD} --policy {factory if isinstance(factory, str) else '<the policy factory it was built from>'}"
GRAPH_NAMES = ("vision", "language", "head")


def manifest_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest_digest(root: Path) -> Path:
    """(Re)write manifest.sha256 for the manifest.json in `root`, in `sha256sum` format. Whoever edits a
    manifest on purpose (a test, a tool re-keying engines) calls this afterwards; the build does."""
    from edge.fileio import atomic_write_text

    root = Path(root)
    digest = manifest_digest((root / MANIFEST).read_bytes())
    return atomic_write_text(root / MANIFEST_DIGEST, f"{digest}  {MANIFEST}\n")


@functools.lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema
    except ImportError as exc:  # a runtime dependency (setup.py); an image that lists its packages by hand may lack it
        raise BundleError("the bundle manifest cannot be validated: the 'jsonschema' package is missing; install "
                          "it with: python3 -m pip install 'jsonschema>=4.18'") from exc

    schema = json.loads(SCHEMA_FILE.read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_manifest(manifest: dict, where: Path) -> None:
    """The manifest against bundle.schema.json: the first problem, with its location, in one line."""
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        location = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BundleError(f"{where} does not follow the bundle schema v{SCHEMA_VERSION} at {location}: "
                          f"{error.message[:300]}; rebuild with: {rebuild_hint(manifest)}")


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
    files: dict[str, str]  # variant ("fp32", "fp16", "int8-cpu", "int8-tensorrt", ...) -> relative path
    sessions: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> ONNX Runtime session config


@dataclass(frozen=True)
class EngineEntry:
    graph: str
    variant: str
    path: str
    source_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: str


UNCERTAINTY_SIGNALS = ("mc-dropout", "none")  # what the pipeline computes: MC-dropout spread, or nothing (T = 1)


def runtime_gaps(spec: PolicySpec, uncertainty_signal: str) -> list[str]:
    """What this runtime cannot run of a policy of `spec` (the build asks before its closed-loop gate,
    doctor and run before any device). Every shape schema v2 describes runs: one or more cameras, with or
    without language, proprio of any size, action chunks, velocity and position channels, MC-dropout or
    no uncertainty signal; what is left is a signal this runtime does not compute."""
    if uncertainty_signal not in UNCERTAINTY_SIGNALS:
        return [f"the uncertainty signal {uncertainty_signal!r} (this runtime computes "
                f"{' or '.join(UNCERTAINTY_SIGNALS)})"]
    return []


def _session_config(root: Path, manifest: dict, graph: str, variant: str, config: object) -> dict[str, str]:
    """A variant's recorded ort_session, every entry checked against the runtime's allow-list."""
    from edge.inference.backends.onnxruntime import SESSION_CONFIG_ALLOWED

    where = f"bundle {root}: graphs.{graph}.variants.{variant}.ort_session"
    if not isinstance(config, dict):
        raise BundleError(f"{where} is {type(config).__name__}, expected a mapping of ONNX Runtime session config "
                          f"entries; rebuild with: {rebuild_hint(manifest)}")
    for key, value in config.items():
        allowed = SESSION_CONFIG_ALLOWED.get(key)
        if allowed is None:
            raise BundleError(f"{where} sets {key!r}, which this runtime does not apply (it allows "
                              f"{sorted(SESSION_CONFIG_ALLOWED)}); rebuild the bundle with this package's build: "
                              f"{rebuild_hint(manifest)}")
        if value not in allowed:
            raise BundleError(f"{where} sets {key} to {value!r}; allowed: {', '.join(map(repr, allowed))}; "
                              f"rebuild with: {rebuild_hint(manifest)}")
    return dict(config)


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
                {variant: entry["path"] for variant, entry in raw["variants"].items()},
                {variant: _session_config(root, manifest, name, variant, entry.get("ort_session"))
                 for variant, entry in raw["variants"].items() if entry.get("ort_session")},
            )
            for name, raw in manifest["graphs"].items()
        }
        for name, raw in manifest["graphs"].items():
            for variant, entry in raw["variants"].items():
                listed = manifest["files"].get(entry["path"])
                if listed != entry["sha256"] or raw.get("files", {}).get(variant, entry["path"]) != entry["path"]:
                    raise BundleError(f"bundle {root}: the {variant} {name} graph {entry['path']} is not listed "
                                      f"with the same sha256 and path in the manifest; rebuild with: {rebuild_hint(manifest)}")
        self.spec = PolicySpec.from_dict(manifest["spec"], "manifest spec")
        fields = EngineEntry.__dataclass_fields__
        try:
            self.engines = tuple(EngineEntry(**{k: str(raw[k]) for k in fields}) for raw in manifest.get("engines", []))
        except (KeyError, TypeError) as exc:
            raise BundleError(f"bundle {root}: malformed engines table ({exc}); rebuild with: "
                              f"{rebuild_hint(manifest)}") from exc

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a policy bundle: {MANIFEST} is missing. Build one with: {rebuild_hint()}")
        data = manifest_path.read_bytes()
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); rebuild with: {rebuild_hint()}") from exc
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{manifest_path} has schema version {version}; this runtime reads version {SCHEMA_VERSION}. "
                f"Rebuild the bundle with this package's build: {rebuild_hint(manifest)}"
            )
        digest_path = root / MANIFEST_DIGEST
        if verify_hashes:
            if not digest_path.is_file():
                raise BundleError(f"bundle {root} has no {MANIFEST_DIGEST}, so its manifest cannot be trusted; "
                                  f"rebuild with: {rebuild_hint(manifest)}")
            recorded = digest_path.read_text().split()[:1]
            if recorded != [manifest_digest(data)]:
                raise BundleError(f"{manifest_path} does not match {MANIFEST_DIGEST} (corrupt or modified); "
                                  f"rebuild with: {rebuild_hint(manifest)}")
        validate_manifest(manifest, manifest_path)
        try:
            bundle = cls(root, manifest)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, EdgeError) as exc:
            raise BundleError(f"{manifest_path} is malformed ({exc!r}); rebuild with: {rebuild_hint(manifest)}") from exc
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
                              + f". Rebuild it with: {rebuild_hint(self.manifest)}")

    def path(self, relative: str) -> Path:
        if relative not in self.manifest["files"]:
            raise BundleError(f"bundle {self.root} does not list {relative}; rebuild with: "
                              f"{rebuild_hint(self.manifest)}")
        return self.root / relative

    def graph_path(self, graph: str, variant: str) -> Path:
        entry = self.graphs.get(graph)
        if entry is None or variant not in entry.files:
            available = sorted(entry.files) if entry else []
            raise BundleError(
                f"bundle {self.root} has no {variant} {graph} graph (it has {available}); "
                f"rebuild with: {rebuild_hint(self.manifest)}"
            )
        return self.path(entry.files[variant])

    def session_config(self, graph: str, variant: str) -> dict[str, str]:
        """The ONNX Runtime session config entries the build recorded for this variant (validated at load);
        empty: the runtime's defaults (edge/inference/backends/onnxruntime.py)."""
        entry = self.graphs.get(graph)
        return dict(entry.sessions.get(variant, {})) if entry is not None else {}

    def target_variants(self, target: str) -> dict[str, str]:
        targets = self.manifest["targets"]
        if target not in targets:
            raise BundleError(f"bundle {self.root} has no target {target!r}; it has {sorted(targets)}")
        return dict(targets[target])

    @property
    def has_language(self) -> bool:
        return self.spec.language is not None

    @property
    def tokenizer_path(self) -> Path:
        if self.manifest["tokenizer"] is None:
            raise BundleError(f"bundle {self.root} is of a policy without language: it has no tokenizer")
        return self.path(self.manifest["tokenizer"]["path"])

    @property
    def max_tokens(self) -> int:
        if self.manifest["tokenizer"] is None:
            raise BundleError(f"bundle {self.root} is of a policy without language: it has no tokenizer")
        return int(self.manifest["tokenizer"]["max_tokens"])

    @property
    def action(self) -> dict:
        """The action spec as the control side reads it: dim, names, kinds, low, high, max_slew_per_s, horizon."""
        action = self.spec.action
        return {**action.to_dict(), "dim": action.dim}

    def unsupported_by_runtime(self) -> list[str]:
        """What this runtime cannot run in this bundle; empty when it can."""
        return runtime_gaps(self.spec, self.manifest["uncertainty"]["signal"])

    def check_runnable(self) -> None:
        """Raise BundleError (before any device is armed) for a bundle this runtime cannot run."""
        reasons = self.unsupported_by_runtime()
        if reasons:
            raise BundleError(f"bundle {self.root} ({self.spec.name}) needs what this runtime does not have: "
                              f"{', '.join(reasons)}; rebuild it with a signal this runtime computes: "
                              f"{rebuild_hint(self.manifest)} --uncertainty mc-dropout (or none)")

    @property
    def has_uncertainty(self) -> bool:
        """False for a bundle built with --uncertainty none: no dropout masks, T = 1, no threshold."""
        return self.manifest["uncertainty"]["signal"] != "none"

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
