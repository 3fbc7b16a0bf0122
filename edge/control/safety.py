"""Safety layer: the last step between the policy's action and the serial frame.

One of three layers (docs/architecture.md, "Decisions: 8. Layered safety"): this one (limits, slew
rate, NaN/Inf guard, stale inputs), the motor controller's own watchdog, and systemd's watchdog. Per tick, in order:

1. E-stop latched -> command is zero at once, regardless of slew (an e-stop is a stop).
2. Fallback is forced by any of: the caller's ``fallback`` (uncertainty gate), a non-finite
   action (NAN_GUARD), a camera frame or telemetry sample that is missing or older than
   ``stale_after_periods * period_s`` (STALE_FRAME; telemetry: ``telemetry_stale_after_s`` where set,
   STALE_TELEMETRY). A timestamp more than
   one period in the *future* also counts as stale: it means the producer uses another clock,
   which would otherwise hide staleness forever.
3. Fallback behaviour. A stop forced by lost input (stale frame or telemetry) or a NaN action follows
   ``input_loss_stop``: ``immediate`` (default) commands zero velocity at once, as the e-stop and the
   controller's watchdog do: the command was computed without fresh inputs, and the goal is a zero
   command at the controller within 300 ms of a fault the host can see (docs/faults.md); ``ramp``
   runs the controlled stop below instead. The gate's fallback (inputs fine, the policy uncertain):
   - ``controlled_stop``: ramp every dimension toward zero by at most ``decel_per_s * dt``.
     Deceleration is a limit of its own; config validation requires
     ``decel_per_s <= max_slew_per_s`` so a controlled stop never changes the command faster
     than the slew limit would allow.
   - ``damped``: ``damping * action`` (position channels hold), then clamped and slew-limited like a nominal action.
     Only used when the action is finite and the inputs are fresh, i.e. for the gate's
     fallback. A NaN action has nothing to damp, and an action computed from stale inputs
     is not about the present, so those two always stop (``input_loss_stop``).
4. Nominal (and damped): clamp to ``[action_low, action_high]`` (CLAMPED), then limit the
   change against the previously SENT command to ``max_slew_per_s * dt`` (SLEW_LIMITED).

``dt`` is the real time between ``apply`` calls on the caller's clock, clamped to
``[0, 3 * period_s]`` (a stalled loop does not earn a big jump; a clock going backwards
allows no change); the first call after construction or ``reset`` uses ``period_s``.

The stop command (all zeros) must lie within the limits; the config checks it.

Position channels (``kinds``, from the policy's ``spec.action.kinds``): a command is a position target,
so "stop" cannot mean zero (that is a place, maybe across the workspace). For a position channel a
controlled stop and the e-stop HOLD the last commanded position (the target does not move, the
controller's servo settles there); ``reset`` takes the last measured position (``observe_positions``)
where telemetry gave one, else keeps the last commanded. Limits and slew apply to the target as to a
velocity (the slew limit of a position channel is its largest speed); 0 need not lie within its limits.
Until every position channel has a known position (`positions_known`) the caller must not send a
command: any value would be a motion command (the loop sends none until telemetry gives the positions).
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError, InputError
from edge.validation import check_bound, check_choice, check_number, check_range, check_sequence

logger = logging.getLogger(__name__)

FALLBACK_BEHAVIOURS = ("controlled_stop", "damped")
INPUT_LOSS_STOPS = ("immediate", "ramp")
COMMAND_KINDS = ("velocity", "position")
# A timestamp up to this many periods in the future is tolerated (rounding, producer stamping
# just after our clock read); more than that means a different clock.
_FUTURE_TOLERANCE_PERIODS = 1.0
# The elapsed time used for slew is clamped to this many periods.
_MAX_DT_PERIODS = 3.0


class SafetyReason(enum.IntFlag):
    """Why the sent command differs from the proposed action (several may be set)."""

    NONE = 0
    CLAMPED = 1  # a dimension was outside [action_low, action_high]
    SLEW_LIMITED = 2  # the change vs the last sent command exceeded max_slew_per_s * dt
    NAN_GUARD = 4  # the action had NaN/Inf; it was discarded
    STALE_FRAME = 8  # camera frame missing or too old
    STALE_TELEMETRY = 16  # motor telemetry missing or too old
    FALLBACK = 32  # a fallback behaviour produced the command
    ESTOP = 64  # emergency stop latched: command is zero


def reason_names(reasons: int) -> list[str]:
    """The names of the reasons set in a record's bitmask, e.g. 40 -> ["STALE_FRAME", "FALLBACK"]."""
    return [reason.name for reason in SafetyReason if reason and reasons & reason]


@dataclass(frozen=True)
class SafetyConfig:
    """Limits of the command sent to the motor controller, one entry per action dimension.

    ``max_slew_per_s`` and ``decel_per_s`` accept one number for all dimensions.
    """

    action_low: tuple[float, ...]  # lowest command per dimension (command units); must be <= 0
    action_high: tuple[float, ...]  # highest command per dimension; must be >= 0, > action_low
    max_slew_per_s: tuple[float, ...]  # largest change of the command per second; > 0
    decel_per_s: tuple[float, ...]  # controlled-stop ramp toward zero per second; 0 < x <= max_slew
    period_s: float = 0.1  # control period (10 Hz)
    stale_after_periods: float = 2.0  # inputs older than this many periods force the fallback
    fallback_behaviour: str = "controlled_stop"  # one of FALLBACK_BEHAVIOURS
    damping: float = 0.5  # factor on the action in the "damped" fallback; 0..1
    kinds: tuple[str, ...] | None = None  # per dimension "velocity" or "position"; None: all velocity
    input_loss_stop: str = "immediate"  # stale input or NaN: one of INPUT_LOSS_STOPS
    telemetry_stale_after_s: float | None = None  # telemetry older than this is stale; None: stale_after_s

    def __post_init__(self) -> None:
        check_choice("safety.input_loss_stop", self.input_loss_stop, INPUT_LOSS_STOPS, quote=False)
        if self.telemetry_stale_after_s is not None:
            check_bound("motor.telemetry_stale_after_s", check_number(
                "motor.telemetry_stale_after_s", self.telemetry_stale_after_s), 0, unit="s", low_open=True)
        low = _vector(self.action_low, "safety.action_low", None)
        dim = len(low)
        kinds = ("velocity",) * dim if self.kinds is None else check_sequence(
            "spec.action.kinds", self.kinds, lambda k, v: check_choice(k, v, COMMAND_KINDS), length=dim,
            each="one per action dimension")
        object.__setattr__(self, "kinds", kinds)
        high = _vector(self.action_high, "safety.action_high", dim)
        slew = _vector(self.max_slew_per_s, "safety.max_slew_per_s", dim)
        decel = _vector(self.decel_per_s, "safety.decel_per_s", dim)
        for i in range(dim):
            if not low[i] < high[i]:
                raise ConfigError(
                    f"safety.action_low[{i}] ({low[i]!r}) must be < safety.action_high[{i}] ({high[i]!r})"
                )
            if kinds[i] == "velocity" and not (low[i] <= 0.0 <= high[i]):
                raise ConfigError(
                    f"safety.action_low[{i}]..action_high[{i}] ({low[i]!r}..{high[i]!r}) must include 0: "
                    "zero is the stop command the fallback and e-stop send"
                )
            check_bound(f"safety.max_slew_per_s[{i}]", slew[i], 0, low_open=True)
            if not 0.0 < decel[i] <= slew[i]:
                raise ConfigError(
                    f"safety.decel_per_s[{i}] must be > 0 and <= safety.max_slew_per_s[{i}] "
                    f"({slew[i]!r}), got {decel[i]!r}"
                )
        period = check_bound("safety.period_s", check_number("safety.period_s", self.period_s), 0, unit="s",
                             low_open=True)
        stale = check_bound("safety.stale_after_periods",
                            check_number("safety.stale_after_periods", self.stale_after_periods), 0, low_open=True)
        check_choice("safety.fallback_behaviour", self.fallback_behaviour, FALLBACK_BEHAVIOURS, quote=False)
        damping = check_bound("safety.damping", check_number("safety.damping", self.damping), 0, 1, dotted=True)
        for name, value in (
            ("action_low", low),
            ("action_high", high),
            ("max_slew_per_s", slew),
            ("decel_per_s", decel),
            ("period_s", period),
            ("stale_after_periods", stale),
            ("damping", damping),
        ):
            object.__setattr__(self, name, value)

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    @property
    def stale_after_s(self) -> float:
        return self.stale_after_periods * self.period_s

    @property
    def telemetry_stale_s(self) -> float:
        """Telemetry's own limit (a 50 Hz controller allows a tighter one than a 10 fps camera)."""
        return self.stale_after_s if self.telemetry_stale_after_s is None else float(self.telemetry_stale_after_s)


def _vector(value: object, key: str, dim: int | None) -> tuple[float, ...]:
    """Finite numbers, one per action dimension; with ``dim`` known, one number stands for all."""
    if dim is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return (check_number(key, value),) * dim
    return check_sequence(key, value, check_number, length=dim, each="one per action dimension")


@dataclass(frozen=True)
class SafetySection:
    """The ``safety:`` section of the robot config; with the bundle's action limits it gives a SafetyConfig."""

    max_slew_per_s: float | None = None  # None: the bundle's limit; normalised command units per second
    decel_per_s: float = 2.0  # controlled-stop ramp toward zero, normalised units per second
    fallback_behaviour: str = "controlled_stop"  # controlled_stop | damped
    damping: float = 0.5  # damped fallback: this share of the policy's action
    stale_after_periods: float = 2.0  # frame or telemetry older than this many periods -> fallback
    input_loss_stop: str = "immediate"  # immediate (zero velocity at once) | ramp (at decel_per_s)

    def __post_init__(self) -> None:
        check_choice("safety.input_loss_stop", self.input_loss_stop, INPUT_LOSS_STOPS, quote=False)
        check_range("safety.max_slew_per_s", self.max_slew_per_s, 0.01, 100.0, unit="units/s", nullable=True)
        check_range("safety.decel_per_s", self.decel_per_s, 0.01, 100.0, unit="units/s")
        check_choice("safety.fallback_behaviour", self.fallback_behaviour, FALLBACK_BEHAVIOURS, quote=False)
        check_range("safety.damping", self.damping, 0.0, 1.0)
        check_range("safety.stale_after_periods", self.stale_after_periods, 1.0, 20.0, unit="periods")


@dataclass(frozen=True, slots=True)
class SafetyResult:
    """What the safety layer decided for one tick.

    ``command`` is a READ-ONLY view of the layer's internal buffer: it is the truth of what
    to send *now*, and it is overwritten by the next ``apply``/``reset``/``estop``. Send it or
    copy it (``result.command.copy()``) before the next call; never keep the view.
    """

    command: np.ndarray  # float32, shape (action_dim,), finite, within float32(limits)
    reasons: SafetyReason
    stopping: bool  # True while a controlled stop or an e-stop produces the command

    @property
    def fallback(self) -> bool:
        return bool(self.reasons & SafetyReason.FALLBACK)


class SafetyLayer:
    """Turns a proposed action into the command to send. Pure: time comes in as arguments."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        dim = config.action_dim
        self._low = np.asarray(config.action_low, dtype=np.float64)
        self._high = np.asarray(config.action_high, dtype=np.float64)
        self._slew = np.asarray(config.max_slew_per_s, dtype=np.float64)
        self._decel = np.asarray(config.decel_per_s, dtype=np.float64)
        # Every per-tick buffer is allocated here, none in apply().
        self._target = np.zeros(dim, dtype=np.float64)
        self._prev = np.zeros(dim, dtype=np.float64)  # last sent command, full precision
        self._step = np.zeros(dim, dtype=np.float64)
        self._limit = np.zeros(dim, dtype=np.float64)
        self._neg_limit = np.zeros(dim, dtype=np.float64)
        self._clamped = np.zeros(dim, dtype=np.float64)
        self._finite = np.zeros(dim, dtype=bool)
        # 1 for velocity channels, 0 for position channels: a stop ramps velocities, holds positions.
        self._ramps = np.array([k == "velocity" for k in config.kinds], dtype=np.float64)
        self._holds = 1.0 - self._ramps
        self._has_positions = not bool(self._ramps.all())
        self._measured = np.zeros(dim, dtype=np.float64)  # last measured position per channel
        self._known = self._ramps.astype(bool)  # position known (velocity channels: always)
        self._sent = np.zeros(dim, dtype=np.float32)
        self._sent_view = self._sent.view()
        self._sent_view.flags.writeable = False
        self._last_now_s: float | None = None
        self._estop = False
        self.ticks = 0
        self.fallback_ticks = 0
        self.estop_ticks = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def last_command(self) -> np.ndarray:
        """Read-only view of the last command produced (zeros before the first tick)."""
        return self._sent_view

    @property
    def estopped(self) -> bool:
        return self._estop

    @property
    def positions_known(self) -> bool:
        """Every position channel has a known position (always True without position channels)."""
        return bool(self._known.all())

    def observe_positions(self, positions: Sequence[float]) -> None:
        """The controller's measured positions (a telemetry sample already checked for bounds): the
        position channels' hold target after a `reset`. The first sample also starts from them."""
        if not self._has_positions:
            return
        first = not self.positions_known
        for i in range(min(len(positions), len(self._measured))):
            if not self._ramps[i]:
                self._measured[i] = positions[i]
                self._known[i] = True
        if first and self.positions_known:
            self.reset()

    def reset(self, command: np.ndarray | Sequence[float] | None = None) -> None:
        """Start-up: set the command the motors are known to hold (by default zero velocity, and the
        measured position of position channels where known, else their last command).

        The next ``apply`` slews from it using ``period_s`` as elapsed time. A latched e-stop
        stays latched; only ``clear_estop`` releases it.
        """
        if command is None:
            # prev = ramps * 0 + (1 - ramps) * (measured where known, else prev)
            held = np.where(self._known, self._measured, self._prev) if self._has_positions else self._prev
            np.multiply(held, self._holds, out=self._prev)
        else:
            arr = self._checked(command, "reset command")
            if not np.all(np.isfinite(arr)):
                raise InputError(f"reset command must be finite, got {arr!r}")
            np.clip(arr, self._low, self._high, out=self._prev)
        self._publish()
        self._last_now_s = None

    def estop(self) -> None:
        """Latch the emergency stop: every command is zero until ``clear_estop``."""
        if not self._estop:
            logger.warning("emergency stop latched: commanding zero")
        self._estop = True
        self._prev *= self._holds  # zero velocity; position channels hold their target
        self._publish()

    def clear_estop(self) -> None:
        """Release the e-stop; commands then slew up from zero."""
        if self._estop:
            logger.warning("emergency stop cleared: commands slew up from zero")
        self._estop = False

    # -- the tick ------------------------------------------------------------------------

    def apply(
        self,
        action: np.ndarray,
        *,
        now_s: float,
        frame_time_s: float | None,
        telemetry_time_s: float | None,
        fallback: bool,
    ) -> SafetyResult:
        """Guard one proposed action; ``now_s`` and the input times share one monotonic clock."""
        cfg = self.config
        arr = self._checked(action, "action")
        now_s = float(now_s)
        if self._last_now_s is None or not math.isfinite(now_s):
            dt = cfg.period_s
        else:
            dt = min(max(now_s - self._last_now_s, 0.0), _MAX_DT_PERIODS * cfg.period_s)
        if math.isfinite(now_s):
            self._last_now_s = now_s
        self.ticks += 1

        if self._estop:
            # estop() already stopped the velocities; again in case reset() ran since.
            self._prev *= self._holds
            self._publish()
            self.estop_ticks += 1
            return SafetyResult(self._sent_view, SafetyReason.ESTOP, True)

        reasons = SafetyReason.NONE
        np.isfinite(arr, out=self._finite)
        finite = bool(self._finite.all())
        if not finite:
            reasons |= SafetyReason.NAN_GUARD
        if self._stale(frame_time_s, now_s, cfg.stale_after_s):
            reasons |= SafetyReason.STALE_FRAME
        if self._stale(telemetry_time_s, now_s, cfg.telemetry_stale_s):
            reasons |= SafetyReason.STALE_TELEMETRY
        forced_stop = bool(reasons)  # NaN or stale: a controlled stop whatever is configured

        if forced_stop or fallback:
            reasons |= SafetyReason.FALLBACK
            self.fallback_ticks += 1
            if forced_stop and cfg.input_loss_stop == "immediate":
                self._prev *= self._holds  # zero velocity at once; position channels hold
                self._publish()
                return SafetyResult(self._sent_view, reasons, True)
            if forced_stop or cfg.fallback_behaviour == "controlled_stop":
                # Ramp toward zero: step = clip(-prev, -decel*dt, +decel*dt).
                np.multiply(self._decel, dt, out=self._limit)
                np.negative(self._limit, out=self._neg_limit)
                np.negative(self._prev, out=self._step)
                np.clip(self._step, self._neg_limit, self._limit, out=self._step)
                self._step *= self._ramps  # position channels hold
                self._prev += self._step
                self._publish()
                return SafetyResult(self._sent_view, reasons, True)
            np.multiply(arr, cfg.damping, out=self._target)
            if self._has_positions:
                # A damped position target would pull toward 0: position channels hold instead.
                self._target *= self._ramps
                self._target += self._prev * self._holds
        else:
            self._target[:] = arr

        # Clamp to limits, then slew-limit against the last sent command.
        np.clip(self._target, self._low, self._high, out=self._clamped)
        if not np.array_equal(self._clamped, self._target):
            reasons |= SafetyReason.CLAMPED
        np.subtract(self._clamped, self._prev, out=self._step)
        np.multiply(self._slew, dt, out=self._limit)
        np.negative(self._limit, out=self._neg_limit)
        np.clip(self._step, self._neg_limit, self._limit, out=self._target)
        if np.array_equal(self._target, self._step):
            self._prev[:] = self._clamped  # exact, no prev + (x - prev) rounding
        else:
            reasons |= SafetyReason.SLEW_LIMITED
            self._prev += self._target
        self._publish()
        return SafetyResult(self._sent_view, reasons, False)

    # -- helpers -------------------------------------------------------------------------

    def _checked(self, value: object, what: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != (self.config.action_dim,) or arr.dtype.kind not in "fiu":
            raise InputError(
                f"{what} must be a real vector of shape ({self.config.action_dim},), "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        return arr

    def _stale(self, stamp_s: float | None, now_s: float, limit_s: float) -> bool:
        if stamp_s is None:
            return True
        age_s = now_s - float(stamp_s)
        if not math.isfinite(age_s):
            return True
        period = self.config.period_s
        return age_s > limit_s or age_s < -_FUTURE_TOLERANCE_PERIODS * period

    def _publish(self) -> None:
        # Rounding to float32 is monotonic, so a value within the float64 limits stays within
        # float32(limit); no second clip needed.
        np.copyto(self._sent, self._prev, casting="same_kind")
