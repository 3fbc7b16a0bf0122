"""A motor link on ROS 2 topics: the command sink, joint-state telemetry and an e-stop latch behind the
serial link's interface (``send_targets``, ``emergency_stop``, ``clear_emergency_stop``,
``latest_telemetry``, ``telemetry_age_s``, ``stats``), so the control loop and the status readers take
either link.

The e-stop latch lives here, since a downstream ROS 2 controller has no latch of its own: while it is set
(by ``emergency_stop()`` or a ``true`` on the e-stop topic) every send publishes zeros, whatever was asked.
Only ``clear_emergency_stop()`` (the operator, through the control socket) releases it. The latch keeps
the motors stopped on its own; the service should still call the loop's ``emergency_stop()`` when
``is_latched`` turns true from the topic, so the status and /diagnostics show the e-stop.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import numpy as np

from edge.io.link_state import LinkStats
from edge.io.ros2.outputs import Ros2CommandSink, SentRos2Command
from edge.io.ros2.sources import JointSample, Ros2EStop, Ros2JointStateSource

logger = logging.getLogger(__name__)


class Ros2MotorLink:
    """Commands out through ``sink``; telemetry from ``telemetry`` and the latch from ``estop`` where given."""

    def __init__(self, sink: Ros2CommandSink, telemetry: Ros2JointStateSource | None = None,
                 estop: Ros2EStop | None = None) -> None:
        self.sink = sink
        self.telemetry = telemetry
        self.estop = estop
        self._latched = threading.Event()
        self._lock = threading.Lock()
        self._sent = self._failed = self._undelivered = 0
        self._zeros = np.zeros(sink.config.n_targets)

    def connect(self) -> None:
        """Connect the parts that are not yet (the bridge may have connected them already)."""
        for part in (self.sink, self.telemetry, self.estop):
            if part is not None and not part.is_connected:
                part.connect()

    @property
    def is_connected(self) -> bool:
        return self.sink.is_connected

    def disconnect(self) -> None:
        for part in (self.estop, self.telemetry, self.sink):  # the sink last: it leaves a zero command
            if part is not None and part.is_connected:
                part.disconnect()

    def __enter__(self) -> Ros2MotorLink:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    @property
    def is_latched(self) -> bool:
        return self._latched.is_set() or (self.estop is not None and self.estop.is_latched)

    def send_targets(self, targets: Sequence[float] | np.ndarray) -> SentRos2Command:
        """Publish ``targets`` (zeros while the e-stop is latched); returns what was published."""
        sent = self.sink.send_velocity(self._zeros if self.is_latched else targets)
        self._count(sent)
        return sent

    def emergency_stop(self) -> SentRos2Command:
        """Latch and publish a zero command at once."""
        if not self._latched.is_set():
            logger.warning("ROS 2 link: e-stop latched; commands on %s are zero until cleared",
                           self.sink.config.topic)
        self._latched.set()
        sent = self.sink.send_velocity(self._zeros)
        self._count(sent)
        return sent

    def clear_emergency_stop(self) -> SentRos2Command:
        """Release the latch (this one and the e-stop topic's); the next send carries the loop's command."""
        self._latched.clear()
        if self.estop is not None:
            self.estop.clear()
        sent = self.sink.send_velocity(self._zeros)
        self._count(sent)
        return sent

    def latest_telemetry(self) -> tuple[JointSample | None, float]:
        """The newest JointState (``velocities`` as the loop reads them) and its stamp on time.monotonic()."""
        if self.telemetry is None:
            return None, -math.inf
        sample, _, _ = self.telemetry.latest()
        return (None, -math.inf) if sample is None else (sample, sample.stamp_s)

    def telemetry_age_s(self, now: float | None = None) -> float:
        return math.inf if self.telemetry is None else self.telemetry.telemetry_age_s(now)

    @property
    def last_round_trip_s(self) -> float | None:
        return None  # a ROS 2 controller echoes no command sequence number to time a round trip with

    @property
    def stats(self) -> LinkStats:
        with self._lock:
            count = 0 if self.telemetry is None else self.telemetry.latest()[2]
            return LinkStats(telemetry_frames=count, commands_sent=self._sent, write_failures=self._failed,
                             undelivered=self._undelivered)

    def _count(self, sent: SentRos2Command) -> None:
        with self._lock:
            if sent.delivered:
                self._sent += 1
            elif self.sink.is_connected:
                self._failed += 1
            else:
                self._undelivered += 1
