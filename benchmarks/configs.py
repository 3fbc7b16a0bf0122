"""The side-by-side run's columns: one Config per backend/precision and T, and the pipelines behind them."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import util
from typing import Any

import numpy as np

from benchmarks.settings import ORT_KEYS, BenchSettings
from edge.errors import EdgeError
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline, StageTimes
from edge.service.config import RobotConfig, config_from_dict
from edge.service.wiring import rebuild_command

logger = logging.getLogger(__name__)


@dataclass
class Config:
    """One column of the side-by-side comparison: a backend/precision at one sample count T."""

    key: str
    samples: int
    family: str  # runtime | torch | language
    iterations: int
    run: Callable[[], dict[str, float]]  # one timed iteration -> milliseconds per stage, "total" included
    warmup: int | None = None  # untimed iterations first; None: the settings' warm-up count

    @property
    def id(self) -> str:
        return self.key if self.family == "language" else f"{self.key}@T{self.samples}"


def policy_stages(times: StageTimes) -> dict[str, float]:
    """The pipeline's own stage times (PolicyPipeline.infer times them), under the benchmark's names:
    vision and head include their host<->device copies, which h2d and d2h show on their own."""
    return {"resize": times.resize_ms, "h2d": times.h2d_ms, "vision": times.vision_ms, "head": times.head_ms,
            "d2h": times.d2h_ms, "reduce": times.reduce_ms}


def runtime_step(pipeline: PolicyPipeline, samples: int, frame: np.ndarray, proprio: np.ndarray,
                 embedding: np.ndarray) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        pipeline.set_mc_samples(samples)
        started = time.perf_counter()
        out = pipeline.infer(frame, proprio, embedding)
        total = (time.perf_counter() - started) * 1e3
        stages = policy_stages(out.times)
        stages["total"] = total
        return stages

    return run


def language_step(pipeline: PolicyPipeline, base: str) -> Callable[[], dict[str, float]]:
    """Tokenize + language encoder for a text not seen before, as on an instruction change.

    Drives the pipeline's tokenizer and language backend directly: `cache.encode_now` would also queue
    the text for the background encoder, which then encodes it a second time beside the measurement.
    """
    language = pipeline.backends["language"]
    ids, attention = language.input("input_ids"), language.input("attention_mask")
    counter = itertools.count()

    def run() -> dict[str, float]:
        text = f"{base} {next(counter)}"
        started = time.perf_counter()
        pipeline.tokenizer.encode_into(text, ids[0], attention[0])
        language.run(1)
        return {"total": (time.perf_counter() - started) * 1e3}

    return run


def tensorrt_status() -> tuple[bool, str]:
    """Whether TensorRT engines can run here, with the reason when not."""
    try:
        from build_engines.tensorrt_builder import tensorrt_status as status
    except ImportError as exc:  # a robot without the build extras: ask the runtime's own adapter
        from edge.inference import cuda
        from edge.inference.backends.tensorrt import load_tensorrt

        logger.debug("build_engines not importable (%s); checking TensorRT through edge", exc)
        try:
            trt = load_tensorrt()
            if cuda.device_count() < 1:
                return False, f"no CUDA GPU visible for TensorRT {trt.__version__}"
        except EdgeError as err:
            return False, str(err)
        return True, f"TensorRT {trt.__version__}"
    return status()


@dataclass(frozen=True)
class PipelineSpec:
    """One runtime configuration, as the robot.yaml `policy` section that selects it."""

    key: str
    target: str
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    device: str = "cpu"  # onnxruntime only: cpu | cuda

    def policy(self, samples: int, *, threads: int = 0, mask_seed: int = 0) -> dict[str, Any]:
        """The `policy` section that runs this configuration at T = ``samples``."""
        policy: dict[str, Any] = {"target": self.target, "mc_samples": samples}
        if self.backend != "onnxruntime":
            policy["backend"] = self.backend
        if self.device != "cpu":
            policy["device"] = self.device
        policy["threads"] = threads  # explicit, 0 = ONNX Runtime's default: the configuration is not tuned
        if mask_seed:
            policy["mask_seed"] = mask_seed
        return policy


def robot_config(bundle: Bundle, policy: dict[str, Any], *, camera_url: str | int = 0, serial: str = "loop://",
                 camera_fps: float | None = None, **sections: dict[str, Any]) -> RobotConfig:
    """A RobotConfig for the runtime's own wiring (edge.service.wiring). Camera and motor are placeholders
    where only the policy is built; the closed loop gives the simulator's (and its camera's rate, which
    turns frame-synchronous ticks on as in a robot.yaml that states camera.fps)."""
    camera = {"source": camera_url, "open_timeout_s": 15.0, **({"fps": camera_fps} if camera_fps else {})}
    return config_from_dict({"bundle": str(bundle.root), "camera": camera, "motor": {"port": serial},
                             "policy": policy, **sections})


def pipeline_specs(bundle: Bundle, settings: BenchSettings, unavailable: dict[str, str]) -> list[PipelineSpec]:
    """The runtime configurations this machine and bundle can run; the others go into `unavailable`."""
    targets = bundle.manifest["targets"]
    specs = []
    for target in settings.targets:
        key = ORT_KEYS.get(target, f"ort-{target}")
        if target in targets:
            specs.append(PipelineSpec(key, target))
        else:
            unavailable[key] = f"the bundle has no {target!r} target (it has {sorted(targets)})"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        for target, key in (("cpu-fp32", "ort-cuda-fp32"), ("fp16", "ort-cuda-fp16")):
            if target in targets:
                specs.append(PipelineSpec(key, target, device="cuda"))
            else:
                unavailable[key] = f"the bundle has no {target!r} target"
    else:
        reason = "onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu, and a GPU)"
        unavailable["ort-cuda-fp32"] = unavailable["ort-cuda-fp16"] = reason
    available, why = tensorrt_status()
    for target, key in (("tensorrt", "trt-int8"), ("fp16", "trt-fp16")):
        if not available:
            unavailable[key] = why
            continue
        variants = targets.get(target)
        if variants is None:
            unavailable[key] = f"the bundle has no {target!r} target"
            continue
        engines = {(e.graph, e.variant) for e in bundle.engines}
        missing = [f"{g}/{v}" for g, v in variants.items() if (g, v) not in engines]
        if missing:
            unavailable[key] = (f"{why}, but the bundle has no engines for {missing}; build them on this device "
                                f"with: {rebuild_command(bundle.root)}")
            continue
        specs.append(PipelineSpec(key, target, backend="tensorrt"))
    if util.find_spec("torch_tensorrt") is None:
        unavailable["torch-tensorrt"] = "torch-tensorrt is not installed"
    else:
        unavailable["torch-tensorrt"] = "torch-tensorrt is installed, but this benchmark does not compile with it yet"
    return specs

