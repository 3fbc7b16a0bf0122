"""The simulated controller's channels: what each accepts (its Capabilities) and how it moves.

The reference robot is two velocity wheels, driven through the reference world's physics
(simulator.controller). Any other layout (an arm's position joints, a gripper, extra velocity axes)
is simulated here, channel by channel, with no world behind it:

* a velocity channel's measured speed follows its target with a first-order lag (time constant
  ``time_constant_s``); its position integrates the speed (``max_speed_per_s`` units per second at 1.0);
* a position channel is a first-order servo: each step closes the fraction 1 - exp(-dt / tau) of the
  gap to its target, never faster than ``max_speed_per_s``; its measured speed is reported normalised
  by that maximum, so it stays within [-1, 1].

"Stop" (watchdog, e-stop, fault) means 0 for a velocity channel and "hold where you are" for a
position channel (docs/serial-protocol.md, section 6). Pure numbers; the controller holds the lock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge.io.protocol import POSITION, VELOCITY, ChannelCapability, SetTargets

DEFAULT_POSITION_LIMITS = (-math.pi, math.pi)  # a revolute joint's range, in rad
# Rejection counters the checks below name (Telemetry's, docs/serial-protocol.md section 4).
CHANNEL_COUNT, KIND, RANGE = "rejected_channel_count", "rejected_kind", "rejected_range"


@dataclass(frozen=True)
class ChannelLayout:
    """What the controller's channels are; validated at construction (ValueError naming the field)."""

    kinds: tuple[str, ...] = (VELOCITY, VELOCITY)  # the reference robot: left and right wheel
    position_limits: tuple[tuple[float, float], ...] = ()  # per channel; () = DEFAULT_POSITION_LIMITS each
    time_constant_s: float = 0.05  # first-order lag of every channel
    max_speed_per_s: float = 2.0  # units per second at normalised speed 1 (rad/s for a joint)

    def __post_init__(self) -> None:
        kinds = tuple(self.kinds)
        if not 1 <= len(kinds) <= 8 or any(k not in (VELOCITY, POSITION) for k in kinds):
            raise ValueError(f"kinds must be 1..8 of {VELOCITY!r}/{POSITION!r}, got {self.kinds!r}")
        limits = tuple(tuple(map(float, pair)) for pair in self.position_limits) or (
            (DEFAULT_POSITION_LIMITS,) * len(kinds))
        if len(limits) != len(kinds) or any(len(p) != 2 or not p[0] <= p[1] for p in limits):
            raise ValueError(f"position_limits must be one (low, high) with low <= high per channel, "
                             f"got {self.position_limits!r}")
        for name in ("time_constant_s", "max_speed_per_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "position_limits", limits)

    @property
    def channels(self) -> int:
        return len(self.kinds)

    @property
    def is_reference_robot(self) -> bool:
        """Two velocity wheels: the reference world's robot, driven by its physics."""
        return self.kinds == (VELOCITY, VELOCITY)

    def capabilities(self) -> tuple[ChannelCapability, ...]:
        return tuple(
            ChannelCapability(kinds=(kind,), position_min=low, position_max=high) if kind == POSITION
            else ChannelCapability(kinds=(kind,))
            for kind, (low, high) in zip(self.kinds, self.position_limits))

    def rejection(self, message: SetTargets) -> str | None:
        """The rejection counter a SetTargets falls into (section 4's order), or None when it is valid."""
        if len(message.targets) != self.channels:
            return CHANNEL_COUNT
        if message.kinds != self.kinds:
            return KIND
        for kind, value, (low, high) in zip(message.kinds, message.targets, self.position_limits):
            if not math.isfinite(value):
                return RANGE
            if kind == POSITION and not low <= value <= high:
                return RANGE
            if kind == VELOCITY and not -1.0 <= value <= 1.0:
                return RANGE
        return None

    def stop_targets(self, positions: tuple[float, ...]) -> tuple[float, ...]:
        """Targets that stop every channel: 0 for velocity, the measured position for position."""
        return tuple(p if kind == POSITION else 0.0 for kind, p in zip(self.kinds, positions))


class ChannelModel:
    """Measured speeds (normalised) and positions of a layout's channels, advanced step by step."""

    def __init__(self, layout: ChannelLayout) -> None:
        self.layout = layout
        self.velocities = (0.0,) * layout.channels
        self.positions = tuple(
            min(max(0.0, low), high) if kind == POSITION else 0.0
            for kind, (low, high) in zip(layout.kinds, layout.position_limits))

    def step(self, targets: tuple[float, ...], dt_s: float) -> None:
        layout = self.layout
        alpha = 1.0 - math.exp(-dt_s / layout.time_constant_s)
        max_step = layout.max_speed_per_s * dt_s
        velocities, positions = [], []
        for kind, target, v, p in zip(layout.kinds, targets, self.velocities, self.positions):
            if kind == VELOCITY:
                v = v + (target - v) * alpha
                p = p + v * layout.max_speed_per_s * dt_s
            else:
                moved = max(-max_step, min(max_step, (target - p) * alpha))
                p = p + moved
                v = moved / max_step if max_step > 0 else 0.0
            velocities.append(float(v))
            positions.append(float(p))
        self.velocities, self.positions = tuple(velocities), tuple(positions)
