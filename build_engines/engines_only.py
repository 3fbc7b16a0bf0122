"""`build-engines --engines-only BUNDLE`: TensorRT engines for this GPU from a bundle built elsewhere.

On the robot, where there is no torch (the runtime's virtualenv, ``systemd/install.sh``): needs only
TensorRT (from JetPack), cuda-python, onnx and numpy. No export, calibration or accuracy gate runs
again; the bundle's graphs are the policy.

For every graph variant of the bundle's TensorRT targets ("tensorrt", "fp16"): build an engine with the
same profile as the full build (vision and language at batch 1, the head's T from 1 to the bundle's
maximum), verify it against the bundle's own reference inputs and outputs of that variant (written by
the build from ONNX Runtime) with the precision's tolerance, and key it to this TensorRT and GPU. Only
when every engine is verified are they moved into ``engines/`` and the manifest rewritten, atomically:
the engines table replaced and the file hashes of the engines updated (every other hash is kept, after
the bundle was verified against them). A failure leaves the bundle as it was.

The bundle is read through ``edge.inference.bundle.Bundle`` (its graphs, targets, dropout and reference
sections), so this module does not depend on how the full build writes a manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from build_engines.errors import BuildError, EngineBuildError
from build_engines.manifest import write_manifest
from edge.errors import EdgeError
from edge.inference.bundle import Bundle, file_sha256
from edge.inference.engine_key import KEY_SUFFIX

logger = logging.getLogger(__name__)

TENSORRT_TARGETS = ("tensorrt", "fp16")
ENGINES_DIR = "engines"
EXTRA_HINT = ("install the robot's engine-build dependencies: pip install 'vla-edge[engines,gpu]' in a virtualenv "
              "made with --system-site-packages (TensorRT comes with JetPack: apt install python3-libnvinfer)")


@dataclass(frozen=True)
class EngineJob:
    graph: str
    variant: str
    precision: str
    onnx_path: Path


def check_dependencies() -> None:
    """One line naming what to install when onnx (the graph checks) is absent; TensorRT and CUDA are
    checked by ``tensorrt_status``."""
    try:
        import onnx  # noqa: F401 - the layout check reads the graphs with it
    except ImportError as exc:
        raise BuildError(f"--engines-only needs the onnx package, which is not installed: {EXTRA_HINT}") from exc


def jobs(bundle: Bundle) -> list[EngineJob]:
    from build_engines.tensorrt_engines import PRECISION

    wanted: set[tuple[str, str]] = set()
    for target in TENSORRT_TARGETS:
        if target in bundle.manifest["targets"]:
            wanted.update(bundle.target_variants(target).items())
    if not wanted:
        raise BuildError(f"bundle {bundle.root} has no TensorRT target (it has {sorted(bundle.manifest['targets'])}); "
                         "rebuild it with --int8 or --fp16 to get one")
    return [EngineJob(graph, variant, PRECISION[variant], bundle.graph_path(graph, variant))
            for graph, variant in sorted(wanted) if variant in PRECISION]


def reference(bundle: Bundle, graph: str, variant: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The build's reference inputs of `graph` and ONNX Runtime's outputs of `variant` on them."""
    section = bundle.manifest.get("reference", {}).get(graph)
    if not section or variant not in section.get("outputs", {}):
        raise BuildError(f"bundle {bundle.root} has no reference outputs for the {variant} {graph} graph, so "
                         "an engine cannot be verified; rebuild the bundle with this package's build")

    def arrays(json_relative: str) -> dict[str, np.ndarray]:
        relative = str(Path(json_relative).with_suffix(".npz"))
        with np.load(bundle.path(relative)) as data:
            return {name: data[name] for name in data.files}

    return arrays(section["inputs"]), arrays(section["outputs"][variant])


def build_engines_only(bundle_dir: str | Path, *, trt: Any = None, cudart: Any = None,
                       workspace_mib: int = 1024) -> list[dict]:
    """Build, verify and install the engines of `bundle_dir` for this GPU; returns the engines table."""
    from build_engines.tensorrt_builder import (
        build_engine,
        engine_key_for,
        load_tensorrt,
        require_supported,
        save_engine,
        tensorrt_status,
        verify_engine,
    )
    from build_engines.tensorrt_engines import TOLERANCE, _profile

    check_dependencies()
    trt = trt if trt is not None else load_tensorrt()
    require_supported(trt)
    if cudart is None:
        from edge.inference.cuda import load_runtime

        try:
            cudart = load_runtime()
        except EdgeError as exc:
            raise EngineBuildError(f"{exc}; {EXTRA_HINT}") from exc
    available, reason = tensorrt_status(trt, cudart)
    if not available:
        raise EngineBuildError(reason)
    logger.info("engines only: %s", reason)

    root = Path(bundle_dir)
    bundle = Bundle.load(root)  # every file against its hash before anything is built from it
    max_samples, default_samples = int(bundle.dropout["max_samples"]), int(bundle.dropout["default_samples"])
    cache = root.parent / ".tensorrt-timing.cache"  # the full build's cache, beside the bundle
    try:
        staging = Path(tempfile.mkdtemp(prefix=".engines-", dir=root))
    except OSError as exc:
        raise BuildError(f"cannot write engines into {root} ({exc.strerror or exc}): run as the bundle's owner, "
                         f"e.g. sudo -u vla-edge build-engines --engines-only {root}") from exc
    entries = []
    try:
        for job in jobs(bundle):
            spec = bundle.graphs[job.graph]
            inputs, outputs = reference(bundle, job.graph, job.variant)
            if job.graph != "head":  # the runtime runs vision and language at batch 1: so does the profile
                inputs = {name: value[:1] for name, value in inputs.items()}
                outputs = {name: value[:1] for name, value in outputs.items()}
            profile = _profile(SimpleNamespace(name=job.graph, inputs=spec.inputs), max_samples, default_samples)
            logger.info("engine %s %s: building from %s", job.graph, job.variant, job.onnx_path.name)
            engine = build_engine(job.onnx_path, precision=job.precision, profile=profile, timing_cache_path=cache,
                                  workspace_mib=workspace_mib, trt=trt)
            key = engine_key_for(job.onnx_path, job.precision, trt, cudart)
            tolerance = TOLERANCE[job.precision]
            report = verify_engine(engine, inputs, outputs, tolerance, input_specs=spec.inputs,
                                   output_specs=spec.outputs, key=key, trt=trt, cudart=cudart)
            logger.info("engine %s %s verified against the bundle's reference: %s", job.graph, job.variant,
                        report.summary())
            relative = f"{ENGINES_DIR}/{job.graph}_{job.variant}.engine"
            save_engine(engine, key, staging / Path(relative).name)
            entries.append({"graph": job.graph, "variant": job.variant, "path": relative, **key.to_dict(),
                            "atol": tolerance.atol, "rtol": tolerance.rtol,
                            "max_abs_error": float(max((o.max_abs_error for o in report.outputs), default=0.0))})
        _install(root, bundle.manifest, staging, entries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


def _install(root: Path, manifest: dict, staging: Path, entries: list[dict]) -> None:
    """Move the verified engines in, then replace the manifest in one rename; the hashes of the files
    that did not change are kept."""
    engines_dir = root / ENGINES_DIR
    engines_dir.mkdir(exist_ok=True)
    files = {relative: digest for relative, digest in manifest["files"].items()
             if not relative.startswith(f"{ENGINES_DIR}/")}
    for entry in entries:
        for relative in (entry["path"], entry["path"] + KEY_SUFFIX):
            os.replace(staging / Path(relative).name, root / relative)
            files[relative] = file_sha256(root / relative)
    for stale in sorted(engines_dir.iterdir()):  # engines of an earlier build that this one did not make
        relative = f"{ENGINES_DIR}/{stale.name}"
        if relative not in files and stale.is_file():
            stale.unlink()
    # The shared writer rehashes the files, checks the result against the runtime's schema and writes
    # the manifest's own digest, so the runtime trusts the updated bundle.
    write_manifest(root, {**manifest, "engines": entries})
    logger.info("bundle %s: %d engines installed, manifest updated", root, len(entries))
