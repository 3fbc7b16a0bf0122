"""The robot's one configuration file (YAML) loaded into frozen dataclasses and validated at start-up.

Each section is a frozen dataclass; a component's section lives beside the component (camera and motor
in edge.io, policy in edge.inference.pipeline, loop, uncertainty, safety and realtime in edge.control,
instruction beside the control socket's protocol, metrics beside the metrics endpoint) and is imported
here, where the sections are composed into RobotConfig and the file is loaded. Every error names the
key (as `section.key`) and the allowed range (edge.validation). Unknown keys are errors too: a misspelt
safety limit must not silently fall back to a default.

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
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.control.chunks import ChunkConfig
from edge.control.loop import LoopConfig
from edge.control.monitor import MonitorConfig
from edge.control.realtime import RealtimeConfig
from edge.control.safety import SafetySection
from edge.control.uncertainty_gate import UncertaintyConfig
from edge.errors import ConfigError
from edge.inference.pipeline import BACKENDS, TARGETS, PolicyConfig
from edge.io.camera import CameraConfig
from edge.io.motor_link import MotorLinkConfig
from edge.io.ros2.bridge import Ros2Section
from edge.service.control_protocol import InstructionConfig
from edge.service.metrics import METRICS_HOST, MetricsConfig
from edge.validation import check_range

__all__ = [
    "BACKENDS",
    "DIRECTORY_DEFAULTS",
    "METRICS_HOST",
    "TARGETS",
    "CameraConfig",
    "ChunkConfig",
    "InstructionConfig",
    "LoopConfig",
    "LoopSection",
    "MetricsConfig",
    "MotorLinkConfig",
    "PolicyConfig",
    "RealtimeConfig",
    "RealtimeSection",
    "RobotConfig",
    "Ros2Section",
    "SafetySection",
    "UncertaintyConfig",
    "config_from_dict",
    "expand_directories",
    "load_config",
]

# The realtime section is the component's own config (the same four settings); the old name stays.
RealtimeSection = RealtimeConfig
# systemd's per-unit directories (RuntimeDirectory=, StateDirectory=, CacheDirectory=) and where the
# shipped unit puts them, used when the variable is unset.
DIRECTORY_DEFAULTS = {
    "RUNTIME_DIRECTORY": "/run/vla-edge",
    "STATE_DIRECTORY": "/var/lib/vla-edge",
    "CACHE_DIRECTORY": "/var/cache/vla-edge",
}
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class LoopSection(LoopConfig):
    """The ``loop:`` section: the loop's own config and frame-synchronous ticks (edge/control/frame_sync.py)."""

    frame_sync: bool | None = None  # start ticks on a new frame; null (auto): camera rate (stated/measured) >= rate_hz
    frame_sync_window_s: float | None = None  # how early before a deadline; null: one camera period

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frame_sync is not None and not isinstance(self.frame_sync, bool):
            raise ConfigError(f"loop.frame_sync must be true, false or null (auto), got {self.frame_sync!r}")
        check_range("loop.frame_sync_window_s", self.frame_sync_window_s, 0.0, 1.0 / self.rate_hz, unit="s",
                    low_open=True, nullable=True, hint="under one control period")


@dataclass(frozen=True)
class RobotConfig:
    bundle: str
    camera: CameraConfig | None  # None where ros2.camera takes the frames from a topic
    motor: MotorLinkConfig | None  # None where ros2.command publishes the commands
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    safety: SafetySection = field(default_factory=SafetySection)
    loop: LoopSection = field(default_factory=LoopSection)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    instruction: InstructionConfig = field(default_factory=InstructionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # signals of the bundle's monitor left out
    ros2: Ros2Section | None = None  # ROS 2 topics in place of (or beside) the devices; None: no ROS 2
    # `policy.replan_every` and `policy.temporal_ensemble`: keys of the policy: section, kept beside the
    # chunk scheduler (edge/control/chunks.py).
    chunks: ChunkConfig = field(default_factory=ChunkConfig)
    # `cameras:`, one camera config per spec camera name (a policy of several cameras). Without it the
    # one `camera:` serves a one-camera policy; with it, `camera` is the first entry's config.
    cameras: Mapping[str, CameraConfig] = field(default_factory=dict)

    def camera_configs(self, names: tuple[str, ...] | list[str]) -> dict[str, CameraConfig]:
        """The camera config of each spec camera present in the config (`cameras:` by name, or the one
        `camera:` for a one-camera policy); the start-up check names those missing."""
        if self.cameras:
            return {n: self.cameras[n] for n in names if n in self.cameras}
        return {names[0]: self.camera} if len(names) == 1 else {}


_SECTIONS = {
    "camera": CameraConfig,
    "motor": MotorLinkConfig,
    "policy": PolicyConfig,
    "uncertainty": UncertaintyConfig,
    "safety": SafetySection,
    "loop": LoopSection,
    "realtime": RealtimeConfig,
    "instruction": InstructionConfig,
    "metrics": MetricsConfig,
    "monitor": MonitorConfig,
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


# Fields of a section's dataclass that come from the bundle, not the file (wiring sets them).
FROM_BUNDLE = {"motor": {"kinds": "each channel's command kind comes from the bundle's spec.action.kinds"}}


def _section(name: str, cls, raw: Any, also: tuple[str, ...] = ()):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {type(raw).__name__}")
    for key, why in FROM_BUNDLE.get(name, {}).items():
        if key in raw:
            raise ConfigError(f"{name}.{key} is not a config key: {why}; remove it")
    known = {f.name for f in dataclasses.fields(cls)} - set(FROM_BUNDLE.get(name, {}))
    raw = {k: v for k, v in raw.items() if k not in also}  # keys another config of the section takes
    known_text = sorted(known | set(also))
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"allowed keys in {name}: {', '.join(known_text)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{name}: {exc}") from exc


def config_from_dict(raw: Any, base_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> RobotConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a YAML mapping with sections bundle, camera, motor, ...")
    unknown = sorted(set(raw) - {"bundle", "ros2", "cameras", *_SECTIONS})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: bundle, {', '.join(_SECTIONS)}, cameras, ros2")
    ros2 = _ros2_section(raw.get("ros2"))
    cameras = _cameras(raw)
    replaced = _replaced_by_ros2(raw, ros2)
    if cameras and "camera" in replaced:
        raise ConfigError("both cameras and ros2.camera are set: the robot has one camera source; remove the "
                          "cameras section or ros2.camera")
    for required in ("bundle", "motor") if cameras else ("bundle", "camera", "motor"):
        if required not in raw and required not in replaced:
            hint = _ROS2_ALTERNATIVE.get(required, "")
            if required == "camera":
                hint += " (or `cameras:`, one camera config per spec camera name)"
            raise ConfigError(f"missing required key '{required}'{hint}")
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
    chunk_keys = tuple(f.name for f in dataclasses.fields(ChunkConfig))
    sections = {name: None if name in replaced else
                _section(name, cls, instruction if name == "instruction" else raw.get(name),
                         chunk_keys if name == "policy" else ())
                for name, cls in _SECTIONS.items() if not (name == "camera" and cameras)}
    policy = raw.get("policy") if isinstance(raw.get("policy"), dict) else {}
    chunks = _section("policy", ChunkConfig, {k: policy[k] for k in chunk_keys if k in policy})
    if cameras:
        sections["camera"] = next(iter(cameras.values()))
    return RobotConfig(bundle=str(bundle_path), ros2=ros2, chunks=chunks, cameras=cameras, **sections)


# -- the ros2: section ------------------------------------------------------------------------------------

# The device section each ROS 2 role replaces: the camera topic replaces the OpenCV camera, the command
# topic (with its joint states) the serial motor link.
_ROS2_REPLACES = {"camera": "camera", "command": "motor"}
_ROS2_ALTERNATIVE = {"camera": " (or ros2.camera for an Image topic)",
                     "motor": " (or ros2.command with ros2.telemetry for ROS 2 topics)"}


def _ros2_section(raw: Any) -> Ros2Section | None:
    """The ``ros2:`` section (edge/io/ros2/bridge.py); absent or null: the robot has no ROS 2 roles."""
    if raw is None:
        return None
    if raw is True or raw == {}:
        raise ConfigError("ros2: name at least one role (camera, instruction, command, telemetry, estop, "
                          "diagnostics, mode); see docs/ros2.md")
    return _section("ros2", Ros2Section, raw)


def _replaced_by_ros2(raw: dict, ros2: Ros2Section | None) -> set[str]:
    """The device sections the ROS 2 roles take the place of; a ConfigError for a combination that
    cannot work (both a device and its topic, joint states without the command topic they go with)."""
    if ros2 is None:
        return set()
    replaced = set()
    for role, section in _ROS2_REPLACES.items():
        if getattr(ros2, role) is None:
            continue
        if raw.get(section) is not None:
            raise ConfigError(f"both {section} and ros2.{role} are set: the robot has one {section} source; "
                              f"remove the {section} section or ros2.{role}")
        replaced.add(section)
    if ros2.command is not None and ros2.telemetry is None:
        raise ConfigError("ros2.command needs ros2.telemetry (sensor_msgs/JointState): without measured "
                          "joint states the safety layer stops the robot every tick; add ros2.telemetry "
                          "(e.g. {topic: /joint_states})")
    if ros2.telemetry is not None and ros2.command is None:
        raise ConfigError("ros2.telemetry goes with ros2.command: with the serial motor link the telemetry "
                          "comes from the controller; remove ros2.telemetry or set ros2.command")
    return replaced


def _cameras(raw: dict) -> dict[str, CameraConfig]:
    """The `cameras:` section: spec camera name -> camera config (the same keys as `camera:`)."""
    section = raw.get("cameras")
    if section is None:
        return {}
    if "camera" in raw:
        raise ConfigError("give either `camera:` (a one-camera policy) or `cameras:` (one entry per spec camera "
                          "name), not both")
    if not isinstance(section, dict) or not section:
        raise ConfigError("cameras must map each of the policy's camera names to a camera config, e.g. "
                          "cameras: {wrist: {source: /dev/video0}, top: {source: /dev/video2}}")
    return {str(name): _section(f"cameras.{name}", CameraConfig, value) for name, value in section.items()}


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping. PyYAML's own keeps the last value
    silently, so a second `safety:` section would replace the first one's limits without a word."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *defaults`: its keys may be overridden on purpose
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    if isinstance(key, Hashable) and key in seen:
                        raise ConfigError(f"duplicate key {key!r} on line {line} (first on line {seen[key]}): "
                                          "YAML would silently keep only the last one; merge the two into "
                                          "one entry")
                    if isinstance(key, Hashable):
                        seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RobotConfig:
    """Read and validate the config; `environ` (default os.environ) gives systemd's directories.

    A key given twice in one mapping (two `safety:` sections, two `max_slew_per_s:`) is a ConfigError
    naming the key and both lines."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist (see systemd/robot.example.yaml)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {path} cannot be read ({exc}); make it readable by the service "
                          f"user: sudo chmod a+r {path}") from exc
    try:
        raw = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"configuration file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
    return config_from_dict(raw, base_dir=path.parent, environ=environ)
