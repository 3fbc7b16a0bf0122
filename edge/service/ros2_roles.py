"""The robot service on ROS 2 topics: the bridge the ``ros2:`` section names, and what ties it to the loop.

``Ros2Roles`` holds the bridge (edge/io/ros2/bridge.py) and gives the service its parts: the camera
(``Ros2Camera`` in place of the OpenCV camera) and the motor link (``Ros2MotorLink``: commands out as
Twist or JointTrajectory, joint states in, its own e-stop latch) where those roles are configured.
Once the loop exists, ``attach(loop)`` starts one thread (``Ros2LoopAdapter``) that carries, every
``POLL_S``:

- a ``true`` on the e-stop topic into ``loop.emergency_stop()``, as the control socket's ``estop`` does;
  the topic's latch is then handed over to the loop and the link (so the operator's ``vla-edge clear``
  releases it, and a later ``true`` latches again). ``Ros2MotorLink`` sends zeros from the moment the
  topic latches, before this thread has seen it;
- a new String on the instruction topic into ``loop.set_instruction`` (beside the control socket);
- the loop's published status (``loop.status()``, never its internals) onto the mode topic (on change)
  and ``/diagnostics`` (at most once per ``ros2.diagnostics.period_s``, 1 Hz by default).

Nothing here runs inside a tick: a slow DDS write delays only this thread.
"""

from __future__ import annotations

import logging
import math
import threading

from edge.control.status import LoopStatus
from edge.errors import EdgeError
from edge.io.ros2.bridge import Ros2Bridge, Ros2Section
from edge.io.ros2.link import Ros2MotorLink
from edge.io.ros2.outputs import DiagnosticReport
from edge.ratelimit import RateLimitedWarnings

logger = logging.getLogger(__name__)

POLL_S = 0.02  # how often the adapter looks at the e-stop latch, the instruction and the status
# diagnostic_msgs/DiagnosticStatus levels
OK, WARN, ERROR, STALE = 0, 1, 2, 3


def _number(value: float | None, digits: int = 4) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def diagnostic_report(status: LoopStatus) -> DiagnosticReport:
    """The loop's status snapshot as one DiagnosticStatus: its level, a one-line message, key/values.

    ERROR: e-stop latched, the motor link down or the camera stream lost; WARN: the robot holds or falls
    back (no instruction, high uncertainty, stale input); OK: the policy drives. The monitor's score and
    its thresholds are among the key/values.
    """
    link, camera, tick = status.link, status.camera, status.tick
    values = {
        "mode": status.mode,
        "instruction": status.instruction or "",
        "score": _number(tick.score if tick is not None else None),
        "threshold": _number(status.threshold),
        "hard_ceiling": _number(status.hard_ceiling),
        "ticks": str(status.ticks),
        "fallback_ticks": str(status.counters.get("fallback", 0)),
        "overruns": str(status.timing.overruns),
        "tick_ms": _number(tick.tick_ms if tick is not None else None),
        "estop": str(status.estop).lower(),
    }
    if status.hold_reason:
        values["hold_reason"] = status.hold_reason
    problems = []
    if link is not None:
        values["link_connected"] = str(link.connected).lower()
        values["telemetry_age_s"] = _number(link.telemetry_age_s)
        if not link.connected:
            problems.append("motor link down")
    if camera is not None:
        values["camera_streaming"] = str(camera.streaming).lower()
        values["frame_age_s"] = _number(camera.frame_age_s)
        if camera.connected and not camera.streaming:
            problems.append("camera stream lost")
    if status.estop:
        return DiagnosticReport(ERROR, "emergency stop latched", values)
    if problems:
        return DiagnosticReport(ERROR, ", ".join(problems), values)
    if status.mode == "nominal":
        return DiagnosticReport(OK, "driving", values)
    why = status.hold_reason or ("no instruction" if not status.instruction else status.mode)
    return DiagnosticReport(WARN, f"{status.mode}: {why}", values)


class Ros2LoopAdapter:
    """The thread between the bridge's e-stop, instruction and status roles and a running loop."""

    def __init__(self, bridge: Ros2Bridge, loop) -> None:
        self.bridge = bridge
        self.loop = loop
        self.estops = 0  # e-stops the topic latched and this adapter carried into the loop
        self.instructions = 0  # instructions from the topic handed to the loop
        self._instruction_count = 0
        self._stop = threading.Event()
        self._warn = RateLimitedWarnings(logger)
        self._thread = threading.Thread(target=self._run, name="ros2-loop-adapter", daemon=True)

    def start(self) -> Ros2LoopAdapter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.step()
            except EdgeError as exc:  # a refused instruction, a failed write: reported, the loop goes on
                self._warn("ROS 2 roles: %s", exc)

    def step(self) -> None:
        """One pass: e-stop first (it must not wait behind a status write), then instruction, then status."""
        estop = self.bridge.estop
        if estop is not None and estop.is_latched:
            self.loop.emergency_stop()  # the loop latches its safety layer and the link, then ...
            estop.clear()  # ... the topic's latch is theirs: `vla-edge clear` releases it, a new true relatches
            self.estops += 1
            logger.warning("e-stop from ROS 2 topic %s: emergency stop latched; `vla-edge clear` releases it",
                           estop.config.topic)
        source = self.bridge.instructions
        if source is not None:
            text, _, count = source.latest()
            if count != self._instruction_count and text is not None:
                self._instruction_count = count
                self.loop.set_instruction(text)
                self.instructions += 1
                logger.info("instruction from ROS 2 topic %s: %r", source.config.topic, text)
        status = self.loop.status()
        if self.bridge.mode is not None:
            self.bridge.mode.publish(status.mode)
        if self.bridge.diagnostics is not None:
            self.bridge.diagnostics.publish(diagnostic_report(status))


class Ros2Roles:
    """The bridge of a ``ros2:`` section and the parts it gives the service (``camera``, ``link``)."""

    def __init__(self, section: Ros2Section) -> None:
        self.section = section
        self.bridge = Ros2Bridge(section)
        b = self.bridge
        self.camera = b.camera  # None: the OpenCV camera of the camera section
        self.link = None if b.command is None else Ros2MotorLink(b.command, b.telemetry, b.estop)
        self.adapter: Ros2LoopAdapter | None = None

    def connect(self) -> None:
        """Join the DDS domain and start every role (the camera waits for its first frame)."""
        self.bridge.connect()

    @property
    def is_connected(self) -> bool:
        return self.bridge.is_connected

    def attach(self, loop) -> None:
        """Start carrying the e-stop topic, the instruction topic and the status between bridge and loop."""
        if self.adapter is not None:
            raise EdgeError("the ROS 2 roles are already attached to a loop")
        self.adapter = Ros2LoopAdapter(self.bridge, loop).start()

    def detach(self) -> None:
        """Stop the adapter and say so on the status topics (the last /diagnostics a late reader sees)."""
        if self.adapter is None:
            return
        self.adapter.stop()
        self.adapter = None
        if self.bridge.mode is not None:
            self.bridge.mode.publish("stopped")
        if self.bridge.diagnostics is not None:
            self.bridge.diagnostics.publish(DiagnosticReport(STALE, "service stopped"), force=True)

    def disconnect(self) -> None:
        self.detach()
        self.bridge.disconnect()
