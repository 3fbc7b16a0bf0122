"""The robot's one configuration file (YAML) loaded into frozen dataclasses and validated at start-up.

Every error names the key (as `section.key`) and the allowed range. Unknown keys are errors too: a
misspelt safety limit must not silently fall back to a default.

Paths. A relative `bundle:` is taken relative to the config file's directory, never to the working
directory or to systemd's directories: what a path means must not depend on how the process was
started. A path that should live in the unit's directories says so with a placeholder, which is
expanded in `bundle` and `instruction.socket` only:

    bundle: ${STATE_DIRECTORY}/bundle               # /var/lib/vla-edge/bundle under the unit
    instruction: {socket: ${RUNTIME_DIRECTORY}/control.sock}

`${STATE_DIRECTORY}`, `${RUNTIME_DIRECTORY}` and `${CACHE_DIRECTORY}` take systemd's value (the first
entry where it lists several) and, where the variable is not set (`vla-edge doctor` run by hand), the
unit's directory (/var/lib/vla-edge, /run/vla-edge, /var/cache/vla-edge), so both resolve alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError
from edge.io.camera import CameraConfig
from edge.io.motor_link import MotorLinkConfig

TARGETS = ("cpu", "cpu-fp32", "tensorrt", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
METRICS_HOST = "127.0.0.1"
# systemd's per-unit directories (RuntimeDirectory=, StateDirectory=, CacheDirectory=) and where the
# shipped unit puts them, used when the variable is unset.
DIRECTORY_DEFAULTS = {
    "RUNTIME_DIRECTORY": "/run/vla-edge",
    "STATE_DIRECTORY": "/var/lib/vla-edge",
    "CACHE_DIRECTORY": "/var/cache/vla-edge",
}
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def _check_range(key: str, value: Any, low: float, high: float, unit: str = "", integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} in [{low}, {high}]{' ' + unit if unit else ''}, got {value!r}")


@dataclass(frozen=True)
class PolicyConfig:
    target: str = "cpu"  # which graphs of the bundle: cpu (INT8 CPU layout), cpu-fp32, tensorrt, fp16
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    device: str = "cpu"  # onnxruntime only: cpu | cuda
    mc_samples: int = 16  # Monte-Carlo dropout samples T per tick (<= the bundle's max_samples)
    threads: int = 0  # onnxruntime intra-op threads (0 = its default)
    mask_seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"policy.target must be one of {TARGETS}, got {self.target!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"policy.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"policy.device must be 'cpu' or 'cuda', got {self.device!r}")
        _check_range("policy.mc_samples", self.mc_samples, 1, 256, integer=True)
        _check_range("policy.threads", self.threads, 0, 64, integer=True)


@dataclass(frozen=True)
class UncertaintyConfig:
    threshold: float | None = None  # None: the bundle's calibrated threshold for the target
    hard_ceiling: float | None = None  # None: the bundle's ceiling (fallback at once above it)
    enter_ticks: int = 3  # ticks above the threshold before fallback
    exit_ticks: int = 5  # calm ticks before leaving fallback

    def __post_init__(self) -> None:
        for key in ("threshold", "hard_ceiling"):
            value = getattr(self, key)
            if value is not None:
                _check_range(f"uncertainty.{key}", value, 1e-6, 10.0)
        _check_range("uncertainty.enter_ticks", self.enter_ticks, 1, 100, integer=True)
        _check_range("uncertainty.exit_ticks", self.exit_ticks, 1, 1000, integer=True)


@dataclass(frozen=True)
class SafetySection:
    max_slew_per_s: float | None = None  # None: the bundle's limit; normalised command units per second
    decel_per_s: float = 2.0  # controlled-stop ramp toward zero, normalised units per second
    fallback_behaviour: str = "controlled_stop"  # controlled_stop | damped
    damping: float = 0.5  # damped fallback: this share of the policy's action
    stale_after_periods: float = 3.0  # frame or telemetry older than this many periods -> fallback

    def __post_init__(self) -> None:
        if self.max_slew_per_s is not None:
            _check_range("safety.max_slew_per_s", self.max_slew_per_s, 0.01, 100.0, "units/s")
        _check_range("safety.decel_per_s", self.decel_per_s, 0.01, 100.0, "units/s")
        if self.fallback_behaviour not in ("controlled_stop", "damped"):
            raise ConfigError("safety.fallback_behaviour must be 'controlled_stop' or 'damped', "
                              f"got {self.fallback_behaviour!r}")
        _check_range("safety.damping", self.damping, 0.0, 1.0)
        _check_range("safety.stale_after_periods", self.stale_after_periods, 1.0, 20.0, "periods")


@dataclass(frozen=True)
class LoopConfig:
    rate_hz: float = 10.0  # control rate
    summary_every_s: float = 60.0  # one summary line this often
    record_ticks: int = 1200  # per-tick records kept in the ring buffer
    warmup_ticks: int = 5  # inference passes before the first command (fills caches, JIT, pages)

    def __post_init__(self) -> None:
        _check_range("loop.rate_hz", self.rate_hz, 1.0, 200.0, "Hz")
        _check_range("loop.summary_every_s", self.summary_every_s, 1.0, 3600.0, "s")
        _check_range("loop.record_ticks", self.record_ticks, 10, 1_000_000, integer=True)
        _check_range("loop.warmup_ticks", self.warmup_ticks, 0, 1000, integer=True)

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz


@dataclass(frozen=True)
class RealtimeSection:
    sched_fifo_priority: int | None = None  # 1..99; needs LimitRTPRIO= (systemd) or CAP_SYS_NICE
    cpu_affinity: tuple[int, ...] | None = None  # CPUs for the control thread
    lock_memory: bool = False  # mlockall; needs LimitMEMLOCK=infinity
    freeze_gc: bool = True  # gc frozen after warm-up, collected only in slack time


@dataclass(frozen=True)
class InstructionConfig:
    initial: str | None = None  # instruction at start; None: hold until one arrives on the socket
    socket: str | None = None  # UNIX socket path for instructions and status

    def __post_init__(self) -> None:
        if self.initial is not None and (not isinstance(self.initial, str) or not self.initial.strip()):
            raise ConfigError("instruction.initial must be a non-empty string or left out")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False  # serve Prometheus metrics (needs the 'metrics' extra: prometheus-client)
    port: int = 9310  # TCP port on 127.0.0.1; 0 lets the kernel pick a free one (tests)
    # Fixed: the endpoint has no authentication, so it never listens beyond the robot itself. Scrape it
    # with an agent on the robot or through an SSH tunnel.
    host: str = METRICS_HOST

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"metrics.enabled must be true or false, got {self.enabled!r}")
        _check_range("metrics.port", self.port, 0, 65535, integer=True)
        if self.host != METRICS_HOST:
            raise ConfigError(f"metrics.host must be {METRICS_HOST} (the metrics endpoint has no authentication "
                              f"and must not leave the robot; scrape it locally or through an SSH tunnel), "
                              f"got {self.host!r}")


@dataclass(frozen=True)
class RobotConfig:
    bundle: str
    camera: CameraConfig
    motor: MotorLinkConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    safety: SafetySection = field(default_factory=SafetySection)
    loop: LoopConfig = field(default_factory=LoopConfig)
    realtime: RealtimeSection = field(default_factory=RealtimeSection)
    instruction: InstructionConfig = field(default_factory=InstructionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


_SECTIONS = {
    "camera": CameraConfig,
    "motor": MotorLinkConfig,
    "policy": PolicyConfig,
    "uncertainty": UncertaintyConfig,
    "safety": SafetySection,
    "loop": LoopConfig,
    "realtime": RealtimeSection,
    "instruction": InstructionConfig,
    "metrics": MetricsConfig,
}


def expand_directories(key: str, value: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace ${STATE_DIRECTORY}, ${RUNTIME_DIRECTORY} and ${CACHE_DIRECTORY} in a path (see the module
    docstring); any other ${...} is a ConfigError naming `key`."""
    env = os.environ if environ is None else environ

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in DIRECTORY_DEFAULTS:
            raise ConfigError(f"{key}: unknown placeholder ${{{name}}} in {value!r}; allowed: "
                              + ", ".join(f"${{{n}}}" for n in DIRECTORY_DEFAULTS))
        # systemd joins several directories of one kind with ':'; the first is the unit's own.
        return env.get(name, "").split(":")[0] or DIRECTORY_DEFAULTS[name]

    return _PLACEHOLDER.sub(replace, value)


def _section(name: str, cls, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"allowed keys in {name}: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{name}: {exc}") from exc


def config_from_dict(raw: Any, base_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> RobotConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a YAML mapping with sections bundle, camera, motor, ...")
    unknown = sorted(set(raw) - {"bundle", *_SECTIONS})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: bundle, {', '.join(_SECTIONS)}")
    for required in ("bundle", "camera", "motor"):
        if required not in raw:
            raise ConfigError(f"missing required key '{required}'")
    bundle = raw["bundle"]
    if not isinstance(bundle, str) or not bundle.strip():
        raise ConfigError(f"bundle must be the path of a policy bundle directory, got {bundle!r}")
    bundle_path = Path(expand_directories("bundle", bundle, environ))
    if base_dir is not None and not bundle_path.is_absolute():
        bundle_path = base_dir / bundle_path
    instruction = raw.get("instruction")
    if isinstance(instruction, dict) and isinstance(instruction.get("socket"), str):
        instruction = {**instruction,
                       "socket": expand_directories("instruction.socket", instruction["socket"], environ)}
    sections = {name: _section(name, cls, instruction if name == "instruction" else raw.get(name))
                for name, cls in _SECTIONS.items()}
    return RobotConfig(bundle=str(bundle_path), **sections)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RobotConfig:
    """Read and validate the config; `environ` (default os.environ) gives systemd's directories."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist (see systemd/robot.example.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
    return config_from_dict(raw, base_dir=path.parent, environ=environ)
