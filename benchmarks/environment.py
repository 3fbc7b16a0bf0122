"""The machine, libraries and bundle a run measured, recorded beside its numbers."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from importlib import metadata, util
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from edge.inference.bundle import MANIFEST, Bundle, file_sha256
from edge.service.jetson_power import check_jetson_power

logger = logging.getLogger(__name__)


def _cpu_info() -> dict:
    info: dict[str, Any] = {"logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        info["error"] = f"/proc/cpuinfo unreadable: {exc}"
        return info
    first = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            first[key.strip()] = value.strip()
    info["model"] = first.get("model name") or first.get("Hardware") or first.get("CPU part") or platform.processor()
    info["flags"] = (first.get("flags") or first.get("Features") or "").split()
    tree_model = Path("/proc/device-tree/model")  # Jetson boards name themselves here
    if tree_model.is_file():
        info["board"] = tree_model.read_bytes().rstrip(b"\0").decode(errors="replace")
    return info


def _gpu_info() -> dict:
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=15, check=True)
            return {"present": True, "nvidia_smi": [line.strip() for line in done.stdout.splitlines() if line.strip()]}
        except (subprocess.SubprocessError, OSError) as exc:
            logger.info("nvidia-smi failed: %s", exc)
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        return {"present": True, "jetson_release": tegra.read_text().strip().splitlines()[0]}
    if util.find_spec("cuda") is not None:
        from edge.inference import cuda

        try:
            return {"present": True, "name": cuda.device_name(), "compute_capability": cuda.device_compute_capability()}
        except EdgeError as exc:
            return {"present": False, "reason": str(exc)}
    return {"present": False, "reason": "no nvidia-smi, no Jetson release file, no cuda-python"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(bundle: Bundle) -> dict:
    import onnxruntime

    packages = ("numpy", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "opencv-python", "tokenizers",
                "pyserial", "torch", "tensorrt", "cuda-python", "torch-tensorrt", "matplotlib", "vla-edge")
    manifest = bundle.manifest
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_info(),
        "load_average_at_start": list(os.getloadavg()),  # other work on the machine makes every number noisier
        "gpu": _gpu_info(),
        # On a Jetson: the power mode and whether jetson_clocks locked the clocks (doctor's own check), since
        # a lower mode or dynamic clocks make every number slower and noisier; [] elsewhere.
        "jetson_power": [result.to_dict() for result in check_jetson_power()],
        "libraries": {p: _version(p) for p in packages},
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "bundle": {
            "path": str(bundle.root.resolve()),
            "manifest_sha256": file_sha256(bundle.root / MANIFEST),
            "created_unix": manifest.get("created_unix"),
            "builder": manifest.get("builder"),
            "targets": sorted(manifest["targets"]),
            "engines": len(bundle.engines),
            "max_samples": int(bundle.dropout["max_samples"]),
        },
    }

