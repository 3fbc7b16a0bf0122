"""Host side of the serial link to the motor controller (protocol: docs/serial-protocol.md).

One reader thread owns the port's input: it decodes telemetry with ``FrameDecoder``, keeps the latest
``Telemetry`` with its receive time on ``time.monotonic()`` and counts bad frames, so the control tick
never waits on a read and one bad frame never kills the loop. Commands are written from the caller's
thread with a write timeout; a failed write is reported in the returned ``SentCommand`` instead of
raising into the loop. A write that fails marks the link down; one that times out (a slow line, a
starved host) keeps the port open unless three do in a row, since reopening a USB CDC port can toggle
DTR and reset some boards.

When the device disappears (adapter unplugged, pty closed) reads or writes raise; the link goes down
and the reader thread reopens the configured path with exponential backoff. Point the config at a
stable path (``/dev/serial/by-id/...``) so the reopened device is found again after re-enumeration.
While the link is down ``is_connected`` is False and the control loop stays in its controlled stop;
the controller's own watchdog stops the motors 300 ms after the last command that reached it.

Capabilities: on every (re)opened port, and after the controller restarts, the reader thread sends
GetCapabilities every 100 ms until the controller's Capabilities arrive; ``send_targets`` sends nothing
on a connection before they did, nor when they do not fit the configured channels and kinds, nor after
they changed from the ones the link armed with (docs/serial-protocol.md, section 6a). A v1 controller
never answers; ``command_problem()`` then says to flash v2 firmware.

Ports: device paths (``/dev/ttyUSB0``, ``/dev/ttyACM0``, ``/dev/serial/by-id/...``, ptys) and any
pyserial URL handler (``loop://``, ``socket://host:port``, ``rfc2217://...``).

The state the threads share (newest telemetry, round trips, counters, ``LinkStats``) is
edge.io.link_state; this module owns the port, the reader thread and reconnection.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import serial

from edge.errors import ConfigError, InputError, LinkError
from edge.io.link_state import CapabilitiesReceived, LinkState, LinkStats
from edge.io.protocol import (
    KINDS,
    MAX_CHANNELS,
    POSITION,
    VELOCITY,
    Capabilities,
    ClearEmergencyStop,
    EmergencyStop,
    FrameDecoder,
    GetCapabilities,
    Message,
    MessageType,
    SequenceCounter,
    SetTargets,
    Telemetry,
    encode,
)
from edge.io.serial_port import describe_port, open_port
from edge.ratelimit import RateLimitedWarnings
from edge.validation import check_backoff, check_bool, check_range, check_text

__all__ = ["LinkStats", "MotorLinkConfig", "SentCommand", "SerialMotorLink"]

logger = logging.getLogger(__name__)

# The reader blocks at most this long per read, which bounds how quickly it notices disconnect().
_READ_TIMEOUT_S = 0.05
_READ_CHUNK_BYTES = 4096
_WARN_INTERVAL_S = 5.0
_JOIN_TIMEOUT_S = 2.0
# Consecutive write timeouts before the port is closed and reopened: three 10 Hz ticks, the controller's
# watchdog span. One timeout under load (issue 13, finding 19) keeps the port.
_WRITE_TIMEOUTS_BEFORE_REOPEN = 3
_CAPABILITIES_RETRY_S = 0.1  # GetCapabilities repeated until the answer arrives (section 6a, rule 13)

# --- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotorLinkConfig:
    """Where the motor controller is and how to treat a link that stalls or vanishes."""

    port: str  # /dev/serial/by-id/... (survives replugging), /dev/ttyUSB0, or a pyserial URL
    baudrate: int = 1_000_000  # must match a real UART's controller firmware; USB CDC and ptys ignore it
    write_timeout_ms: float = 20.0  # a write that blocks longer marks the link down (the tick never stalls)
    telemetry_stale_after_s: float = 0.15  # older telemetry stops the robot: 7 samples of the suggested 50 Hz
    reconnect_backoff_s: tuple[float, float] = (0.1, 2.0)  # (first, longest) wait between reopen attempts
    exclusive: bool = True  # flock the device so a second process cannot interleave frames
    low_latency: bool = True  # ASYNC_LOW_LATENCY on FTDI-style adapters: 1 ms instead of 16 ms latency timer
    hangup_on_close: bool = True  # closing drops DTR/RTS (HUPCL); False keeps them up (docs/deployment.md)
    channels: int = 2  # targets per SetTargets (wheels, joints, a gripper)
    # Command kind per channel, "velocity" (normalised [-1, 1]) or "position" (the channel's unit, within
    # the limits the controller announces); empty: every channel velocity. Wiring sets it from the bundle.
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_text("motor.port", self.port,
                   "a serial device path (e.g. /dev/serial/by-id/usb-...) or a pyserial URL")
        check_range("motor.baudrate", self.baudrate, 300, 12_000_000, integer=True)
        check_range("motor.write_timeout_ms", self.write_timeout_ms, 0, 1000, unit="ms", low_open=True)
        check_range("motor.telemetry_stale_after_s", self.telemetry_stale_after_s, 0, 60, unit="s", low_open=True)
        # YAML gives a list; the frozen config keeps a tuple.
        object.__setattr__(self, "reconnect_backoff_s",
                           check_backoff("motor.reconnect_backoff_s", self.reconnect_backoff_s))
        for key in ("exclusive", "low_latency", "hangup_on_close"):
            check_bool(f"motor.{key}", getattr(self, key))
        check_range("motor.channels", self.channels, 1, MAX_CHANNELS, integer=True)
        kinds = tuple(self.kinds) if self.kinds else (VELOCITY,) * self.channels
        if len(kinds) != self.channels or any(kind not in KINDS for kind in kinds):
            raise ConfigError(f"motor.kinds={list(kinds)!r}: expected {self.channels} entries (motor.channels), "
                              f"each one of {', '.join(KINDS)}")
        object.__setattr__(self, "kinds", kinds)

    @property
    def is_url(self) -> bool:
        return "://" in self.port


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentCommand:
    """What a send call actually put on the wire (or tried to)."""

    kind: MessageType
    seq: int
    targets: tuple[float, ...]  # as encoded (clipped to their kind's range, float32-rounded); () for others
    sent_at_s: float  # time.monotonic() (or the injected clock) when the write finished or failed
    delivered: bool  # False: the link was down or the write failed; nothing reached the controller


# --- the link ----------------------------------------------------------------------------------------


class SerialMotorLink:
    """Serial link to the motor controller: ``connect()``, ``send_targets()``, ``latest_telemetry()``."""

    def __init__(
        self,
        config: MotorLinkConfig,
        serial_factory: Callable[..., Any] = serial.serial_for_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._factory = serial_factory
        self._clock = clock
        # Seq 1 first: telemetry says last_command_seq 0 "before the first" host frame, which must never
        # confirm one (docs/serial-protocol.md, section 5).
        self._seq = SequenceCounter(start=1)
        # Guards _port, _up, _flush_next and writes: a write never overlaps a close or another write.
        self._io_lock = threading.Lock()
        self._port: Any = None
        self._up = False
        self._flush_next = False
        self._write_timeouts = 0  # consecutive write timeouts on this port
        self._connected = False
        self._stop = threading.Event()
        self._reconnect_now = threading.Event()  # a failed write asks the reader to reopen the port
        self._thread: threading.Thread | None = None
        # Telemetry, round trips and counters: written by the reader thread and the sender, read by anyone.
        self._state = LinkState()
        self._warn = RateLimitedWarnings(logger, _WARN_INTERVAL_S)
        self._warn_frames = RateLimitedWarnings(logger, _WARN_INTERVAL_S)

    # lifecycle -----------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Open the port (raises LinkError with what to check) and start the reader thread."""
        if self._connected:
            raise LinkError(f"motor link {self.config.port} is already connected")
        if self._thread is not None and self._thread.is_alive():
            raise LinkError(
                f"motor link {self.config.port}: the reader thread of an earlier connection has not exited "
                "(stuck in the serial driver); restart the process"
            )
        port = open_port(self.config, self._factory, _READ_TIMEOUT_S)
        self._stop.clear()
        self._state.new_connection()
        self._install(port)
        self._thread = threading.Thread(target=self._run, name=f"motor-link:{self.config.port}", daemon=True)
        self._thread.start()
        self._connected = True
        logger.info("motor link connected on %s", describe_port(self.config.port, port))

    @property
    def is_connected(self) -> bool:
        """True while the port is open and working; False before connect, after disconnect and while down."""
        return self._connected and self._up

    def disconnect(self) -> None:
        """Stop the reader thread and close the port. Idempotent. Sends nothing: stopping is the caller's."""
        if self._thread is None and not self._connected:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                logger.error("motor link %s: reader thread did not exit within %.1f s", self.config.port,
                             _JOIN_TIMEOUT_S)
            else:
                self._thread = None
        self._close_port("disconnect")
        self._connected = False
        stats, round_trip_s = self.stats, self.last_round_trip_s
        logger.info(
            "motor link %s disconnected: %d commands sent, %d telemetry frames, %d bad frames, "
            "%d reconnects, last round trip %s",
            self.config.port, stats.commands_sent, stats.telemetry_frames, stats.bad_frames,
            stats.reconnects,
            "n/a" if round_trip_s is None else f"{round_trip_s * 1e3:.1f} ms",
        )

    def __enter__(self) -> SerialMotorLink:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    # commands (caller's thread) ------------------------------------------------------------------------
    def send_targets(self, targets: Sequence[float] | np.ndarray) -> SentCommand:
        """Send one SetTargets, each channel of its ``config.kinds`` kind; returns what was sent.

        Never raises for link trouble (see ``delivered``). Velocities are clipped to [-1, 1], positions
        to the limits the controller announced. Held back (not delivered, counted in
        ``stats.held_commands``) while ``command_problem()`` names a reason. Raises InputError for a
        wrong channel count or a non-finite target: the safety layer upstream must never produce one,
        and sending "something else" instead would hide that bug.
        """
        values = self._clean_targets(targets)
        capabilities = self._state.capabilities  # read once: the reader thread may forget them meanwhile
        problem = self.command_problem() if self.is_connected else None  # down: undelivered, as any frame
        if problem is not None or (self.is_connected and capabilities is None):
            self._state.count("held_commands")
            self._warn("motor link %s: command not sent: %s", self.config.port, problem or "no capabilities")
            return SentCommand(kind=MessageType.SET_TARGETS, seq=self._seq.peek(), targets=values,
                               sent_at_s=self._clock(), delivered=False)
        values = self._clip_positions(values, capabilities)
        seq = self._seq.next()
        message = SetTargets(seq=seq, targets=values, kinds=self.config.kinds)
        return self._send(message, MessageType.SET_TARGETS, seq, values)

    def emergency_stop(self) -> SentCommand:
        """Send EmergencyStop. The controller latches it; repeat until telemetry shows ESTOP_LATCHED."""
        seq = self._seq.next()
        return self._send(EmergencyStop(seq=seq), MessageType.EMERGENCY_STOP, seq, ())

    def clear_emergency_stop(self) -> SentCommand:
        """Release the controller's latch; the motors stay stopped until the next SetTargets."""
        seq = self._seq.next()
        return self._send(ClearEmergencyStop(seq=seq), MessageType.CLEAR_EMERGENCY_STOP, seq, ())

    def stop_targets(self) -> np.ndarray:
        """Targets that stop every channel: 0 for a velocity one, its measured position for a position one
        (never position 0); InputError when a position channel has no measured position yet."""
        telemetry, _ = self.latest_telemetry()
        positions = telemetry.positions if telemetry is not None else ()
        if POSITION in self.config.kinds and len(positions) != self.config.channels:
            raise InputError("no measured positions yet: a position channel cannot be held where it is")
        return np.array([p if k == POSITION else 0.0 for k, p in zip(self.config.kinds, positions or
                         (0.0,) * self.config.channels)], np.float32)

    def request_capabilities(self) -> SentCommand:
        """Send GetCapabilities (the reader thread does so on its own at every (re)connect)."""
        seq = self._seq.next()
        return self._send(GetCapabilities(seq=seq), MessageType.GET_CAPABILITIES, seq, ())

    def _clean_targets(self, targets: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        channels = self.config.channels
        try:
            array = np.asarray(targets, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"targets must be {channels} numbers, got {targets!r}") from None
        if array.shape != (channels,):
            raise InputError(f"targets must have shape ({channels},) (motor.channels), got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise InputError(f"targets must be finite, got {array.tolist()}; the safety layer's "
                             "NaN guard should have replaced them")
        velocity = np.array([kind == VELOCITY for kind in self.config.kinds])
        # Clip before rounding: float32 rounding cannot leave [-1, 1], so what is returned is what is sent.
        array = np.where(velocity, np.clip(array, -1.0, 1.0), array)
        return tuple(float(v) for v in array.astype(np.float32))

    def _clip_positions(self, values: tuple[float, ...], capabilities: Capabilities | None) -> tuple[float, ...]:
        if capabilities is None:
            return values
        clipped = []
        for value, kind, channel in zip(values, self.config.kinds, capabilities.channels):
            if kind == POSITION:
                # Limits are float32 on the wire, so the clipped value is exactly representable.
                value = min(max(value, channel.position_min), channel.position_max)
            clipped.append(value)
        return tuple(clipped)

    def _send(self, message: Message, kind: MessageType, seq: int, targets: tuple[float, ...]) -> SentCommand:
        frame = encode(message)
        with self._io_lock:
            port, up = self._port, self._up
            if port is None or not up:
                delivered = False
                reason = "link down"
            else:
                data = b"\x00" + frame if self._flush_next else frame
                try:
                    port.write(data)
                except serial.SerialTimeoutException as exc:
                    # The line is slow or the host starved (shared CPU), not gone: keep the port (reopening
                    # can toggle DTR and reset the board) unless it persists for a watchdog span. A part of
                    # the frame may be out: the next write starts with a 0x00 that ends it.
                    self._flush_next = True
                    self._write_timeouts += 1
                    delivered = False
                    reason = f"write timed out ({self._write_timeouts} in a row): {exc}"
                    if self._write_timeouts >= _WRITE_TIMEOUTS_BEFORE_REOPEN:
                        self._up = False
                        self._reconnect_now.set()
                except (serial.SerialException, OSError) as exc:
                    self._up = False
                    # Set under the lock, so it can only refer to this port (_install clears it).
                    self._reconnect_now.set()
                    delivered = False
                    reason = f"write failed: {exc}"
                else:
                    self._flush_next = False
                    self._write_timeouts = 0
                    delivered = True
                    reason = ""
        sent_at_s = self._clock()
        if delivered:
            self._state.sent(seq, sent_at_s)
        elif reason == "link down":
            self._state.count("undelivered")
        else:
            self._state.count("write_failures")
        if not delivered:
            if reason != "link down" and not self.is_connected:
                self._warn("motor link %s: %s; link down, reconnecting (the controller's watchdog stops "
                           "the motors)", self.config.port, reason)
            elif reason != "link down":
                self._warn("motor link %s: %s; the port stays open (reopened after %d in a row)",
                           self.config.port, reason, _WRITE_TIMEOUTS_BEFORE_REOPEN)
            else:
                logger.debug("motor link %s down: %s seq %d not sent", self.config.port, kind.name, seq)
        return SentCommand(kind=kind, seq=seq, targets=targets, sent_at_s=sent_at_s, delivered=delivered)

    # telemetry (any thread) ----------------------------------------------------------------------------
    def latest_telemetry(self) -> tuple[Telemetry | None, float]:
        """The newest valid Telemetry and its receive time on the link's clock; (None, -inf) before one."""
        return self._state.latest()

    @property
    def capabilities(self) -> Capabilities | None:
        """The controller's Capabilities on this connection; None until they arrived."""
        return self._state.capabilities

    def command_problem(self) -> str | None:
        """Why SetTargets are held back now (no Capabilities yet, a v1 controller, a mismatch), or None."""
        return self._state.command_problem(self.config.channels, self.config.kinds)

    def wait_for_capabilities(self, timeout_s: float) -> Capabilities | None:
        """This connection's Capabilities, waiting up to ``timeout_s``; None when they did not arrive."""
        self._state.capabilities_arrived.wait(timeout_s)
        return self._state.capabilities

    def take_status_flags(self):
        """Status flags of every telemetry sample since the previous call (OR-ed): a flag shown only
        between two ticks is not missed."""
        return self._state.take_status_flags()

    def telemetry_age_s(self, now: float | None = None) -> float:
        """Seconds since the newest telemetry arrived; inf before the first."""
        if now is None:
            now = self._clock()
        return self._state.age_s(now)

    def has_fresh_telemetry(self, now: float | None = None) -> bool:
        return self.telemetry_age_s(now) <= self.config.telemetry_stale_after_s

    def is_confirmed(self, command: SentCommand) -> bool:
        """True once telemetry received after ``command`` echoes its seq (or a later one)."""
        return command.delivered and self._state.echoes(command.seq, command.sent_at_s)

    @property
    def last_round_trip_s(self) -> float | None:
        """From a command's send time to the first telemetry echoing its seq; None until one is measured."""
        return self._state.last_round_trip_s

    round_trip_quantiles_s = property(lambda self: self._state.round_trip_quantiles_s())  # p50/p99, LinkState

    stats = property(lambda self: self._state.stats)  # LinkStats of this link (LinkState's account)

    # reader thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._supervise()
        except Exception:  # the thread must not die silently: the loop sees the link down and stale data
            logger.exception("motor link %s: reader thread crashed; the link stays down", self.config.port)
            with self._io_lock:
                self._up = False

    def _supervise(self) -> None:
        first_s, longest_s = self.config.reconnect_backoff_s
        backoff_s = first_s
        while not self._stop.is_set():
            with self._io_lock:
                port = self._port
            if port is None:
                try:
                    port = open_port(self.config, self._factory, _READ_TIMEOUT_S, reconnecting=True)
                except LinkError as exc:
                    self._state.count("open_failures")
                    self._warn("motor link %s still down (%s); next try in %.2f s", self.config.port, exc,
                               backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(2.0 * backoff_s, longest_s)
                    continue
                self._state.new_connection(reconnect=True)
                self._install(port)
                backoff_s = first_s
                logger.warning("motor link %s reconnected on %s", self.config.port, describe_port(self.config.port, port))
            reason = self._pump(port)
            self._close_port(reason)
            if reason != "stopped":
                self._state.count("disconnects")
                self._warn("motor link %s down: %s; reconnecting every %.2f-%.2f s", self.config.port,
                           reason, first_s, longest_s)
                # A vanished device often needs a moment to re-enumerate; the first try is not immediate.
                self._stop.wait(first_s)

    def _pump(self, port: Any) -> str:
        """Read and decode until the port fails, a write failed, or disconnect(); returns why it ended."""
        decoder = FrameDecoder()
        self._state.attach_decoder(decoder)
        seen = decoder.stats
        asked_at_s = -math.inf
        while not self._stop.is_set():
            if self._reconnect_now.is_set():
                self._reconnect_now.clear()
                return "a write failed"
            if self._state.capabilities is None and time.monotonic() - asked_at_s >= _CAPABILITIES_RETRY_S:
                asked_at_s = time.monotonic()
                self.request_capabilities()
            try:
                data = port.read(min(max(1, port.in_waiting), _READ_CHUNK_BYTES))
            except (serial.SerialException, OSError) as exc:
                return f"read failed: {exc}"
            if not data:
                continue
            messages = decoder.feed(data)
            now = self._clock()
            stats = decoder.stats
            self._handle(messages, now, len(data))
            if stats.rejected != seen.rejected:
                if decoder.peer_version is not None:
                    self._state.note_peer_version(decoder.peer_version)
                self._warn_frames(
                    "motor link %s: dropped %d bad frame(s) (last: %s); the link keeps running",
                    self.config.port, stats.rejected - seen.rejected, decoder.last_error,
                )
                seen = stats
        return "stopped"

    def _handle(self, messages: list[Message], now: float, n_bytes: int) -> None:
        for event in self._state.receive(messages, now, n_bytes):
            if isinstance(event, CapabilitiesReceived):
                if event.armed is not None:
                    logger.error("motor link %s: %s; no more commands are sent", self.config.port,
                                 self.command_problem())
                else:
                    logger.info("motor link %s: controller capabilities: %s", self.config.port,
                                event.capabilities.describe())
                continue
            logger.warning("motor link %s: controller restarted (its clock went back from %d to %d ms); an "
                           "emergency stop latch, if any, is gone; asking for its capabilities again",
                           self.config.port, event.previous_time_ms, event.time_ms)

    # port handling -------------------------------------------------------------------------------------
    def _install(self, port: Any) -> None:
        with self._io_lock:
            self._port = port
            self._up = True
            self._flush_next = True  # a leading 0x00 ends whatever partial frame the controller holds
            self._write_timeouts = 0
            self._reconnect_now.clear()

    def _close_port(self, reason: str) -> None:
        with self._io_lock:
            port, self._port, self._up = self._port, None, False
            if port is None:
                return
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:  # the device is already gone
                logger.debug("motor link %s: close after %s failed: %s", self.config.port, reason, exc)
        self._state.detach_decoder()
