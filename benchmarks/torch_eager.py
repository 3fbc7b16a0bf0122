"""PyTorch eager FP32 the seeds' way, as columns of the side-by-side run; torch is imported here only,
and only where it is installed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.configs import Config
from benchmarks.settings import BenchSettings
from edge.inference.bundle import Bundle


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

