"""What a benchmark run measures and how long: the shared constants and BenchSettings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "vla-edge-latency/1"
RATE_HZ = 10.0
PERIOD_S = 1.0 / RATE_HZ
PERCENTILES = (50.0, 90.0, 99.0, 100.0)
# Stages of pure inference, as PolicyPipeline.infer times them; they add up to its time. Vision and head
# include their host<->device copies, which COPY_STAGES show on their own (0 on CPU backends).
POLICY_STAGES = ("resize", "vision", "head", "reduce")
COPY_STAGES = ("h2d", "d2h")
# Stages of one closed-loop tick, in the order they happen; they add up to the tick but for the loop's glue.
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
              "load_bound_s": 900.0, "default_budget_s": 8.0},
    "long": {"iterations": 300, "torch_iterations": 40, "warmup": 10, "jitter_seconds": 120.0,
             "budget_seconds": 1200.0, "load_bound_s": 3600.0, "default_budget_s": 60.0},
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
    transport: bool = True  # part 4: frames and commands over ROS 2 (DDS) next to serial + MJPEG
    # The default configuration (policy.target/threads: auto) against every candidate, interleaved this long
    # (benchmarks/defaults.py); 0: skipped.
    default_budget_s: float = 8.0

