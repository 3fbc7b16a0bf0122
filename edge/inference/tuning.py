"""The measured choice of the bundle's target and ONNX Runtime's thread count on the machine it runs on.

`policy.target: auto` and `policy.threads: auto` (the defaults) end here. Which variant is fastest depends
on the machine: ONNX Runtime's u8s8 INT8 kernels win only where the CPU has int8 dot products (AVX-512
VNNI / AVX-VNNI, Arm dotprod) and are 1.5-2x slower than FP32 elsewhere; several intra-op threads help
on an idle machine and hurt when the camera, the link and other processes want a core. So the runtime
measures instead of guessing:

    candidates(targets, thread counts)   every target the bundle ships (the build writes only those that
                                         passed its accuracy gate) x every sensible thread count
    measure(runners, budget_s, timer)    one full policy inference per candidate in turn, interleaved
                                         round after round (a load that comes and goes hits all alike),
                                         until the budget is spent
    choose(measurements, baseline)       the lowest p99 of the policy's time; p99s within 10% of the lowest
                                         are a tie (a short measurement's p99 is its slowest run), decided by
                                         the median; the FP32 baseline is always a candidate and wins exact
                                         ties, so the choice is never slower than it beyond that noise

`vla-edge tune` runs the same with a longer budget and keeps the choice in a `TuneCache` under the
machine's `fingerprint` (CPU model and flags, GPU, library versions, bundle hash, backend and T); a start
with the same fingerprint takes the cached choice without measuring.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import BundleError, ConfigError
from edge.fileio import atomic_write_text
from edge.inference.cpu_isa import int8_dot_product_isa  # noqa: F401  (the benchmark reads it from here)

logger = logging.getLogger(__name__)

AUTO = "auto"
CACHE_VERSION = 1
MIN_ROUNDS = 3  # every candidate is timed at least this often, even past the budget
MAX_ROUNDS = 2000
# A 2 s start-up measurement gives each of 8 candidates a dozen runs, whose p99 is their slowest: p99s
# within this share of each other are noise (measured: the default's p99 1.13x the best's in a separate
# run when the start-up had picked by p99 alone), and the median, which a dozen runs do estimate, decides.
P99_TIE = 0.10


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration to time: a target of the bundle and ONNX Runtime's intra-op threads (0: its own)."""

    target: str
    threads: int

    def label(self) -> str:
        return f"{self.target}/{self.threads or 'default'} thread(s)"


@dataclass(frozen=True)
class Measurement:
    candidate: Candidate
    runs: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class TuneChoice:
    """What runs and why: `source` is "measured", "cached" (a `vla-edge tune` on this fingerprint) or
    "configured" (explicit values in the config, nothing timed)."""

    target: str
    threads: int
    source: str
    p99_ms: float | None = None
    baseline: str | None = None  # the FP32 candidate's label
    baseline_p99_ms: float | None = None
    fingerprint: str | None = None
    measurements: tuple[Measurement, ...] = field(default_factory=tuple)

    def line(self) -> str:
        """One line for the log, doctor and status."""
        what = f"target {self.target}, threads {self.threads or 'default'} ({self.source}"
        if self.p99_ms is not None:
            what += f": policy p99 {self.p99_ms:.2f} ms"
            if self.baseline_p99_ms is not None:
                what += f" vs {self.baseline_p99_ms:.2f} ms for {self.baseline}"
        return what + ")"

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["measurements"] = [{"target": m.candidate.target, "threads": m.candidate.threads, "runs": m.runs,
                                "p50_ms": m.p50_ms, "p99_ms": m.p99_ms} for m in self.measurements]
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TuneChoice:
        measurements = tuple(Measurement(Candidate(str(m["target"]), int(m["threads"])), int(m["runs"]),
                                         float(m["p50_ms"]), float(m["p99_ms"])) for m in raw.get("measurements", ()))
        return cls(target=str(raw["target"]), threads=int(raw["threads"]), source=str(raw["source"]),
                   p99_ms=raw.get("p99_ms"), baseline=raw.get("baseline"), baseline_p99_ms=raw.get("baseline_p99_ms"),
                   fingerprint=raw.get("fingerprint"), measurements=measurements)


# -- what to time -------------------------------------------------------------------------------------------


def thread_counts(cores: int | None = None) -> tuple[int, ...]:
    """1, 2, 4 ... up to the cores this process may use, and the core count itself."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    counts.append(max(1, cores))
    return tuple(counts)


def candidates(targets: Iterable[str], threads: Iterable[int]) -> tuple[Candidate, ...]:
    return tuple(Candidate(t, n) for t in targets for n in threads)


def baseline_target(targets: Mapping[str, Mapping[str, str]]) -> str | None:
    """The target whose every graph is the FP32 variant (`cpu-fp32` in bundles of this build), or None."""
    for name, variants in targets.items():
        if variants and all(v == "fp32" for v in variants.values()):
            return name
    return None


# -- measuring ----------------------------------------------------------------------------------------------


def measure(runners: Mapping[Candidate, Callable[[], None]], budget_s: float,
            timer: Callable[[], float] = time.perf_counter, min_rounds: int = MIN_ROUNDS,
            max_rounds: int = MAX_ROUNDS) -> list[Measurement]:
    """Time one call of each runner per round, the order rotating each round, until `budget_s` of `timer`
    is spent (at least `min_rounds`, at most `max_rounds` rounds). Returns one Measurement per candidate."""
    if not runners:
        raise ConfigError("nothing to tune: no candidate configuration")
    order = list(runners)
    times: dict[Candidate, list[float]] = {c: [] for c in order}
    start = timer()
    for round_index in range(max(min_rounds, max_rounds)):
        if round_index >= min_rounds and timer() - start >= budget_s:
            break
        shift = round_index % len(order)
        for candidate in order[shift:] + order[:shift]:
            t0 = timer()
            runners[candidate]()
            times[candidate].append((timer() - t0) * 1e3)
    return [Measurement(c, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
            for c, ms in times.items()]


def choose(measurements: Sequence[Measurement], baseline: Candidate | None) -> Measurement:
    """The measurement of the lowest p99, where the p99s are told apart: those within P99_TIE of the lowest
    are a tie, decided by the lower median, then for the baseline (FP32)."""
    if not measurements:
        raise ConfigError("nothing measured: no candidate configuration")
    lowest = min(m.p99_ms for m in measurements)
    tied = [m for m in measurements if m.p99_ms <= lowest * (1.0 + P99_TIE)]
    return min(tied, key=lambda m: (m.p50_ms, m.candidate != baseline, m.candidate))


def tune(runners: Mapping[Candidate, Callable[[], None]], baseline: Candidate | None, budget_s: float,
         timer: Callable[[], float] = time.perf_counter, fingerprint: str | None = None,
         max_rounds: int = MAX_ROUNDS) -> TuneChoice:
    """Measure every runner (interleaved, within the budget) and choose (see the module docstring)."""
    found = measure(runners, budget_s, timer, max_rounds=max_rounds)
    best = choose(found, baseline)
    base = next((m for m in found if m.candidate == baseline), None)
    choice = TuneChoice(target=best.candidate.target, threads=best.candidate.threads, source="measured",
                        p99_ms=best.p99_ms, baseline=None if base is None else base.candidate.label(),
                        baseline_p99_ms=None if base is None else base.p99_ms, fingerprint=fingerprint,
                        measurements=tuple(found))
    for m in sorted(found, key=lambda m: m.p99_ms):
        logger.info("tune: %s p50 %.2f ms p99 %.2f ms over %d runs", m.candidate.label(), m.p50_ms, m.p99_ms, m.runs)
    return choice


def pipeline_runner(pipeline) -> Callable[[], Any]:
    """One full inference of an activated edge.inference.pipeline.PolicyPipeline on neutral inputs (grey
    frames, zero proprio, the head's language input zeroed): the policy's time as a tick spends it."""
    frames = tuple(np.full((c.height, c.width, 3), 128, np.uint8) for c in pipeline.cameras)
    proprio = np.zeros(pipeline.proprio_dim, np.float32) if pipeline.proprio_dim else None
    language = None
    if pipeline.needs_language:
        head = {s.name: s for s in pipeline.bundle.graphs["head"].inputs}
        language = np.zeros(int(head["language_features"].shape[-1]), np.float32)

    def run():  # -> the pipeline's PolicyOutput (its stage times included)
        return pipeline.infer(frames, proprio, language)

    return run


# -- the machine's fingerprint and the cache -----------------------------------------------------------------


def _cpu_identity() -> dict[str, str]:
    """The CPU by /proc/cpuinfo: model (x86 "model name", Arm "Hardware"/"CPU part") and ISA flags."""
    found: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip().lower(), value.strip())
    model = found.get("model name") or found.get("hardware") or found.get("cpu part") or platform.processor()
    flags = " ".join(sorted((found.get("flags") or found.get("features") or "").split()))
    return {"cpu_model": model or platform.machine(), "machine": platform.machine(), "cores": str(os.cpu_count()),
            "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def _gpu_identity() -> str:
    """The GPU(s) by the driver's own files (no library loaded): NVIDIA's procfs, a Jetson's device tree."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            names += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                      if line.startswith("Model")]
        except OSError:
            continue
    try:
        names.append(Path("/proc/device-tree/model").read_text().strip("\0 \n"))
    except OSError:
        pass
    return ", ".join(names) or "none"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fingerprint(bundle_manifest_path: Path, settings: Mapping[str, Any]) -> dict[str, str]:
    """What a measured choice depends on: CPU model and flags, GPU, library versions, the bundle (the hash
    of its manifest, which covers every file's sha256) and the policy settings that change the work."""
    try:
        bundle_hash = hashlib.sha256(Path(bundle_manifest_path).read_bytes()).hexdigest()
    except OSError as exc:
        raise BundleError(f"cannot read {bundle_manifest_path} to fingerprint the bundle: {exc}") from exc
    libraries = {p: _version(p) for p in ("onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt")}
    return {**_cpu_identity(), "gpu": _gpu_identity(), "python": platform.python_version(),
            **{f"lib_{k}": v for k, v in libraries.items()}, "bundle_sha256": bundle_hash,
            **{f"policy_{k}": str(v) for k, v in sorted(settings.items())}}


def fingerprint_key(print_: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(print_), sort_keys=True).encode()).hexdigest()[:24]


class TuneCache:
    """Choices of `vla-edge tune` by fingerprint key in one JSON file (several bundles or machines may share
    a state directory; each entry keeps its fingerprint so a mismatch can be explained)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _entries(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("tune cache %s unreadable (%s): measuring again", self.path, exc)
            return {}
        if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or not isinstance(raw.get("entries"), dict):
            logger.warning("tune cache %s is of another format: measuring again", self.path)
            return {}
        return raw["entries"]

    def get(self, key: str) -> TuneChoice | None:
        entry = self._entries().get(key)
        if not isinstance(entry, dict):
            return None
        try:
            choice = TuneChoice.from_dict(entry["choice"])
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("tune cache %s: entry %s unreadable (%s): measuring again", self.path, key, exc)
            return None
        return TuneChoice(**{**choice.__dict__, "source": "cached", "fingerprint": key})

    def put(self, key: str, print_: Mapping[str, str], choice: TuneChoice) -> None:
        entries = self._entries()
        entries[key] = {"fingerprint": dict(print_), "choice": choice.to_dict(), "tuned_unix": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
        except OSError as exc:
            raise ConfigError(f"cannot write the tune cache {self.path}: {exc}; set policy.tune_cache to a "
                              "writable path (the service's state directory by default)") from exc
