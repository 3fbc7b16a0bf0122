"""The bridge's outputs: commands (Twist or JointTrajectory) and status (/diagnostics).

- ``Ros2CommandSink``: geometry_msgs/Twist (differential drive) or trajectory_msgs/JointTrajectory (joints,
  to a downstream ros2_control); ``send_velocity`` returns what was sent after clamping, like the serial link.
- ``Ros2Diagnostics``: diagnostic_msgs/DiagnosticArray on /diagnostics, at most once per period_s (1 Hz),
  reliable and transient local so a late ``ros2 topic echo`` sees the last status.
- ``Ros2ModePublisher``: the loop's mode as std_msgs/String on /vla_edge/mode, on each change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.errors import ConfigError, InputError
from edge.io.ros2.dds import QosProfile, Ros2Node, check_topic
from edge.validation import check_choice, check_range, check_sequence, check_text

logger = logging.getLogger(__name__)


# --- commands out ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ros2CommandConfig:
    topic: str = "/cmd_vel"
    kind: str = "twist"  # twist: targets = (linear x m/s, angular z rad/s); joint_trajectory: one per joint
    max_abs: tuple[float, ...] = (1.0,)  # clamp per target (one value applies to all), in the topic's units
    joint_names: tuple[str, ...] = ()  # joint_trajectory only: the joints in target order
    time_from_start_s: float = 0.1  # joint_trajectory only: when the point should be reached (one tick)

    def __post_init__(self) -> None:
        check_topic("ros2.command.topic", self.topic)
        check_choice("ros2.command.kind", self.kind, ["joint_trajectory", "twist"])
        object.__setattr__(self, "max_abs", check_sequence(
            "ros2.command.max_abs", self.max_abs,
            lambda k, v: check_range(k, v, 0, 1e6, low_open=True)))
        if self.kind == "joint_trajectory":
            object.__setattr__(self, "joint_names", check_sequence(
                "ros2.command.joint_names", self.joint_names, lambda k, v: check_text(k, v, "a joint name"),
                noun="joint names"))
        elif self.joint_names:
            raise ConfigError("ros2.command.joint_names applies only to kind: joint_trajectory")
        check_range("ros2.command.time_from_start_s", self.time_from_start_s, 0, 10, unit="s", low_open=True)

    @property
    def n_targets(self) -> int:
        return 2 if self.kind == "twist" else len(self.joint_names)


@dataclass(frozen=True)
class SentRos2Command:
    """What a send call published (after clamping)."""

    targets: tuple[float, ...]
    sent_at_s: float  # time.monotonic()
    delivered: bool  # False: the write failed (nothing left this process)


class Ros2CommandSink:
    """Velocity commands as Twist or JointTrajectory (reliable, keep last 1)."""

    def __init__(self, node: Ros2Node, config: Ros2CommandConfig) -> None:
        self.node = node
        self.config = config
        self._writer: Any = None
        n = config.n_targets
        limits = config.max_abs if len(config.max_abs) != 1 else config.max_abs * n
        if len(limits) != n:
            raise ConfigError(f"ros2.command.max_abs has {len(config.max_abs)} values; give 1 or {n} "
                              f"(one per target of kind {config.kind})")
        self._limits = np.asarray(limits, dtype=np.float64)

    def connect(self) -> None:
        from edge.io.ros2 import msgs

        msg_type = msgs.Twist if self.config.kind == "twist" else msgs.JointTrajectory
        self._writer = self.node.writer(self.config.topic, msg_type, QosProfile.COMMAND)

    @property
    def is_connected(self) -> bool:
        return self._writer is not None

    def disconnect(self) -> None:
        if self._writer is not None:
            self.send_velocity(np.zeros(self.config.n_targets))  # leave the robot with a stop, not a speed
            self._writer = None

    def __enter__(self) -> Ros2CommandSink:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def send_velocity(self, targets: Sequence[float] | np.ndarray) -> SentRos2Command:
        values = np.asarray(targets, dtype=np.float64).reshape(-1)
        if values.shape[0] != self.config.n_targets:
            raise InputError(f"send_velocity: {values.shape[0]} targets, the {self.config.kind} command on "
                             f"{self.config.topic} takes {self.config.n_targets}")
        if not np.all(np.isfinite(values)):
            values = np.zeros_like(values)  # never publish NaN: a stop instead
        clamped = tuple(float(v) for v in np.clip(values, -self._limits, self._limits))
        if self._writer is None:
            return SentRos2Command(clamped, time.monotonic(), False)
        try:
            self._writer.write(self._message(clamped))
            delivered = True
        except Exception as exc:  # the binding raises DDSException; report, never crash the loop
            logger.warning("ROS 2 command on %s not written: %s", self.config.topic, exc)
            delivered = False
        return SentRos2Command(clamped, time.monotonic(), delivered)

    def _message(self, targets: tuple[float, ...]) -> Any:
        from edge.io.ros2 import msgs

        if self.config.kind == "twist":
            return msgs.Twist(linear=msgs.Vector3(x=targets[0]), angular=msgs.Vector3(z=targets[1]))
        point = msgs.JointTrajectoryPoint(velocities=list(targets),
                                          time_from_start=msgs.Duration.from_seconds(self.config.time_from_start_s))
        return msgs.JointTrajectory(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time())),
                                    joint_names=list(self.config.joint_names), points=[point])


# --- status out -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ros2DiagnosticsConfig:
    topic: str = "/diagnostics"
    name: str = "vla_edge: control loop"
    hardware_id: str = "vla-edge"
    period_s: float = 1.0  # at most one DiagnosticArray per period (ROS 2's diagnostic_updater rate)

    def __post_init__(self) -> None:
        check_topic("ros2.diagnostics.topic", self.topic)
        check_text("ros2.diagnostics.name", self.name)
        check_text("ros2.diagnostics.hardware_id", self.hardware_id)
        check_range("ros2.diagnostics.period_s", self.period_s, 0.1, 60, unit="s")


@dataclass(frozen=True)
class DiagnosticReport:
    level: int  # 0 OK, 1 WARN, 2 ERROR, 3 STALE (diagnostic_msgs/DiagnosticStatus)
    message: str
    values: dict[str, str] = field(default_factory=dict)


class Ros2Diagnostics:
    """Publishes the service status on /diagnostics (reliable, transient local), rate-limited to period_s."""

    def __init__(self, node: Ros2Node, config: Ros2DiagnosticsConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.config = config
        self._clock = clock
        self._writer: Any = None
        self._last_s = -math.inf

    def connect(self) -> None:
        from edge.io.ros2 import msgs

        self._writer = self.node.writer(self.config.topic, msgs.DiagnosticArray, QosProfile.STATUS)

    @property
    def is_connected(self) -> bool:
        return self._writer is not None

    def disconnect(self) -> None:
        self._writer = None

    def publish(self, report: DiagnosticReport, force: bool = False) -> bool:
        """Publish ``report`` unless one went out less than period_s ago; True when it was written."""
        from edge.io.ros2 import msgs

        if report.level not in (0, 1, 2, 3):
            raise InputError(f"diagnostic level {report.level} is not 0 (OK), 1 (WARN), 2 (ERROR) or 3 (STALE)")
        now = self._clock()
        if self._writer is None or (not force and now - self._last_s < self.config.period_s):
            return False
        status = msgs.DiagnosticStatus(level=report.level, name=self.config.name, message=report.message,
                                       hardware_id=self.config.hardware_id,
                                       values=[msgs.KeyValue(k, str(v)) for k, v in report.values.items()])
        try:
            self._writer.write(msgs.DiagnosticArray(header=msgs.Header(stamp=msgs.Time.from_seconds(time.time())),
                                                    status=[status]))
        except Exception as exc:  # the binding raises DDSException; a status topic never stops the robot
            logger.warning("ROS 2 diagnostics on %s not written: %s", self.config.topic, exc)
            return False
        self._last_s = now
        return True


@dataclass(frozen=True)
class Ros2ModeConfig:
    topic: str = "/vla_edge/mode"

    def __post_init__(self) -> None:
        check_topic("ros2.mode.topic", self.topic)


class Ros2ModePublisher:
    """The loop's mode (as the service names it: nominal, hold, fallback, estop) as std_msgs/String, on change.

    Reliable and transient local, like /diagnostics: ``ros2 topic echo /vla_edge/mode`` started later
    still prints the current mode.
    """

    def __init__(self, node: Ros2Node, config: Ros2ModeConfig) -> None:
        self.node = node
        self.config = config
        self._writer: Any = None
        self._last: str | None = None

    def connect(self) -> None:
        from edge.io.ros2 import msgs

        self._writer = self.node.writer(self.config.topic, msgs.String, QosProfile.STATUS)
        self._last = None

    @property
    def is_connected(self) -> bool:
        return self._writer is not None

    def disconnect(self) -> None:
        self._writer = None

    def publish(self, mode: str) -> bool:
        """Publish ``mode`` if it differs from the last one published; True when it was written."""
        from edge.io.ros2 import msgs

        if self._writer is None or mode == self._last:
            return False
        try:
            self._writer.write(msgs.String(data=mode))
        except Exception as exc:  # the binding raises DDSException; a status topic never stops the robot
            logger.warning("ROS 2 mode on %s not written: %s", self.config.topic, exc)
            return False
        self._last = mode
        return True
