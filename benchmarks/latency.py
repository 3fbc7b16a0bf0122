"""Latency benchmark of the VLA edge runtime: where a tick's time goes, per backend and precision.

    python -m benchmarks.latency --bundle artifacts/bundle [--quick | --long] [--out DIR]

The numbers that matter are ratios measured side by side in ONE run (design brief, "What fast means
here"); absolute milliseconds mean something only on the target. Three parts:

1. Pure inference, side by side and INTERLEAVED: every round runs one iteration of each configuration,
   in an order that rotates from round to round, so drift of the machine hits all of them alike.
   Configurations: PyTorch eager FP32 (the seeds' way: deterministic, and MC-dropout as T full passes
   of the whole model; plus the head batched, which separates the algorithm's gain from the engine's),
   ONNX Runtime FP32, INT8 CPU layout and INT8 TensorRT Q/DQ layout, and TensorRT or ONNX Runtime CUDA
   where present; T in {1, 8, 32}; without and with a competing CPU load (a separate process that
   burns one core, paused with SIGSTOP outside the loaded half of each round). The language encoder is
   timed on its own: it runs when the instruction changes, never inside a tick.
2. The full tick in closed loop: the real ControlLoop against the simulated motor controller running as
   its own process (a real pty and an MJPEG camera stream), T cycling over the sample counts tick by
   tick. Thin wrappers around the real camera, pipeline, gate, safety layer and link time each stage.
3. Start-up and memory: the runtime's RSS in a subprocess that imports only `edge` (it reports whether
   torch got imported), and start-to-first-command of `vla-edge run` against the simulator.

Writes latency.json, latency.md, latency_cdf.png, stage_bars.png and tick_jitter.png into --out.
Nothing in `edge/` imports this module; torch is imported only for the PyTorch comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import itertools
import json
import logging
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

import numpy as np

from edge.control.loop import ControlLoop, Mode
from edge.control.realtime import freeze_gc_after_warmup
from edge.control.safety import SafetyConfig, SafetyLayer
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.errors import BackendError, BundleError, ConfigError, EdgeError
from edge.inference.backends.base import InferenceBackend, RunTiming
from edge.inference.bundle import MANIFEST, Bundle, file_sha256
from edge.inference.pipeline import BackendFactory, PolicyPipeline, onnxruntime_factory
from edge.io.camera import Camera, CameraConfig
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "vla-edge-latency/1"
RATE_HZ = 10.0
PERIOD_S = 1.0 / RATE_HZ
PERCENTILES = (50.0, 90.0, 99.0, 100.0)
# Stages of pure inference (PolicyPipeline.infer plus the backends' copy timings).
POLICY_STAGES = ("resize", "h2d", "vision", "head", "d2h", "reduce")
# Stages of one closed-loop tick, in the order they happen.
TICK_STAGES = ("camera_read", *POLICY_STAGES, "gate_safety", "serial_write")
LOADS = ("unloaded", "loaded")
# Bundle target -> configuration key on ONNX Runtime CPU.
ORT_KEYS = {"cpu-fp32": "ort-fp32", "cpu": "ort-int8-cpu", "tensorrt": "ort-int8-trt-layout", "fp16": "ort-fp16"}
LABELS = {
    "ort-fp32": "ONNX Runtime CPU, FP32 graphs (target cpu-fp32)",
    "ort-int8-cpu": "ONNX Runtime CPU, INT8 CPU layout (target cpu)",
    "ort-int8-trt-layout": "ONNX Runtime CPU, INT8 TensorRT Q/DQ layout (target tensorrt)",
    "ort-fp16": "ONNX Runtime CPU, FP16 graphs (target fp16)",
    "ort-cuda-fp32": "ONNX Runtime CUDA, FP32 graphs",
    "ort-cuda-fp16": "ONNX Runtime CUDA, FP16 graphs",
    "trt-int8": "TensorRT engines, INT8 (target tensorrt)",
    "trt-fp16": "TensorRT engines, FP16 (target fp16)",
    "torch-deterministic": "PyTorch eager FP32, deterministic (one full pass)",
    "torch-seeds-mc": "PyTorch eager FP32, MC the seeds' way (T full passes)",
    "torch-batched-mc": "PyTorch eager FP32, encoders once + head batched",
}
DEFAULT_TARGETS = ("cpu-fp32", "cpu", "tensorrt")
MODES = {
    # quick: <= 2 minutes on 2 CPU cores; long: more iterations and a longer jitter run.
    "quick": {"iterations": 30, "torch_iterations": 6, "warmup": 3, "jitter_seconds": 10.0, "budget_seconds": 50.0,
              "load_bound_s": 900.0},
    "long": {"iterations": 300, "torch_iterations": 40, "warmup": 10, "jitter_seconds": 120.0,
             "budget_seconds": 1200.0, "load_bound_s": 3600.0},
}


@dataclass(frozen=True)
class BenchSettings:
    mode: str = "quick"
    iterations: int = 30  # timed iterations per runtime configuration and load condition
    torch_iterations: int = 6  # the same for PyTorch eager (32 full passes per iteration are slow)
    warmup: int = 3  # untimed iterations per configuration before the rounds
    jitter_seconds: float = 10.0  # closed-loop run per load condition
    budget_seconds: float = 50.0  # side by side: no new round starts after this (a slow machine stays quick)
    samples: tuple[int, ...] = (1, 8, 32)  # Monte-Carlo sample counts T
    targets: tuple[str, ...] = DEFAULT_TARGETS  # bundle targets to run on ONNX Runtime CPU
    closed_loop_config: str | None = None  # configuration key for the closed loop; None: best available
    load: bool = True
    torch: bool = True
    closed_loop: bool = True
    startup: bool = True
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default), as policy.threads in robot.yaml
    seed: int = 0
    checkpoint: str | None = None  # reference policy checkpoint for PyTorch eager (None: the default)
    load_bound_s: float = 900.0  # the load process exits by itself after this long, whatever happens here
    # SCHED_FIFO priority of the control thread in the closed loop, as systemd/vla-edge.service starts it
    # (CPUSchedulingPriority=50); None: normal scheduling only. Where FIFO is granted, every load
    # condition also runs once at normal priority for comparison.
    fifo_priority: int | None = 50
    segment_seconds: float = 10.0  # closed-loop conditions take turns in segments this long


# --- statistics ----------------------------------------------------------------------------------


def summarize(values) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of the finite values (only n when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"n": 0}
    p50, p90, p99, top = np.percentile(array, PERCENTILES)
    return {"n": int(array.size), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(top),
            "mean": float(array.mean())}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not math.isfinite(numerator) or not math.isfinite(denominator):
        return None
    if denominator <= 0.0:
        return None
    return numerator / denominator


def _finite_json(value: Any) -> Any:
    """NaN and infinities become null, so the JSON is standard and every number in it is finite."""
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


# --- the competing CPU load -----------------------------------------------------------------------

# The load process: dies with the benchmark (PR_SET_PDEATHSIG, so even while stopped), stops itself at
# once (the benchmark resumes it for the loaded rounds) and exits by itself after its time bound.
_BURN_SCRIPT = r"""
import ctypes, os, signal, sys, time
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError) as exc:
    print(f"cpu load: no PR_SET_PDEATHSIG ({exc}); relying on the time bound", file=sys.stderr)
end = time.monotonic() + float(sys.argv[1])
os.kill(os.getpid(), signal.SIGSTOP)
x = 0
while time.monotonic() < end:
    for _ in range(20000):
        x += 1
"""


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; fields after it are space-separated.
    return text[text.rindex(")") + 2 :].split()


class CpuBurner:
    """A separate process that burns one core while resumed and is stopped (SIGSTOP) otherwise.

    ``start()`` leaves it paused; ``resume()``/``pause()`` switch the load on and off and return only
    once the kernel shows the new state; ``stop()`` kills it. It is bounded in time three ways: it
    exits by itself after ``max_seconds``, it is killed when this process dies, and ``stop()``.
    """

    def __init__(self, max_seconds: float, state_timeout_s: float = 5.0):
        if not max_seconds > 0:
            raise ConfigError(f"cpu load max_seconds must be > 0, got {max_seconds!r}")
        self.max_seconds = float(max_seconds)
        self.state_timeout_s = state_timeout_s
        self._process: subprocess.Popen | None = None
        self._resumed_at: float | None = None
        self.loaded_wall_s = 0.0

    def start(self) -> CpuBurner:
        if self._process is not None:
            raise RuntimeError("cpu load already started")
        self._process = subprocess.Popen([sys.executable, "-c", _BURN_SCRIPT, repr(self.max_seconds)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._wait_state(lambda state: state == "T", "stopped")
        logger.info("cpu load process %d ready (paused; exits by itself after %.0f s)", self.pid, self.max_seconds)
        return self

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("cpu load not started")
        return self._process.pid

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def is_loading(self) -> bool:
        return self._resumed_at is not None

    def resume(self) -> None:
        if self._resumed_at is not None:
            return
        self._require_alive()
        os.kill(self.pid, signal.SIGCONT)
        self._wait_state(lambda state: state != "T", "running")
        self._resumed_at = time.monotonic()

    def pause(self) -> None:
        if self._resumed_at is None:
            return
        self._require_alive()
        os.kill(self.pid, signal.SIGSTOP)
        self._wait_state(lambda state: state == "T", "stopped")
        self.loaded_wall_s += time.monotonic() - self._resumed_at
        self._resumed_at = None

    def cpu_seconds(self) -> float:
        """User + system CPU time the load process has burnt so far."""
        fields = _proc_stat(self.pid)
        if fields is None:
            return math.nan
        # utime and stime are fields 14 and 15 of /proc/PID/stat; the list starts at field 3 (state).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._resumed_at is not None:
            self.loaded_wall_s += time.monotonic() - self._resumed_at
            self._resumed_at = None
        if process.poll() is None:
            process.kill()  # SIGKILL also ends a stopped process
        process.wait(timeout=self.state_timeout_s)

    def __enter__(self) -> CpuBurner:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _require_alive(self) -> None:
        if not self.is_running:
            raise RuntimeError(f"cpu load process exited (code {self._process and self._process.returncode}); "
                               f"its time bound of {self.max_seconds:.0f} s may be too short for this run")

    def _wait_state(self, wanted: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + self.state_timeout_s
        while time.monotonic() < deadline:
            fields = _proc_stat(self.pid)
            if fields is None or self._process.poll() is not None:
                raise RuntimeError(f"cpu load process {self.pid} exited while waiting for it to be {what}")
            if wanted(fields[0]):
                return
            time.sleep(0.002)
        raise RuntimeError(f"cpu load process {self.pid} did not become {what} within {self.state_timeout_s} s")


@contextlib.contextmanager
def _load_state(burner: CpuBurner | None, loaded: bool) -> Iterator[None]:
    if burner is not None and loaded:
        burner.resume()
        try:
            yield
        finally:
            burner.pause()
    else:
        yield


# --- the simulated robot in its own process -------------------------------------------------------


class SimulatorProcess:
    """`python -m simulator` as its own process, as the motor controller is its own hardware.

    ``start()`` returns once it has printed its serial path and camera URL; ``ground_truth()`` asks
    its ground-truth port (tests and benchmarks only; the runtime never uses it).
    """

    def __init__(self, seed: int = 0, log_path: Path | None = None, start_timeout_s: float = 30.0):
        self.seed = seed
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.paths: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._log = None
        self._socket: socket.socket | None = None
        self._reader = None

    def start(self) -> SimulatorProcess:
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--seed", str(self.seed), "--print-paths",
             "--ground-truth-port", "0", "--log-level", "WARNING"],
            cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
        )
        try:
            ready, _, _ = select.select([self._process.stdout], [], [], self.start_timeout_s)
            line = self._process.stdout.readline() if ready else b""
            if not line:
                raise RuntimeError(f"the simulator printed no paths within {self.start_timeout_s} s "
                                   f"(exit code {self._process.poll()}; log: {self.log_path})")
            self.paths = json.loads(line)
            host, port = self.paths["ground_truth"].rsplit(":", 1)
            self._socket = socket.create_connection((host, int(port)), timeout=5.0)
            self._reader = self._socket.makefile("rb")
        except BaseException:
            self.stop()
            raise
        logger.info("simulator process %d: serial %s, camera %s", self._process.pid, self.paths["serial"],
                    self.paths["camera_url"])
        return self

    def ground_truth(self) -> dict:
        if self._socket is None:
            raise RuntimeError("simulator not started")
        self._socket.sendall(b"ground_truth\n")
        reply = json.loads(self._reader.readline())
        if not reply.get("ok"):
            raise RuntimeError(f"simulator ground truth failed: {reply}")
        return reply["ground_truth"]

    def stop(self) -> None:
        for closer in (self._reader, self._socket):
            if closer is not None:
                closer.close()
        self._reader = self._socket = None
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    logger.warning("simulator process %d ignored SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait(timeout=5.0)
            process.stdout.close()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


# --- configurations -------------------------------------------------------------------------------


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


def _policy_stages(times, vision: RunTiming, head: RunTiming) -> dict[str, float]:
    """The pipeline's stage times with the backends' copies split out (0 on CPU backends)."""
    return {
        "resize": times.resize_ms,
        "h2d": vision.host_to_device_ms + head.host_to_device_ms,
        "vision": times.vision_ms - vision.host_to_device_ms - vision.device_to_host_ms,
        "head": times.head_ms - head.host_to_device_ms - head.device_to_host_ms,
        "d2h": vision.device_to_host_ms + head.device_to_host_ms,
        "reduce": times.reduce_ms,
    }


def runtime_step(pipeline: PolicyPipeline, samples: int, frame: np.ndarray, proprio: np.ndarray,
                 embedding: np.ndarray) -> Callable[[], dict[str, float]]:
    backends = pipeline.backends

    def run() -> dict[str, float]:
        pipeline.set_mc_samples(samples)
        started = time.perf_counter()
        out = pipeline.infer(frame, proprio, embedding)
        total = (time.perf_counter() - started) * 1e3
        stages = _policy_stages(out.times, backends["vision"].last_timing, backends["head"].last_timing)
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


def tensorrt_factory(bundle: Bundle) -> BackendFactory:
    """Backends on the bundle's TensorRT engines (as `vla-edge run` builds them with backend: tensorrt)."""
    from edge.inference.backends.tensorrt import TensorRTBackend
    from edge.inference.engine_key import EngineKey

    engines = {(e.graph, e.variant): e for e in bundle.engines}

    def make(graph: str, variant: str, inputs, outputs, max_batch: int) -> InferenceBackend:
        entry = engines.get((graph, variant))
        if entry is None:
            raise BundleError(f"bundle {bundle.root} has no TensorRT engine for the {variant} {graph} graph; "
                              f"build engines on this device with: build-engines --int8 --out {bundle.root} --force")
        key = EngineKey(entry.source_sha256, entry.tensorrt_version, entry.compute_capability, entry.precision)
        return TensorRTBackend(bundle.path(entry.path), key, inputs, outputs, max_batch)

    return make


@dataclass
class PipelineSpec:
    key: str
    target: str
    factory: BackendFactory | None  # None: ONNX Runtime CPU


def pipeline_specs(bundle: Bundle, settings: BenchSettings, unavailable: dict[str, str]) -> list[PipelineSpec]:
    """The runtime configurations this machine and bundle can run; the others go into `unavailable`."""
    targets = bundle.manifest["targets"]
    specs = []
    for target in settings.targets:
        key = ORT_KEYS.get(target, f"ort-{target}")
        if target in targets:
            specs.append(PipelineSpec(key, target, onnxruntime_factory(bundle, threads=settings.threads)))
        else:
            unavailable[key] = f"the bundle has no {target!r} target (it has {sorted(targets)})"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        for target, key in (("cpu-fp32", "ort-cuda-fp32"), ("fp16", "ort-cuda-fp16")):
            if target in targets:
                specs.append(PipelineSpec(key, target, onnxruntime_factory(bundle, "cuda", settings.threads)))
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
                                f"with: build-engines --int8 --out {bundle.root} --force")
            continue
        specs.append(PipelineSpec(key, target, tensorrt_factory(bundle)))
    if util.find_spec("torch_tensorrt") is None:
        unavailable["torch-tensorrt"] = "torch-tensorrt is not installed"
    else:
        unavailable["torch-tensorrt"] = "torch-tensorrt is installed, but this benchmark does not compile with it yet"
    return specs


@dataclass
class _TorchObservation:
    frame: np.ndarray
    proprio: np.ndarray
    instruction: str


def torch_configs(bundle: Bundle, settings: BenchSettings, observation, unavailable: dict[str, str],
                  notes: dict[str, Any]) -> list[Config]:
    """PyTorch eager FP32 the seeds' way (TorchPolicy); imports torch here only, and only if installed."""
    keys = ("torch-deterministic", "torch-seeds-mc", "torch-batched-mc")
    if not settings.torch:
        for key in keys:
            unavailable[key] = "skipped (--no-torch)"
        return []
    if util.find_spec("torch") is None:
        for key in keys:
            unavailable[key] = "torch is not installed (pip install -e '.[build]' for the comparison)"
        return []
    try:
        import torch

        from reference_policy.encoders import MissingWeightsError
        from reference_policy.model import (
            DEFAULT_CHECKPOINT_DIR,
            CheckpointError,
            HeadConfig,
            PolicyHead,
            load_head,
        )
        from reference_policy.policy import TorchPolicy
    except ImportError as exc:
        for key in keys:
            unavailable[key] = f"the reference policy cannot be imported: {exc}"
        return []
    checkpoint = Path(settings.checkpoint) if settings.checkpoint else DEFAULT_CHECKPOINT_DIR
    try:
        head = load_head(checkpoint)
        notes["torch_weights"] = f"checkpoint {checkpoint}"
    except CheckpointError as exc:
        # Latency does not depend on the weights: the same architecture with the bundle's dropout
        # description stands in, and the report says so.
        dropout = bundle.dropout
        torch.manual_seed(settings.seed)
        head = PolicyHead(HeadConfig(width=int(dropout["widths"][0]), dropout_layers=int(dropout["layers"]),
                                     dropout_p=float(dropout["rate"]), action_dim=int(bundle.action["dim"]))).eval()
        notes["torch_weights"] = f"random weights, same architecture (no checkpoint: {exc})"
    try:
        policy = TorchPolicy(checkpoint, head=head, mask_seed=settings.seed)
    except (MissingWeightsError, OSError) as exc:
        for key in keys:
            unavailable[key] = f"PyTorch reference policy not loadable: {exc}"
        return []
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)  # like for like with ONNX Runtime's intra-op threads
    notes["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    obs = _TorchObservation(observation.frame, np.asarray(observation.proprio, np.float32), observation.instruction)

    def timed(call: Callable[[], object]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            started = time.perf_counter()
            call()
            return {"total": (time.perf_counter() - started) * 1e3}

        return run

    def seeds(samples: int) -> Callable[[], object]:
        # The seeds' MC-dropout: T forward passes of the WHOLE model (vision encoder included).
        return lambda: [policy.act_mc(obs, 1) for _ in range(samples)]

    def batched(samples: int) -> Callable[[], object]:
        return lambda: policy.act_mc(obs, samples)

    n = settings.torch_iterations
    # PyTorch has no lazy per-shape work worth more than one warm-up pass, and the seeds' T full passes
    # are the deterministic pass repeated: warming those up would only cost time.
    configs = [Config("torch-deterministic", 1, "torch", n, timed(lambda: policy.act(obs)), warmup=1)]
    configs += [Config("torch-seeds-mc", t, "torch", n, timed(seeds(t)), warmup=0) for t in settings.samples]
    configs += [Config("torch-batched-mc", t, "torch", n, timed(batched(t)), warmup=1) for t in settings.samples]
    return configs


# --- part 1: side by side, interleaved ------------------------------------------------------------


_MIN_ROUNDS = 2  # complete rounds the time budget never cuts; after them it is checked before every iteration


def run_interleaved(configs: list[Config], settings: BenchSettings, burner: CpuBurner | None) -> dict:
    """Round-robin over the configurations (rotating order), unloaded and loaded in every round.

    After ``_MIN_ROUNDS`` complete rounds no iteration starts once ``settings.budget_seconds`` are spent,
    so a slow or busy machine (one PyTorch iteration at T=32 is 32 full passes) still finishes in time.
    """
    loads = LOADS if burner is not None else LOADS[:1]
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        c.id: {load: {} for load in loads} for c in configs
    }
    for config in configs:
        for _ in range(settings.warmup if config.warmup is None else min(settings.warmup, config.warmup)):
            config.run()
    planned = max((c.iterations for c in configs), default=0)
    started = time.monotonic()
    rounds = 0
    spent = False
    for index in range(planned):
        shift = index % len(configs)
        order = configs[shift:] + configs[:shift]
        for load in loads:
            with _load_state(burner, load == "loaded"):
                for config in order:
                    if index >= config.iterations:
                        continue
                    if index >= _MIN_ROUNDS and time.monotonic() - started > settings.budget_seconds:
                        spent = True
                        break
                    for stage, ms in config.run().items():
                        samples[config.id][load].setdefault(stage, []).append(ms)
            if spent:
                break
        if spent:
            logger.warning("side by side: time budget of %.0f s spent in round %d of %d (--budget-seconds)",
                           settings.budget_seconds, index + 1, planned)
            break
        rounds += 1
        if index % 10 == 9:
            logger.info("side by side: round %d of %d (%.0f s)", index + 1, planned, time.monotonic() - started)
    results = {}
    for config in configs:
        entry = {"key": config.key, "label": LABELS.get(config.key, config.key), "family": config.family,
                 "samples": config.samples}
        for load in loads:
            raw = samples[config.id][load]
            total = raw.get("total", [])
            entry[load] = {
                "total": summarize(total),
                "stages": {stage: summarize(v) for stage, v in raw.items() if stage != "total"},
                "over_period": int(np.sum(np.asarray(total) > PERIOD_S * 1e3)),
                "values_ms": [float(v) for v in total],
            }
        results[config.id] = entry
    return {"rounds": rounds, "planned_rounds": planned, "budget_spent": spent, "seconds": time.monotonic() - started,
            "configs": results}


# --- part 2: the full tick in closed loop ----------------------------------------------------------


class _Timed:
    """Delegates everything to the wrapped runtime part; subclasses time the calls a tick makes."""

    def __init__(self, inner: Any, stages: dict[str, float]):
        self._inner = inner
        self._stages = stages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TimedCamera(_Timed):
    def read_into(self, out: np.ndarray):
        started = time.perf_counter()
        stamp = self._inner.read_into(out)
        self._stages["camera_read"] = (time.perf_counter() - started) * 1e3
        return stamp


class _TimedPipeline(_Timed):
    def infer(self, frame, proprio, language):
        out = self._inner.infer(frame, proprio, language)
        backends = self._inner.backends
        self._stages.update(_policy_stages(out.times, backends["vision"].last_timing, backends["head"].last_timing))
        return out


class _TimedGate(_Timed):
    def update(self, score: float):
        started = time.perf_counter()
        decision = self._inner.update(score)
        self._stages["gate_safety"] += (time.perf_counter() - started) * 1e3
        return decision


class _TimedSafety(_Timed):
    def apply(self, *args, **kwargs):
        started = time.perf_counter()
        result = self._inner.apply(*args, **kwargs)
        self._stages["gate_safety"] += (time.perf_counter() - started) * 1e3
        return result


class _TimedLink(_Timed):
    def send_velocity(self, targets):
        started = time.perf_counter()
        sent = self._inner.send_velocity(targets)
        self._stages["serial_write"] = (time.perf_counter() - started) * 1e3
        return sent


_TICK_RECORD = np.dtype([
    ("start_s", np.float64), ("start_jitter_ms", np.float64), ("samples", np.int32), ("mode", np.int8),
    ("tick_ms", np.float64), ("frame_age_ms", np.float64), *[(s, np.float64) for s in TICK_STAGES],
])


class InstrumentedLoop(ControlLoop):
    """The real ControlLoop; each tick also records its start offset from the grid, T and stage times.

    T cycles over ``samples_cycle`` tick by tick, so every T sees the same stretch of machine time.
    """

    def __init__(self, pipeline: PolicyPipeline, camera, link, safety, gate, *, samples_cycle: tuple[int, ...],
                 capacity: int, **kwargs):
        self.stages: dict[str, float] = {}
        super().__init__(_TimedPipeline(pipeline, self.stages), _TimedCamera(camera, self.stages),
                         _TimedLink(link, self.stages), _TimedSafety(safety, self.stages),
                         _TimedGate(gate, self.stages), PERIOD_S, **kwargs)
        self.samples_cycle = samples_cycle
        self.records = np.zeros(capacity, dtype=_TICK_RECORD)
        self.count = 0

    def take_over(self) -> None:
        """Start a segment after another condition's loop drove the robot meanwhile: a planned hand-over,
        not a stall of this loop, so no stall warning; the safety layer slews from standstill."""
        self._last_tick_s = None
        self.safety.reset()

    def tick(self) -> np.void:
        start = self.clock()
        scheduled = self.keeper.next_deadline_s - self.period_s
        samples = self.samples_cycle[self.count % len(self.samples_cycle)]
        self.pipeline.set_mc_samples(samples)
        for stage in TICK_STAGES:
            self.stages[stage] = math.nan
        self.stages["gate_safety"] = 0.0
        row = super().tick()
        if self.count < len(self.records):
            record = self.records[self.count]
            record["start_s"] = start
            record["start_jitter_ms"] = (start - scheduled) * 1e3
            record["samples"] = samples
            record["mode"] = row["mode"]
            record["tick_ms"] = row["tick_ms"]
            record["frame_age_ms"] = (start - row["frame_time_s"]) * 1e3
            for stage in TICK_STAGES:
                record[stage] = self.stages[stage]
        self.count += 1
        return row


def _safety_config(bundle: Bundle) -> SafetyConfig:
    action = bundle.action
    slew = tuple(float(v) for v in action["max_slew_per_s"])
    return SafetyConfig(action_low=tuple(float(v) for v in action["low"]),
                        action_high=tuple(float(v) for v in action["high"]),
                        max_slew_per_s=slew, decel_per_s=tuple(min(2.0, s) for s in slew), period_s=PERIOD_S)


def _gate_config(bundle: Bundle, target: str) -> GateConfig:
    threshold = bundle.uncertainty_threshold(target)
    ceiling = float(bundle.manifest["uncertainty"].get("hard_ceiling", {}).get(target, 3.0 * threshold))
    if not (math.isfinite(threshold) and threshold > 0):
        # A bundle whose gate saw no successful episode has no threshold; timing does not depend on it.
        logger.warning("bundle has no usable uncertainty threshold for %s (%r); the gate runs with 1.0", target,
                       threshold)
        threshold = ceiling = 1.0
    return GateConfig(threshold=threshold, hard_ceiling=max(ceiling, threshold) if math.isfinite(ceiling) else threshold)


SLOWEST_FRACTION = 0.05  # the slow tail that the tail attribution explains


def policy_ms(records: np.ndarray) -> np.ndarray:
    """Per tick, the time inside PolicyPipeline.infer (resize .. reduce): what the side-by-side run calls
    pure inference, here measured inside the loop. NaN for ticks that did not run the policy."""
    total = np.zeros(len(records))
    for stage in POLICY_STAGES:
        total += np.nan_to_num(records[stage], nan=0.0)
    total[~np.isfinite(records["vision"])] = np.nan
    return total


def tail_attribution(records: np.ndarray, fraction: float = SLOWEST_FRACTION) -> dict:
    """Which stage makes the slow ticks slow: for the slowest ``fraction`` of ticks, each stage's mean
    minus that stage's median over all ticks. "outside stages" is the rest of the tick (loop glue, the
    rate keeper's bookkeeping, being descheduled between stages)."""
    tick = records["tick_ms"]
    finite = np.isfinite(tick) & np.isfinite(records["vision"])
    if not finite.any():
        return {"n": 0}
    ran = records[finite]
    cutoff = float(np.quantile(ran["tick_ms"], 1.0 - fraction))
    slow = ran[ran["tick_ms"] >= cutoff]
    columns = {stage: ran[stage] for stage in TICK_STAGES}
    columns["outside stages"] = ran["tick_ms"] - sum(np.nan_to_num(ran[stage], nan=0.0) for stage in TICK_STAGES)
    slow_columns = {stage: slow[stage] for stage in TICK_STAGES}
    slow_columns["outside stages"] = columns["outside stages"][ran["tick_ms"] >= cutoff]
    excess = {}
    for stage, values in columns.items():
        median = float(np.nanmedian(values)) if np.isfinite(values).any() else 0.0
        slow_mean = float(np.nanmean(slow_columns[stage])) if np.isfinite(slow_columns[stage]).any() else 0.0
        excess[stage] = {"median": median, "slow_mean": slow_mean, "excess": slow_mean - median}
    return {"n": int(len(slow)), "fraction": fraction, "tick_cutoff_ms": cutoff,
            "tick_slow_mean_ms": float(slow["tick_ms"].mean()), "tick_median_ms": float(np.median(ran["tick_ms"])),
            "stages": excess, "largest": max(excess, key=lambda k: excess[k]["excess"])}


def _closed_loop_run(records: np.ndarray, loop: InstrumentedLoop, seconds: float, *, overruns: int,
                     missed_deadlines: int, origin_s: float | None = None) -> dict:
    finite_modes = records["mode"]
    stages = {stage: summarize(records[stage]) for stage in TICK_STAGES}
    policy = policy_ms(records)
    by_samples = {}
    for samples in loop.samples_cycle:
        chosen = records["samples"] == samples
        mine = records[chosen]
        by_samples[str(samples)] = {"tick": summarize(mine["tick_ms"]), "policy": summarize(policy[chosen]),
                                    **{stage: summarize(mine[stage]) for stage in TICK_STAGES}}
    start = origin_s if origin_s is not None else (records["start_s"][0] if len(records) else 0.0)
    return {
        "ticks": len(records),
        "seconds": seconds,
        "tick": summarize(records["tick_ms"]),
        "start_jitter": summarize(records["start_jitter_ms"]),
        "frame_age": summarize(records["frame_age_ms"]),
        "stages": stages,
        "policy": summarize(policy),
        "outside_policy": summarize(records["tick_ms"] - policy),
        "tail": tail_attribution(records),
        "by_samples": by_samples,
        "overruns": int(overruns),
        "missed_deadlines": int(missed_deadlines),
        "ticks_over_period": int(np.sum(records["tick_ms"] > PERIOD_S * 1e3)),
        "inferred_ticks": int(np.sum(np.isfinite(records["vision"]))),
        "modes": {mode.name.lower(): int(np.sum(finite_modes == mode)) for mode in Mode},
        "series": {
            "t_s": [float(v) for v in records["start_s"] - start],
            "start_jitter_ms": [float(v) for v in records["start_jitter_ms"]],
            "tick_ms": [float(v) for v in records["tick_ms"]],
            "samples": [int(v) for v in records["samples"]],
        },
    }


NORMAL_PRIORITY = "normal priority"


@contextlib.contextmanager
def _thread_scheduling(fifo_priority: int | None) -> Iterator[str]:
    """The calling thread (the control loop) at SCHED_FIFO ``fifo_priority``, as the systemd unit starts
    the service, and back to SCHED_OTHER afterwards. Yields what is in effect; raises OSError where
    the kernel refuses FIFO. Threads started earlier (camera, serial reader) keep normal priority,
    as under the unit (CPUSchedulingResetOnFork=yes)."""
    if fifo_priority is None:
        yield "SCHED_OTHER"
        return
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo_priority))
    try:
        yield f"SCHED_FIFO {fifo_priority}"
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _fifo_refusal(priority: int | None) -> str | None:
    """None where this process may run a thread at SCHED_FIFO ``priority``; otherwise why not."""
    if priority is None:
        return "not asked for (--no-fifo)"
    if not hasattr(os, "SCHED_FIFO"):
        return "this platform has no SCHED_FIFO"
    try:
        with _thread_scheduling(priority):
            pass
    except OSError as exc:
        return (f"SCHED_FIFO {priority} refused ({errno.errorcode.get(exc.errno, exc.errno)}): run as root or "
                f"with LimitRTPRIO={priority}, as the systemd unit does")
    return None


def closed_loop_conditions(loads: tuple[str, ...], fifo_refused: str | None,
                           fifo_priority: int | None) -> list[tuple[str, str, int | None]]:
    """(run key, load, FIFO priority or None) in run order. The plain load keys are the deployed
    scheduling (FIFO where granted), which the ratios use; "<load>, normal priority" runs follow."""
    if fifo_refused is not None:
        return [(load, load, None) for load in loads]
    return [*[(load, load, fifo_priority) for load in loads],
            *[(f"{load}, {NORMAL_PRIORITY}", load, None) for load in loads]]


def steal_ms() -> float | None:
    """CPU time the hypervisor gave to other guests, all CPUs together, since boot (the "steal" column
    of /proc/stat); None where there is no such counter. A burst of it stalls any thread, FIFO or not."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return float(fields[8]) * 1e3 / os.sysconf("SC_CLK_TCK")


def segment_plan(conditions: list[str], ticks: int, segment_ticks: int) -> list[tuple[str, int]]:
    """(condition, ticks) in run order: every condition runs ``ticks`` in segments of ``segment_ticks``,
    round robin with the order rotating each round, so a burst of machine noise (a neighbour, the
    hypervisor) falls on all conditions alike instead of on whichever ran during it."""
    plan: list[tuple[str, int]] = []
    remaining = dict.fromkeys(conditions, ticks)
    segment_ticks = max(1, segment_ticks)
    round_index = 0
    while any(remaining.values()):
        shift = round_index % len(conditions)
        for condition in conditions[shift:] + conditions[:shift]:
            count = min(segment_ticks, remaining[condition])
            if count:
                plan.append((condition, count))
                remaining[condition] -= count
        round_index += 1
    return plan


def _segment(records: np.ndarray, stolen_ms: float | None) -> dict:
    return {"ticks": int(len(records)), "steal_ms": stolen_ms,
            "start_jitter_p99": summarize(records["start_jitter_ms"]).get("p99"),
            "tick_p99": summarize(records["tick_ms"]).get("p99")}


def steal_split(segments: list[dict]) -> dict | None:
    """Jitter and tick p99 in the segments with the least hypervisor steal vs those with the most (the
    halves of the segments sorted by steal): how much of a run's tail the machine, not the code, made."""
    known = [s for s in segments if s["steal_ms"] is not None and s["start_jitter_p99"] is not None]
    if len(known) < 2:
        return None
    known.sort(key=lambda s: s["steal_ms"])
    half = len(known) // 2
    out = {}
    for name, part in (("least", known[:half]), ("most", known[-half:])):
        out[name] = {"segments": len(part), "steal_ms_mean": float(np.mean([s["steal_ms"] for s in part])),
                     "start_jitter_p99_median": float(np.median([s["start_jitter_p99"] for s in part])),
                     "tick_p99_median": float(np.median([s["tick_p99"] for s in part]))}
    return out


def run_closed_loop(bundle: Bundle, pipeline: PolicyPipeline, target: str, simulator: SimulatorProcess,
                    settings: BenchSettings, burner: CpuBurner | None) -> dict:
    """The real ControlLoop at 10 Hz against the simulator, per load and scheduling condition, the
    conditions interleaved in segments (``segment_plan``)."""
    truth = simulator.ground_truth()
    instruction = truth["instruction"]
    pipeline.cache.encode_now(instruction)  # ready before the first tick: the loop must not sit in HOLD
    camera = Camera(CameraConfig(source=simulator.paths["camera_url"], open_timeout_s=15.0))
    link = SerialMotorLink(MotorLinkConfig(port=simulator.paths["serial"]))
    ticks = max(1, int(round(settings.jitter_seconds * RATE_HZ)))
    fifo_refused = _fifo_refusal(settings.fifo_priority)
    if fifo_refused is not None:
        logger.warning("closed loop at normal priority only: %s", fifo_refused)
    loads = LOADS if burner is not None else LOADS[:1]
    conditions = {key: (load, fifo) for key, load, fifo in
                  closed_loop_conditions(loads, fifo_refused, settings.fifo_priority)}
    runs = {}
    with camera, link:
        # Warm-up outside the measurement, as the service does before its first tick.
        for samples in settings.samples:
            pipeline.set_mc_samples(samples)
            frame = np.zeros(camera.frame_shape or (240, 320, 3), np.uint8)
            pipeline.infer(frame, np.zeros(int(bundle.action["dim"]), np.float32), pipeline.cache.encode_now(instruction))
        loops = {}
        for key in conditions:
            loops[key] = InstrumentedLoop(pipeline, camera, link, SafetyLayer(_safety_config(bundle)),
                                          UncertaintyGate(_gate_config(bundle, target)),
                                          samples_cycle=settings.samples, capacity=ticks, stale_after_s=3 * PERIOD_S,
                                          record_ticks=max(ticks, 10), summary_every_s=3600.0)
            loops[key].set_instruction(instruction)
        totals = {key: {"seconds": 0.0, "overruns": 0, "missed_deadlines": 0, "steal_ms": 0.0, "segments": []}
                  for key in conditions}
        scheduling = {}
        origin = time.monotonic()
        for key, count in segment_plan(list(conditions), ticks, int(round(settings.segment_seconds * RATE_HZ))):
            load, fifo = conditions[key]
            loop = loops[key]
            loop.take_over()
            steal_before, first = steal_ms(), min(loop.count, ticks)
            with _load_state(burner, load == "loaded"), _thread_scheduling(fifo) as scheduling[key]:
                started = time.monotonic()
                loop.run(threading.Event(), max_ticks=count)
                totals[key]["seconds"] += time.monotonic() - started
            steal_after = steal_ms()
            totals[key]["overruns"] += loop.keeper.overruns  # the rate keeper restarts with every run()
            totals[key]["missed_deadlines"] += loop.keeper.missed_deadlines
            stolen = None if steal_before is None or steal_after is None else steal_after - steal_before
            totals[key]["segments"].append(_segment(loop.records[first: min(loop.count, ticks)], stolen))
            if stolen is None:
                totals[key]["steal_ms"] = None
            elif totals[key]["steal_ms"] is not None:
                totals[key]["steal_ms"] += stolen
        loops[next(iter(loops))].stop_motors()
        for key, loop in loops.items():
            total = totals[key]
            runs[key] = _closed_loop_run(loop.records[: min(loop.count, ticks)], loop, total["seconds"],
                                         overruns=total["overruns"], missed_deadlines=total["missed_deadlines"],
                                         origin_s=origin)
            runs[key].update(load=conditions[key][0], scheduling=scheduling[key], segments=total["segments"],
                             steal_ms=total["steal_ms"], steal_split=steal_split(total["segments"]))
            logger.info("closed loop (%s, %s): %s", key, scheduling[key], loop.summary_line())
    return {"target": target, "instruction": instruction, "samples_cycle": list(settings.samples),
            "period_s": PERIOD_S, "segment_s": settings.segment_seconds, "runs": runs, "fifo_refused": fifo_refused}


# --- part 3: start-up and memory ------------------------------------------------------------------

# Runs in a fresh interpreter that imports only edge (and numpy, which edge imports): RSS of the
# runtime, and activation + first inference for the start-up fallback.
_RUNTIME_CHILD = r"""
import json, sys, time
started = time.monotonic()
import numpy as np
from edge.inference.bundle import Bundle
from edge.service.config import config_from_dict
from edge.inference.pipeline import PolicyPipeline
from edge.service.run import backend_factory
imported = time.monotonic()
bundle_dir, policy, iterations = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
# The service's own backend wiring; camera and motor are placeholders that are never opened here.
config = config_from_dict({"bundle": bundle_dir, "camera": {"source": 0}, "motor": {"port": "loop://"},
                           "policy": policy})
bundle = Bundle.load(bundle_dir)
pipeline = PolicyPipeline(bundle, target=policy["target"], mc_samples=policy["mc_samples"],
                          backend_factory=backend_factory(bundle, config))
pipeline.activate()
activated = time.monotonic()
known = list(bundle.embeddings())
embedding = pipeline.cache.encode_now(known[0] if known else "go to the red block")
frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
proprio = np.zeros(int(bundle.action["dim"]), np.float32)
pipeline.infer(frame, proprio, embedding)
first = time.monotonic()
for _ in range(iterations):
    pipeline.infer(frame, proprio, embedding)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda key: int(status[key].split()[0]) if key in status else None
forbidden = ("torch", "build_engines", "reference_policy", "reference_world", "simulator", "benchmarks")
print(json.dumps({
    "import_s": imported - started, "activate_s": activated - imported, "first_infer_s": first - activated,
    "activation_to_first_infer_s": first - imported, "first_infer_monotonic_s": first, "rss_mib": kib("VmRSS") / 1024, "peak_rss_mib": kib("VmHWM") / 1024,
    "torch_imported": "torch" in sys.modules,
    "forbidden_modules": sorted(m for m in forbidden if m in sys.modules),
    "modules": len(sys.modules), "iterations": iterations,
}))
pipeline.close()
"""


def _service_policy(spec: PipelineSpec, samples: int) -> dict:
    """The robot.yaml `policy` section that runs `spec` in the service."""
    policy: dict[str, Any] = {"target": spec.target, "mc_samples": samples}
    if spec.key.startswith("trt-"):
        policy["backend"] = "tensorrt"
    elif spec.key.startswith("ort-cuda-"):
        policy["device"] = "cuda"
    return policy


def measure_runtime_process(bundle_dir: Path, spec: PipelineSpec, samples: int, iterations: int = 20,
                            timeout_s: float = 120.0) -> dict:
    """RSS and start-up pieces of the runtime alone, in a subprocess that imports only edge."""
    policy = _service_policy(spec, samples)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _RUNTIME_CHILD, str(bundle_dir.resolve()), json.dumps(policy),
                           str(iterations)], cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise BackendError(f"the runtime subprocess failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Both processes stamp with CLOCK_MONOTONIC: this includes the interpreter's own start-up.
    result["spawn_to_first_infer_s"] = result.pop("first_infer_monotonic_s") - started
    result.update({"config": spec.key, "target": spec.target, "samples": samples,
                   "process_wall_s": time.monotonic() - started})
    return result


def _cli_command() -> list[str]:
    found = shutil.which("vla-edge")
    return [found] if found else [sys.executable, "-m", "edge.cli"]


def measure_start_to_first_command(bundle_dir: Path, spec: PipelineSpec, samples: int, simulator: SimulatorProcess,
                                   work_dir: Path, timeout_s: float = 90.0) -> dict:
    """Start `vla-edge run` on the simulator; time until the controller has seen its first command."""
    import yaml

    truth = simulator.ground_truth()
    policy = _service_policy(spec, samples)
    config = {
        "bundle": str(bundle_dir.resolve()),
        "camera": {"source": simulator.paths["camera_url"], "open_timeout_s": 15.0},
        "motor": {"port": simulator.paths["serial"]},
        "policy": policy,
        "instruction": {"initial": truth["instruction"]},
        "loop": {"summary_every_s": 3600.0},
    }
    config_path = work_dir / "robot.benchmark.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = work_dir / "vla-edge-run.log"
    command = [*_cli_command(), "run", "--config", str(config_path)]
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        first_command = None
        try:
            deadline = started + timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                seen = simulator.ground_truth()["last_valid_command_s"]
                # Both sides stamp with CLOCK_MONOTONIC, which all processes of a machine share.
                if seen is not None and seen > started:
                    first_command = seen - started
                    break
                time.sleep(0.02)
        finally:
            exit_code = process.poll()
            if exit_code is None:
                process.send_signal(signal.SIGTERM)
                try:
                    exit_code = process.wait(timeout=15.0)
                except subprocess.TimeoutExpired:
                    logger.warning("vla-edge run ignored SIGTERM for 15 s; killing it")
                    process.kill()
                    exit_code = process.wait(timeout=5.0)
    text = log_path.read_text(errors="replace")
    ready = re.search(r"ready ([0-9.]+) s after start", text)
    # Program names only: the report is shared, the paths of this machine mean nothing elsewhere.
    shown = " ".join([Path(command[0]).name, *command[1:3]])
    result = {"method": f"`vla-edge run` ({shown}) until the simulator saw its first command",
              "exit_code": exit_code, "log": str(log_path),
              "start_to_first_command_s": first_command,
              "service_ready_s": float(ready.group(1)) if ready else None}
    if first_command is None:
        result["error"] = (f"no command reached the controller within {timeout_s:.0f} s; last log lines: "
                           + " | ".join(text.strip().splitlines()[-3:]))
    return result


# --- environment ----------------------------------------------------------------------------------


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


# --- ratios ---------------------------------------------------------------------------------------


def _p(entry: dict | None, *path: str) -> float | None:
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry if isinstance(entry, (int, float)) else None


def compute_ratios(report: dict, settings: BenchSettings) -> dict[str, dict]:
    """The ratios the goals are stated in, each with what it divides."""
    configs = report["side_by_side"]["configs"]
    ratios: dict[str, dict] = {}

    def add(name: str, what: str, num: float | None, den: float | None, num_label: str, den_label: str) -> None:
        value = _ratio(num, den)
        if value is not None:
            ratios[name] = {"value": value, "what": what, "numerator_ms": num, "denominator_ms": den,
                            "numerator": num_label, "denominator": den_label}

    ts = sorted(settings.samples)
    ref_t = 8 if 8 in ts else ts[len(ts) // 2]

    def cfg(key: str, t: int) -> dict | None:
        return configs.get(f"{key}@T{t}")

    # INT8 / FP32 per graph (p50, unloaded).
    for key, name in (("ort-int8-cpu", "int8_cpu_layout"), ("ort-int8-trt-layout", "int8_tensorrt_layout")):
        add(f"{name}/fp32 vision", f"INT8/FP32 vision graph ({key} vs ort-fp32, p50, T={ref_t})",
            _p(cfg(key, ref_t), "unloaded", "stages", "vision", "p50"),
            _p(cfg("ort-fp32", ref_t), "unloaded", "stages", "vision", "p50"), key, "ort-fp32")
        for t in ts:
            add(f"{name}/fp32 head T={t}", f"INT8/FP32 head graph at T={t} ({key} vs ort-fp32, p50)",
                _p(cfg(key, t), "unloaded", "stages", "head", "p50"),
                _p(cfg("ort-fp32", t), "unloaded", "stages", "head", "p50"), key, "ort-fp32")
    if "trt-fp16" in {c["key"] for c in configs.values()}:
        add("tensorrt int8/fp16 vision", f"TensorRT INT8/FP16 vision engine (p50, T={ref_t})",
            _p(cfg("trt-int8", ref_t), "unloaded", "stages", "vision", "p50"),
            _p(cfg("trt-fp16", ref_t), "unloaded", "stages", "vision", "p50"), "trt-int8", "trt-fp16")

    closed = report.get("closed_loop") or {}
    runtime_key = closed.get("config") or report.get("runtime_key")
    unloaded = (closed.get("runs") or {}).get("unloaded")
    for t in ts:
        add(f"full tick p99 / pure inference p50 T={t}",
            f"closed-loop tick p99 vs median pure inference, {runtime_key}, T={t}",
            _p(unloaded, "by_samples", str(t), "tick", "p99"), _p(cfg(runtime_key, t), "unloaded", "total", "p50"),
            "closed-loop tick p99", "pure inference p50")
    for t in ts:
        # The same quotient with the denominator measured inside the loop: what the tick adds around the
        # policy, without the difference between a quiet machine and one that also runs the simulator.
        add(f"full tick p99 / in-loop policy p50 T={t}",
            f"closed-loop tick p99 vs median time inside the policy in the same ticks, {runtime_key}, T={t}",
            _p(unloaded, "by_samples", str(t), "tick", "p99"), _p(unloaded, "by_samples", str(t), "policy", "p50"),
            "closed-loop tick p99", "in-loop policy p50")
    add("in-loop vision / side-by-side vision", f"vision p50 inside the closed loop vs in the side-by-side run "
        f"({runtime_key}, T={ref_t}): the cost of sharing the CPU with the simulator and camera",
        _p(unloaded, "stages", "vision", "p50"), _p(cfg(runtime_key, ref_t), "unloaded", "stages", "vision", "p50"),
        "closed-loop vision", "side-by-side vision")
    lo, hi = ts[0], ts[-1]
    if hi != lo:
        add(f"tick T={hi} / T={lo}", f"closed-loop tick p50 at T={hi} vs T={lo} ({runtime_key})",
            _p(unloaded, "by_samples", str(hi), "tick", "p50"), _p(unloaded, "by_samples", str(lo), "tick", "p50"),
            f"tick T={hi}", f"tick T={lo}")
        add(f"pure inference T={hi} / T={lo}", f"pure inference p50 at T={hi} vs T={lo} ({runtime_key})",
            _p(cfg(runtime_key, hi), "unloaded", "total", "p50"), _p(cfg(runtime_key, lo), "unloaded", "total", "p50"),
            f"T={hi}", f"T={lo}")
        add(f"torch seeds T={hi} / T={lo}", f"PyTorch eager, T full passes: T={hi} vs T={lo}",
            _p(cfg("torch-seeds-mc", hi), "unloaded", "total", "p50"),
            _p(cfg("torch-seeds-mc", lo), "unloaded", "total", "p50"), f"T={hi}", f"T={lo}")

    add("torch deterministic / runtime T=1", f"PyTorch eager deterministic vs {runtime_key} at T=1 (p50)",
        _p(cfg("torch-deterministic", 1), "unloaded", "total", "p50"), _p(cfg(runtime_key, 1), "unloaded", "total", "p50"),
        "torch-deterministic", runtime_key)
    for t in ts:
        add(f"torch seeds MC / runtime T={t}", f"PyTorch eager, T full passes vs {runtime_key} (encoders once, "
            f"head batched), T={t}, p50", _p(cfg("torch-seeds-mc", t), "unloaded", "total", "p50"),
            _p(cfg(runtime_key, t), "unloaded", "total", "p50"), "torch-seeds-mc", runtime_key)
        add(f"torch batched MC / runtime T={t}", f"PyTorch eager with the runtime's algorithm vs {runtime_key}, "
            f"T={t}, p50 (the engine's share of the gain)", _p(cfg("torch-batched-mc", t), "unloaded", "total", "p50"),
            _p(cfg(runtime_key, t), "unloaded", "total", "p50"), "torch-batched-mc", runtime_key)

    for config_id, entry in configs.items():
        if entry["family"] != "runtime" or entry["samples"] != ref_t:
            continue
        for stat in ("p50", "p99"):
            add(f"loaded/unloaded {config_id} {stat}", f"pure inference {stat} with / without one core burnt",
                _p(entry, "loaded", "total", stat), _p(entry, "unloaded", "total", stat), "loaded", "unloaded")
    runs = closed.get("runs") or {}
    add("loaded/unloaded closed-loop tick p99", "closed-loop tick p99 with / without one core burnt",
        _p(runs.get("loaded"), "tick", "p99"), _p(runs.get("unloaded"), "tick", "p99"), "loaded", "unloaded")
    add("loaded/unloaded tick-start jitter p99", "tick-start jitter p99 with / without one core burnt",
        _p(runs.get("loaded"), "start_jitter", "p99"), _p(runs.get("unloaded"), "start_jitter", "p99"),
        "loaded", "unloaded")
    for load in LOADS:
        normal, deployed = runs.get(f"{load}, {NORMAL_PRIORITY}"), runs.get(load)
        if normal is None or deployed is None:
            continue
        for name, path in (("tick-start jitter p99", ("start_jitter", "p99")), ("tick p99", ("tick", "p99"))):
            add(f"normal/FIFO {name} {load}", f"{name}, control thread at normal priority / at "
                f"{deployed.get('scheduling')} ({load})", _p(normal, *path), _p(deployed, *path),
                NORMAL_PRIORITY, str(deployed.get("scheduling")))
    return ratios


# --- reports --------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Latency benchmark ({report['settings']['mode']} mode)", "",
        f"- CPU: {env['cpu'].get('model')} ({env['cpu'].get('usable_cpus')} usable CPUs; load average "
        f"{env['load_average_at_start'][0]:.1f} at start, {env['load_average_at_end'][0]:.1f} at end); "
        f"GPU: {env['gpu'].get('nvidia_smi') or env['gpu'].get('name') or env['gpu'].get('reason')}",
        f"- onnxruntime {env['libraries'].get('onnxruntime')}, numpy {env['libraries'].get('numpy')}, "
        f"torch {env['libraries'].get('torch')}; bundle manifest sha256 {env['bundle']['manifest_sha256'][:16]}...",
        f"- {report['side_by_side']['rounds']} complete interleaved rounds (of {report['side_by_side']['planned_rounds']}"
        f" planned{'; time budget spent' if report['side_by_side'].get('budget_spent') else ''}); milliseconds; "
        "'loaded' = one core burnt by another process", "",
        "## Pure inference, side by side (vision + head back to back)", "",
        "| configuration | T | load | n | p50 | p90 | p99 | max | vision p50 | head p50 | > 100 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    language = []
    for entry in report["side_by_side"]["configs"].values():
        for load in LOADS:
            row = entry.get(load)
            if row is None:
                continue
            total, stages = row["total"], row["stages"]
            if entry["family"] == "language":
                language.append(f"| {entry['key']} | {load} | {total['n']} | {_ms(total.get('p50'))} | "
                                f"{_ms(total.get('p99'))} | {_ms(total.get('max'))} |")
                continue
            lines.append(
                f"| {entry['key']} | {entry['samples']} | {load} | {total['n']} | {_ms(total.get('p50'))} | "
                f"{_ms(total.get('p90'))} | {_ms(total.get('p99'))} | {_ms(total.get('max'))} | "
                f"{_ms(_p(stages, 'vision', 'p50'))} | {_ms(_p(stages, 'head', 'p50'))} | {row['over_period']} |")
    if language:
        lines += ["", "## Language encoder (on instruction change only, never inside a tick)", "",
                  "| configuration | load | n | p50 | p99 | max |", "|---|---|---|---|---|---|", *language]
    closed = report.get("closed_loop")
    if closed:
        lines += ["", f"## Full tick in closed loop ({closed['config']}, {RATE_HZ:g} Hz, T cycling over "
                  f"{closed['samples_cycle']}, simulator on a real pty + MJPEG camera)", ""]
        if closed.get("fifo_refused"):
            lines += [f"Control thread at normal priority only: {closed['fifo_refused']}.", ""]
        for load, run in closed["runs"].items():
            steal = run.get("steal_ms")
            steal_text = "" if steal is None else f", {steal:.0f} ms of CPU stolen by the hypervisor meanwhile"
            segments = len(run.get("segments") or [None])
            lines += [f"### {load} ({run.get('scheduling', 'SCHED_OTHER')}, {segments} segment"
                      f"{'' if segments == 1 else 's'}{steal_text}): {run['ticks']} ticks, {run['overruns']} overruns, {run['missed_deadlines']} missed "
                      f"deadlines, {run['ticks_over_period']} ticks over 100 ms; modes {run['modes']}", "",
                      "| stage | p50 | p90 | p99 | max |", "|---|---|---|---|---|"]
            rows = [(stage, run["stages"][stage]) for stage in TICK_STAGES]
            rows += [("full tick (frame ready -> bytes to link)", run["tick"]), ("tick-start jitter", run["start_jitter"]),
                     ("frame age at tick start", run["frame_age"])]
            rows += [(f"full tick, T={t}", s["tick"]) for t, s in run["by_samples"].items()]
            if "policy" in run:
                rows += [("policy in the tick (resize .. reduce)", run["policy"]),
                         ("tick outside the policy", run["outside_policy"])]
            language = report["side_by_side"]["configs"].get(f"{closed['config']} language", {}).get(
                run.get("load", load))
            if language:
                rows.append(("language encoder (on instruction change only, off the tick; side-by-side run)",
                             language["total"]))
            for name, stats in rows:
                lines.append(f"| {name} | {_ms(stats.get('p50'))} | {_ms(stats.get('p90'))} | "
                             f"{_ms(stats.get('p99'))} | {_ms(stats.get('max'))} |")
            lines.append("")
            split = run.get("steal_split")
            if split:
                least, most = split["least"], split["most"]
                lines += [f"Per {closed.get('segment_s', 10.0):g} s segment, median of the segments' p99: the {least['segments']} with the least steal "
                          f"(mean {least['steal_ms_mean']:.0f} ms): tick-start jitter {least['start_jitter_p99_median']:.2f}, "
                          f"tick {least['tick_p99_median']:.2f}; the {most['segments']} with the most "
                          f"(mean {most['steal_ms_mean']:.0f} ms): jitter {most['start_jitter_p99_median']:.2f}, "
                          f"tick {most['tick_p99_median']:.2f}.", ""]
            tail = run.get("tail") or {}
            if tail.get("n"):
                grown = sorted(tail["stages"].items(), key=lambda kv: -kv[1]["excess"])
                parts = ", ".join(f"{stage} {v['excess']:+.2f}" for stage, v in grown if abs(v["excess"]) >= 0.05)
                lines += [f"Slowest {tail['fraction']:.0%} of ticks ({tail['n']}, >= {tail['tick_cutoff_ms']:.2f} ms, "
                          f"mean {tail['tick_slow_mean_ms']:.2f} vs median tick {tail['tick_median_ms']:.2f}): "
                          f"stage mean minus stage median, ms: {parts or 'no stage grew'}. "
                          f"Largest: **{tail['largest']}**.", ""]
    lines += ["## Ratios", "", "| ratio | value | numerator (ms) | denominator (ms) |", "|---|---|---|---|"]
    for name, ratio in report["ratios"].items():
        lines.append(f"| {name} | {ratio['value']:.2f}x | {_ms(ratio['numerator_ms'])} | "
                     f"{_ms(ratio['denominator_ms'])} |")
    startup = report.get("startup") or {}
    if startup:
        runtime = startup.get("runtime_process") or {}
        cli = startup.get("first_command") or {}
        lines += ["", "## Start-up and memory", ""]
        if runtime:
            lines.append(f"- runtime alone (subprocess importing only edge, {runtime.get('target')}, "
                         f"T={runtime.get('samples')}): RSS {_ms(runtime.get('rss_mib'), 0)} MiB, peak "
                         f"{_ms(runtime.get('peak_rss_mib'), 0)} MiB; torch imported: {runtime.get('torch_imported')}; "
                         f"import {_ms(runtime.get('import_s'))} s, activation {_ms(runtime.get('activate_s'))} s, "
                         f"first inference {_ms(runtime.get('first_infer_s'))} s")
        if cli:
            lines.append(f"- start to first command ({cli.get('method')}): "
                         f"{_ms(cli.get('start_to_first_command_s'))} s"
                         + (f"; service ready after {_ms(cli.get('service_ready_s'))} s" if cli.get("service_ready_s")
                            else "") + (f"; {cli['error']}" if cli.get("error") else ""))
    if report["unavailable"]:
        lines += ["", "## Not available here", ""]
        lines += [f"- {key}: not available here: {why}" for key, why in report["unavailable"].items()]
    return "\n".join(lines) + "\n"


def format_ratios(report: dict) -> str:
    lines = ["Ratios (measured side by side in this run):"]
    for name, ratio in report["ratios"].items():
        lines.append(f"  {name:<55} {ratio['value']:7.2f}x   ({_ms(ratio['numerator_ms'])} / "
                     f"{_ms(ratio['denominator_ms'])} ms)")
    runtime = (report.get("startup") or {}).get("runtime_process") or {}
    if runtime:
        lines.append(f"  runtime RSS {_ms(runtime.get('rss_mib'), 0)} MiB (torch imported: "
                     f"{runtime.get('torch_imported')})")
    first = (report.get("startup") or {}).get("first_command") or {}
    if first:
        lines.append(f"  start to first command {_ms(first.get('start_to_first_command_s'))} s ({first.get('method')})")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png, stage_bars.png, tick_jitter.png (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the plots need matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    configs = report["side_by_side"]["configs"]
    ts = report["settings"]["samples"]
    colors = {}
    palette = plt.get_cmap("tab10")

    def color(key: str):
        return colors.setdefault(key, palette(len(colors) % 10))

    fig, axes = plt.subplots(1, len(ts), figsize=(5 * len(ts), 5.5), squeeze=False)
    for ax, t in zip(axes[0], ts):
        for entry in configs.values():
            if entry["samples"] != t or entry["family"] == "language":
                continue
            for load, style in (("unloaded", "-"), ("loaded", "--")):
                values = np.sort(np.asarray((entry.get(load) or {}).get("values_ms", []), np.float64))
                if values.size:
                    ax.step(values, np.arange(1, values.size + 1) / values.size, style, where="post",
                            color=color(entry["key"]), label=f"{entry['key']} ({load})")
        ax.set_xscale("log")
        ax.set_xlabel("pure inference latency (ms, log)")
        ax.set_ylabel("fraction of iterations")
        ax.set_title(f"T = {t}")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle("Latency CDF per backend (solid: unloaded, dashed: one core burnt)")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * math.ceil(len(labels) / 4), 1, 1))
    written.append(_save(fig, out_dir / "latency_cdf.png", plt))

    bars = []
    for entry in configs.values():
        stages = (entry.get("unloaded") or {}).get("stages") or {}
        if entry["family"] == "runtime":
            bars.append((f"{entry['key']} T={entry['samples']}", {s: _p(stages, s, "p50") or 0.0 for s in POLICY_STAGES}))
    closed = report.get("closed_loop")
    if closed:
        for t, stages in closed["runs"]["unloaded"]["by_samples"].items():
            bars.append((f"closed-loop tick {closed['config']} T={t}",
                         {s: _p(stages, s, "p50") or 0.0 for s in TICK_STAGES}))
    if bars:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.8))
        left = np.zeros(len(bars))
        stage_colors = plt.get_cmap("tab20")
        for i, stage in enumerate(TICK_STAGES):
            widths = np.array([b[1].get(stage, 0.0) for b in bars])
            ax.barh([b[0] for b in bars], widths, left=left, label=stage, color=stage_colors(i))
            left += widths
        ax.invert_yaxis()
        ax.set_xlabel("median milliseconds per stage (unloaded)")
        ax.legend(fontsize=7, ncol=3, loc="lower right")
        ax.set_title("Where the time goes: stage medians stacked")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "stage_bars.png", plt))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if closed:
        for load, run in closed["runs"].items():
            series = run["series"]
            label = f"{load} ({run.get('scheduling', 'SCHED_OTHER')})"
            # Markers only: the conditions take turns, so each one's series has gaps.
            top.plot(series["t_s"], series["start_jitter_ms"], ".", ms=3, label=label)
            bottom.plot(series["t_s"], series["tick_ms"], ".", ms=3, label=label)
        bottom.axhline(PERIOD_S * 1e3, color="red", lw=0.8, ls=":", label="100 ms period")
    else:
        top.text(0.5, 0.5, "closed loop not run", ha="center", transform=top.transAxes)
    top.set_ylabel("tick start - deadline (ms)")
    bottom.set_ylabel("full tick (ms)")
    bottom.set_xlabel("time since the closed loop started (s)")
    top.set_title("Tick-start jitter and full tick over time, 10 Hz")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "tick_jitter.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the whole run --------------------------------------------------------------------------------


def _inputs(seed: int):
    """A frame, proprio and instruction as the simulator's camera and world produce them."""
    from reference_world.world import TabletopWorld, WorldConfig

    return TabletopWorld(WorldConfig()).reset(seed)


def choose_closed_loop_config(specs: list[PipelineSpec], wanted: str | None) -> PipelineSpec | None:
    by_key = {s.key: s for s in specs}
    if wanted is not None:
        if wanted not in by_key:
            raise ConfigError(f"--closed-loop-config {wanted!r} is not available here; available: {sorted(by_key)}")
        return by_key[wanted]
    for key in ("trt-int8", "trt-fp16", "ort-int8-cpu", "ort-fp32", "ort-int8-trt-layout"):
        if key in by_key:
            return by_key[key]
    return specs[0] if specs else None


def _runtime_configs(bundle: Bundle, specs: list[PipelineSpec], settings: BenchSettings, observation,
                     unavailable: dict[str, str], stack: contextlib.ExitStack) -> tuple[dict, list[Config]]:
    """Activate one pipeline per runtime configuration; its iterations at each T, and its language encoder."""
    proprio = np.asarray(observation.proprio, np.float32)
    pipelines: dict[str, PolicyPipeline] = {}
    configs: list[Config] = []
    for spec in specs:
        pipeline = PolicyPipeline(bundle, target=spec.target, mc_samples=min(settings.samples),
                                  mask_seed=settings.seed, backend_factory=spec.factory)
        try:
            pipeline.activate()
        except EdgeError as exc:
            unavailable[spec.key] = f"activation failed: {exc}"
            pipeline.close()
            continue
        stack.callback(pipeline.close)
        pipelines[spec.key] = pipeline
        embedding = pipeline.cache.encode_now(observation.instruction)
        configs += [Config(spec.key, t, "runtime", settings.iterations,
                           runtime_step(pipeline, t, observation.frame, proprio, embedding))
                    for t in settings.samples]
        configs.append(Config(f"{spec.key} language", 1, "language", settings.iterations,
                              language_step(pipeline, observation.instruction)))
    return pipelines, configs


def _against_simulator(bundle: Bundle, bundle_dir: Path, out_dir: Path, settings: BenchSettings,
                       pipelines: dict[str, PolicyPipeline], spec: PipelineSpec, burner: CpuBurner | None) -> tuple:
    """The closed loop, then `vla-edge run` until its first command, on one simulator process."""
    closed, first = None, None
    with SimulatorProcess(seed=settings.seed, log_path=out_dir / "simulator.log") as simulator:
        if settings.closed_loop:
            gc_frozen = freeze_gc_after_warmup()  # as the service does once it has warmed up
            try:
                closed = run_closed_loop(bundle, pipelines[spec.key], spec.target, simulator, settings, burner)
            finally:
                gc.unfreeze()
                gc.enable()
            closed.update({"config": spec.key, "gc_frozen_objects": gc_frozen})
        if settings.startup:
            for pipeline in pipelines.values():
                pipeline.close()  # leave the CPU and memory to the service under test
            first = measure_start_to_first_command(bundle_dir, spec, int(bundle.dropout["default_samples"]),
                                                   simulator, out_dir)
    return closed, first


def run_benchmark(bundle_dir: Path, out_dir: Path, settings: BenchSettings) -> dict:
    bundle = Bundle.load(bundle_dir)
    max_samples = int(bundle.dropout["max_samples"])
    bad = [t for t in settings.samples if not 1 <= t <= max_samples]
    if bad:
        raise ConfigError(f"--samples {bad} outside 1..{max_samples} (the bundle's max_samples)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    unavailable: dict[str, str] = {}
    notes: dict[str, Any] = {}
    report: dict[str, Any] = {"schema": SCHEMA, "created_unix": time.time(), "settings": asdict(settings),
                              "environment": environment(bundle), "closed_loop": None}
    specs = pipeline_specs(bundle, settings, unavailable)
    if not specs:
        raise ConfigError(f"no runtime configuration can run here: {unavailable}")
    observation = _inputs(settings.seed)
    if not settings.load:
        unavailable["cpu load"] = "skipped (--no-load)"
    startup: dict[str, Any] = {}
    phases: dict[str, float] = {}
    report["phase_seconds"] = phases
    with contextlib.ExitStack() as stack:
        burner = stack.enter_context(CpuBurner(settings.load_bound_s)) if settings.load else None
        pipelines, configs = _runtime_configs(bundle, specs, settings, observation, unavailable, stack)
        configs += torch_configs(bundle, settings, observation, unavailable, notes)
        logger.info("side by side: %d configurations, %s", len(configs),
                    "unloaded and loaded" if burner else "unloaded only")
        phases["activation"] = time.monotonic() - started
        report["side_by_side"] = run_interleaved(configs, settings, burner)
        phases["side_by_side"] = report["side_by_side"]["seconds"]
        report["notes"] = notes
        spec = choose_closed_loop_config([s for s in specs if s.key in pipelines], settings.closed_loop_config)
        report["runtime_key"] = spec.key if spec is not None else None
        if spec is None:
            unavailable["closed loop"] = "no runtime configuration could be activated"
        elif settings.closed_loop or settings.startup:
            mark = time.monotonic()
            report["closed_loop"], startup["first_command"] = _against_simulator(
                bundle, bundle_dir, out_dir, settings, pipelines, spec, burner)
            phases["closed_loop_and_first_command"] = time.monotonic() - mark
        if not settings.closed_loop:
            unavailable["closed loop"] = "skipped (--no-closed-loop)"
        if burner is not None:
            report["load"] = {"kind": "one busy-looping process, SIGSTOP'd outside the loaded phases",
                              "cpu_seconds": burner.cpu_seconds(), "loaded_wall_s": burner.loaded_wall_s}
    if settings.startup and spec is not None:
        mark = time.monotonic()
        startup["runtime_process"] = measure_runtime_process(bundle_dir, spec, int(bundle.dropout["default_samples"]))
        phases["runtime_process"] = time.monotonic() - mark
        first = startup.get("first_command")
        if first is None or first.get("start_to_first_command_s") is None:
            startup["first_command"] = {
                **(first or {}),
                "method": "fallback: subprocess spawn -> PolicyPipeline activation -> first inference "
                          "(vla-edge run did not deliver a command)",
                "start_to_first_command_s": startup["runtime_process"]["spawn_to_first_infer_s"],
            }
    elif not settings.startup:
        unavailable["start-up and memory"] = "skipped (--no-startup)"
    report["startup"] = startup
    report["unavailable"] = unavailable
    report["ratios"] = compute_ratios(report, settings)
    report["benchmark_imported_torch"] = "torch" in sys.modules
    report["seconds"] = time.monotonic() - started
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    logger.info("phases (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return _write_outputs(_finite_json(report), out_dir)


def _write_outputs(report: dict, out_dir: Path) -> dict:
    (out_dir / "latency.md").write_text(format_markdown(report))
    report["plots"] = [str(p) for p in write_plots(report, out_dir)]
    (out_dir / "latency.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return report


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="policy bundle directory (build-engines --int8 --out DIR)")
    parser.add_argument("--out", default="artifacts/benchmarks/latency", help="where JSON, Markdown and plots go")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="<= 2 minutes (default)")
    mode.add_argument("--long", dest="mode", action="store_const", const="long", help="more iterations, longer jitter run")
    parser.set_defaults(mode="quick")
    parser.add_argument("--iterations", type=int, help="timed iterations per runtime configuration and load")
    parser.add_argument("--torch-iterations", type=int, help="timed iterations per PyTorch configuration and load")
    parser.add_argument("--warmup", type=int, help="untimed iterations per configuration first")
    parser.add_argument("--jitter-seconds", type=float, help="closed-loop seconds per load condition")
    parser.add_argument("--budget-seconds", type=float,
                        help="side by side: start no new round after this many seconds (quick 50, long 1200)")
    parser.add_argument("--samples", type=_positive_int_list, default=(1, 8, 32), help="MC sample counts T, e.g. 1,8,32")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="bundle targets to run on ONNX Runtime CPU (cpu-fp32,cpu,tensorrt,fp16)")
    parser.add_argument("--closed-loop-config", default=None,
                        help="configuration for the closed loop and start-up, e.g. ort-int8-cpu or trt-int8 "
                             "(default: TensorRT INT8 where available, else ort-int8-cpu)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--checkpoint", default=None, help="reference policy checkpoint for PyTorch eager")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-load", action="store_true", help="skip the runs with a competing CPU load")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--no-closed-loop", action="store_true", help="skip the closed-loop tick measurement")
    parser.add_argument("--fifo-priority", type=int, default=50,
                        help="SCHED_FIFO priority of the control thread in the closed loop, as the systemd unit "
                             "starts it (default 50); where granted, each load also runs at normal priority")
    parser.add_argument("--no-fifo", action="store_true", help="closed loop at normal priority only")
    parser.add_argument("--segment-seconds", type=float, default=10.0,
                        help="closed-loop conditions take turns in segments this long (default 10)")
    parser.add_argument("--no-startup", action="store_true", help="skip RSS and start-to-first-command")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    preset = MODES[args.mode]

    def pick(name: str, minimum: float):
        value = getattr(args, name)
        return _at_least(name, preset[name] if value is None else value, minimum)

    return BenchSettings(
        mode=args.mode, iterations=pick("iterations", 1), torch_iterations=pick("torch_iterations", 1),
        warmup=pick("warmup", 0), jitter_seconds=pick("jitter_seconds", 0.1),
        budget_seconds=pick("budget_seconds", 1.0), samples=tuple(args.samples),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        closed_loop_config=args.closed_loop_config, load=not args.no_load, torch=not args.no_torch,
        closed_loop=not args.no_closed_loop, startup=not args.no_startup, threads=args.threads, seed=args.seed,
        checkpoint=args.checkpoint, load_bound_s=preset["load_bound_s"],
        fifo_priority=None if args.no_fifo else _fifo_priority(args.fifo_priority),
        segment_seconds=_at_least("segment_seconds", args.segment_seconds, 0.1),
    )


def _at_least(name: str, value: float, minimum: float) -> float:
    if value < minimum:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    return value


def _fifo_priority(value: int) -> int:
    if not 1 <= value <= 99:
        raise ConfigError(f"--fifo-priority must be within 1..99 (SCHED_FIFO), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_sigterm(signum: int, _frame: object) -> None:
        # Unwind through the context managers so the simulator and the load process are stopped.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        settings = settings_from_args(args)
        report = run_benchmark(Path(args.bundle), Path(args.out), settings)
    except EdgeError as exc:
        logger.error("%s", exc)
        return 2
    print(format_markdown(report))
    print(format_ratios(report))
    print(f"\nwritten to {args.out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
