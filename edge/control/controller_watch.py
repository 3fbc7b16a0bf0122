"""What the motor controller reports, read every tick: its status flags, its fault code, its per-reason
rejection counters and whether its telemetry can be believed (docs/serial-protocol.md, sections 4-6a).

The control loop asks `ControllerWatch.observe(telemetry)` once per tick for each new telemetry sample:

- telemetry that breaks the spec's bounds (a velocity beyond `VELOCITY_BOUND`, a position beyond
  `POSITION_BOUND`, a velocity count other than `motor.channels`, a position count other than 0 or
  `motor.channels`) is rejected: the tick treats it as missing, so the safety layer stops the robot;
- FAULT ("the host treats FAULT like an emergency stop", section 6; the fault code is named) and a
  controller that keeps rejecting our commands (any of its rejection counters growing on
  `REJECTION_TICKS` samples in a row; `rejected_estop` and `rejected_fault` only while it is neither
  latched nor faulted) are faults: the loop commands a stop and then holds, as after an e-stop clear,
  until `resume` or a new instruction;
- WATCHDOG_TRIPPED means the controller stopped the motors itself: the loop commands a controlled stop
  and the next motion ramps from zero, never from the command sent before the trip.

Pure: no I/O and no clock; the loop passes telemetry in and logs what comes out.
"""

from __future__ import annotations

import math

from edge.io.protocol import REJECTION_COUNTERS, FaultCode, StatusFlags, Telemetry, fault_name

# Measured velocities are in the velocity targets' normalised units and "may exceed ±1 slightly" (section 4):
# beyond 2 the value is not a measurement.
VELOCITY_BOUND = 2.0
POSITION_BOUND = 1.0e6  # radians; a wheel angle grows without bound, but not to 1e6 rad in a session
REJECTION_TICKS = 3  # rejection counters growing on this many samples in a row: our commands do not land
_U16 = 1 << 16
_U32 = 1 << 32
COUNTERS = REJECTION_COUNTERS
# Rejections that are expected while either side holds a latch or the controller a fault.
_EXPECTED_WHILE_STOPPED = ("rejected_estop", "rejected_fault")


class ControllerWatch:
    """The controller's health as the host sees it; `observe` once per new telemetry sample."""

    def __init__(self, channels: int) -> None:
        self.channels = int(channels)
        self.counters = dict.fromkeys(COUNTERS, 0)  # the controller's own, per reason, as last reported
        self.fault_code = int(FaultCode.NONE)  # the latest sample's
        self.last_fault_code = int(FaultCode.NONE)  # the latest non-zero one (a FAULT between two ticks)
        self.rejected_telemetry = 0  # samples refused by `valid`
        self.faults = 0  # times a fault started
        self.watchdog_trips = 0  # times WATCHDOG_TRIPPED appeared after the controller had accepted commands
        self.restarts = 0  # times its clock went back on a live connection (it restarted on its own)
        self.status = StatusFlags.NONE
        self._last: Telemetry | None = None
        self._accepted = False  # the controller has reported no trip since we started commanding
        self._rejecting = 0  # consecutive samples with a rejection counter growing

    def problem(self, telemetry: Telemetry) -> str | None:
        """Why this sample cannot be believed, or None."""
        n_vel, n_pos = len(telemetry.velocities), len(telemetry.positions)
        if n_vel != self.channels:
            return f"{n_vel} velocities for {self.channels} channels (motor.channels)"
        if n_pos not in (0, self.channels):
            return f"{n_pos} positions for {self.channels} channels (motor.channels; 0 is allowed)"
        for i, v in enumerate(telemetry.velocities):
            if not (math.isfinite(v) and abs(v) <= VELOCITY_BOUND):
                return f"velocity[{i}] = {v!r} is beyond ±{VELOCITY_BOUND:g}"
        for i, p in enumerate(telemetry.positions):
            if not (math.isfinite(p) and abs(p) <= POSITION_BOUND):
                return f"position[{i}] = {p!r} is beyond ±{POSITION_BOUND:g} rad"
        return None

    def observe(self, telemetry: Telemetry, *, estopped: bool, seen: StatusFlags | None = None) -> str | None:
        """Take one new, valid sample; returns the fault it shows (None when the controller is healthy).

        `estopped`: the host has latched its own e-stop, so dropped commands are expected. `seen`: the
        flags of every sample since the last call (the link's take_status_flags), so that a trip or a
        FAULT shown between two ticks counts; the latest sample's flags when None.
        """
        status = telemetry.status
        seen = status if seen is None else StatusFlags(seen | status)
        grew = False
        last = self._last
        restarted = last is not None and (
            (telemetry.controller_time_ms - last.controller_time_ms) % _U32 >= _U32 // 2)
        if restarted:
            # Its clock went back: it restarted, and comes up "as if the watchdog had tripped" (section 6),
            # though our next command may clear that before any telemetry shows it. Its counters restart.
            last = None
            self.restarts += 1
            if self._accepted:
                self.watchdog_trips += 1
                self._accepted = False
        if last is not None:
            # u16 counters wrap: the increment is (new - old) mod 65536 (section 5).
            expected = estopped or status & (StatusFlags.ESTOP_LATCHED | StatusFlags.FAULT)
            grew = any((getattr(telemetry, name) - getattr(last, name)) % _U16
                       for name in COUNTERS if not (expected and name in _EXPECTED_WHILE_STOPPED))
        for name in COUNTERS:
            self.counters[name] = int(getattr(telemetry, name))
        self._last = telemetry
        self._rejecting = self._rejecting + 1 if grew else 0
        if seen & StatusFlags.WATCHDOG_TRIPPED and self._accepted:
            self.watchdog_trips += 1
        self._accepted = not status & StatusFlags.WATCHDOG_TRIPPED  # the latest sample: accepting again?
        self.status = StatusFlags(status)
        self.fault_code = int(telemetry.fault_code)
        if self.fault_code:
            self.last_fault_code = self.fault_code
        if seen & StatusFlags.FAULT:
            code = fault_name(self.last_fault_code) if self.last_fault_code else "(code not seen)"
            return f"the controller reports FAULT {code} (motors disabled)"
        if self._rejecting >= REJECTION_TICKS:
            grown = ", ".join(f"{name[len('rejected_'):]} {count}" for name, count in self.counters.items() if count)
            return (f"the controller rejects our commands (its rejection counters grew on "
                    f"{self._rejecting} samples in a row: {grown})")
        return None

    def new_connection(self) -> None:
        """The link reconnected or the controller restarted: its counters and flags start over."""
        self._last = None
        self._accepted = False
        self._rejecting = 0

    @property
    def fault_name(self) -> str:
        """The latest fault code by name (NONE, OVER_CURRENT, ..., VENDOR_0xNN; section 4's table)."""
        return fault_name(self.fault_code)

    @property
    def flag_names(self) -> list[str]:
        return [flag.name for flag in StatusFlags if flag and flag in self.status]
