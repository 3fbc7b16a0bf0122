"""The bundle's manifest, schema version 2 (docs/bundle.md; edge/inference/bundle.schema.json).

Written twice: a draft (before the closed-loop gate, which loads the bundle through the runtime) and
the final one. Each time every other file is hashed into `files`, the manifest is checked against the
schema the runtime validates with, written atomically, and covered by its digest in `manifest.sha256`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from edge.fileio import atomic_write_text
from edge.inference.bundle import (
    MANIFEST,
    MANIFEST_DIGEST,
    SCHEMA_VERSION,
    file_sha256,
    validate_manifest,
    write_manifest_digest,
)

# What runs each variant, and at which precision (the runtime picks a variant per graph by target).
VARIANTS = {
    "fp32": {"backend": "onnxruntime", "precision": "fp32"},
    "fp16": {"backend": "onnxruntime-or-tensorrt", "precision": "fp16"},
    "int8-cpu": {"backend": "onnxruntime-cpu", "precision": "int8"},
    "int8-cpu-qop": {"backend": "onnxruntime-cpu", "precision": "int8"},  # QOperator format
    "int8-cpu-rr": {"backend": "onnxruntime-cpu", "precision": "int8"},  # 7-bit weights (reduce range)
    "int8-tensorrt": {"backend": "tensorrt", "precision": "int8"},
}


def provenance(checkpoint: Path | None) -> dict[str, str]:
    if checkpoint is None:
        return {}
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        return {checkpoint.name: file_sha256(checkpoint)}
    if checkpoint.is_dir():
        return {p.name: file_sha256(p) for p in sorted(checkpoint.iterdir()) if p.is_file()}
    return {}


def builder() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from edge import __version__

    return {"vla_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def graphs_section(root: Path, exported: dict, files: dict, latency: dict, accuracy: dict,
                   sessions: dict | None = None) -> dict:
    """`sessions`: variant -> the ONNX Runtime session config it needs (its ort_session; the runtime's
    defaults where absent)."""
    sessions = sessions or {}
    section = {}
    for name, info in exported.items():
        variants = {}
        for variant, path in files[name].items():
            variants[variant] = {
                **VARIANTS[variant],
                "path": str(path.relative_to(root)),
                "sha256": file_sha256(path),
                "latency_ms": latency.get(name, {}).get(variant),
                # every variant is timed the same way, so the numbers compare; TensorRT timings come from
                # the device (vla-edge's benchmark), not from here
                "latency_measured_on": f"onnxruntime CPU, build machine ({platform.machine()})",
                "accuracy_vs_fp32": accuracy.get(name, {}).get(variant),
            }
            if sessions.get(variant):
                variants[variant]["ort_session"] = dict(sessions[variant])
        # "files" (variant -> path) indexes the same paths for readers that only need where a graph is.
        section[name] = {**info["spec"].to_dict(), "variants": variants,
                         "files": {variant: entry["path"] for variant, entry in variants.items()}}
    return section


def write_manifest(root: Path, manifest: dict) -> None:
    manifest["schema_version"] = SCHEMA_VERSION
    manifest.setdefault("created_unix", int(time.time()))
    manifest["files"] = {
        str(p.relative_to(root)): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MANIFEST_DIGEST) and not p.name.startswith(".")
    }
    for graph in manifest.get("graphs", {}).values():  # the variants' digests are those of the files now
        for entry in graph["variants"].values():
            entry["sha256"] = manifest["files"].get(entry["path"], entry["sha256"])
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    validate_manifest(json.loads(text), root / MANIFEST)  # the runtime's own check, before it is written
    atomic_write_text(root / MANIFEST, text)
    write_manifest_digest(root)
