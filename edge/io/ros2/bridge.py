"""The ``ros2:`` section of the robot config and the bridge it builds: one node, the roles it names.

In YAML, a role that is not listed stays on its usual device (OpenCV camera, serial link, control socket);
a listed role takes its mapping (or ``{}`` / ``true`` for the defaults)::

    ros2:
      domain_id: 0
      interface_address: 127.0.0.1
      peers: [127.0.0.1]
      camera: {topic: /camera/image_raw}
      instruction: {topic: /instruction}
      command: {topic: /cmd_vel, kind: twist, max_abs: [0.5, 1.5]}
      telemetry: {topic: /joint_states}
      estop: {topic: /estop}
      diagnostics: {}
      mode: {topic: /vla_edge/mode}

``Ros2Section`` validates itself (unknown keys are errors, every error names ``ros2.<role>.<key>``), so the
service's config loader takes it like any other section; ``Ros2Bridge`` is the one place that turns it
into parts, for the service's wiring to call.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from edge.errors import ConfigError
from edge.io.ros2.dds import Ros2Config, Ros2Node
from edge.io.ros2.outputs import (
    Ros2CommandConfig,
    Ros2CommandSink,
    Ros2Diagnostics,
    Ros2DiagnosticsConfig,
    Ros2ModeConfig,
    Ros2ModePublisher,
)
from edge.io.ros2.sources import (
    Ros2Camera,
    Ros2CameraConfig,
    Ros2EStop,
    Ros2InstructionSource,
    Ros2JointStateSource,
    Ros2TopicConfig,
)

logger = logging.getLogger(__name__)

_DEFAULT_TOPICS = {"instruction": "/instruction", "telemetry": "/joint_states", "estop": "/estop"}


def _role(name: str, cls: type, raw: Any, defaults: dict[str, Any] | None = None) -> Any:
    """A role's config from its YAML value: None (off), True or {} (defaults), or a mapping of keys."""
    if raw is None or raw is False or isinstance(raw, cls):
        return None if raw is False else raw
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"ros2.{name} must be a mapping of keys (or true for the defaults), got "
                          f"{type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)} - {"key"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'ros2.{name}.{k}' for k in unknown)}; allowed keys in "
                          f"ros2.{name}: {', '.join(sorted(known))}")
    values = {**(defaults or {}), **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}}
    return cls(**values)


@dataclass(frozen=True)
class Ros2Section:
    """The DDS domain and network (as Ros2Config), and which roles run on ROS 2 topics."""

    domain_id: int = 0
    interface_address: str = "127.0.0.1"
    peers: tuple[str, ...] = ("127.0.0.1",)
    allow_multicast: bool = False
    max_auto_participant_index: int = 32
    camera: Ros2CameraConfig | None = None  # sensor_msgs/Image or CompressedImage in place of OpenCV
    instruction: Ros2TopicConfig | None = None  # std_msgs/String, beside the control socket
    command: Ros2CommandConfig | None = None  # Twist or JointTrajectory in place of the serial link
    telemetry: Ros2TopicConfig | None = None  # sensor_msgs/JointState
    estop: Ros2TopicConfig | None = None  # std_msgs/Bool, latching
    diagnostics: Ros2DiagnosticsConfig | None = None  # diagnostic_msgs/DiagnosticArray at 1 Hz
    mode: Ros2ModeConfig | None = None  # the loop's mode as std_msgs/String, on change

    def __post_init__(self) -> None:
        _ = self.node  # validates the network keys (errors name ros2.<key>)
        set_ = object.__setattr__
        set_(self, "camera", _role("camera", Ros2CameraConfig, self.camera))
        set_(self, "command", _role("command", Ros2CommandConfig, self.command))
        set_(self, "diagnostics", _role("diagnostics", Ros2DiagnosticsConfig, self.diagnostics))
        set_(self, "mode", _role("mode", Ros2ModeConfig, self.mode))
        for name in ("instruction", "telemetry", "estop"):
            set_(self, name, _role(name, Ros2TopicConfig, getattr(self, name),
                                   {"topic": _DEFAULT_TOPICS[name], "key": f"ros2.{name}.topic"}))

    @property
    def node(self) -> Ros2Config:
        return Ros2Config(domain_id=self.domain_id, interface_address=self.interface_address,
                          peers=tuple(self.peers), allow_multicast=self.allow_multicast,
                          max_auto_participant_index=self.max_auto_participant_index)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(name for name in ("camera", "instruction", "command", "telemetry", "estop", "diagnostics",
                                  "mode")
                     if getattr(self, name) is not None)


class Ros2Bridge:
    """One DDS participant and the roles the section names; connect() starts them, disconnect() stops them."""

    def __init__(self, section: Ros2Section) -> None:
        self.section = section
        self.node = Ros2Node(section.node)
        s = section
        self.camera = None if s.camera is None else Ros2Camera(self.node, s.camera)
        self.instructions = None if s.instruction is None else Ros2InstructionSource(self.node, s.instruction)
        self.command = None if s.command is None else Ros2CommandSink(self.node, s.command)
        self.telemetry = None if s.telemetry is None else Ros2JointStateSource(self.node, s.telemetry)
        self.estop = None if s.estop is None else Ros2EStop(self.node, s.estop)
        self.diagnostics = None if s.diagnostics is None else Ros2Diagnostics(self.node, s.diagnostics)
        self.mode = None if s.mode is None else Ros2ModePublisher(self.node, s.mode)

    def _parts(self) -> list[Any]:
        # Outputs first: a command sink is up before frames can drive anything; the camera last, since
        # its connect() waits for a frame.
        parts = [self.diagnostics, self.mode, self.command, self.estop, self.instructions, self.telemetry,
                 self.camera]
        return [p for p in parts if p is not None]

    def connect(self) -> None:
        self.node.connect()
        connected = []
        try:
            for part in self._parts():
                part.connect()
                connected.append(part)
        except BaseException:
            for part in reversed(connected):
                part.disconnect()
            self.node.disconnect()
            raise
        logger.info("ROS 2 bridge up: %s", ", ".join(self.section.roles) or "no roles")

    @property
    def is_connected(self) -> bool:
        return self.node.is_connected

    def disconnect(self) -> None:
        # Reverse order: the command sink, nearly last, leaves a zero command on its topic.
        for part in reversed(self._parts()):
            part.disconnect()
        self.node.disconnect()

    def __enter__(self) -> Ros2Bridge:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()
