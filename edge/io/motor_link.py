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

Ports: device paths (``/dev/ttyUSB0``, ``/dev/ttyACM0``, ``/dev/serial/by-id/...``, ptys) and any
pyserial URL handler (``loop://``, ``socket://host:port``, ``rfc2217://...``).

The state the threads share (newest telemetry, round trips, counters, ``LinkStats``) is
edge.io.link_state; this module owns the port, the reader thread and reconnection.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import serial

from edge.errors import InputError, LinkError
from edge.io.link_state import LinkState, LinkStats
from edge.io.protocol import (
    MAX_CHANNELS,
    ClearEmergencyStop,
    EmergencyStop,
    FrameDecoder,
    Message,
    MessageType,
    SequenceCounter,
    SetVelocity,
    Telemetry,
    encode,
)
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

_MISSING_PORT_HINT = (
    "check the cable and that the adapter is listed in /dev/serial/by-id/ (`ls -l /dev/serial/by-id/`); "
    "put that stable by-id path in the config rather than /dev/ttyUSB* or /dev/ttyACM*, whose numbers "
    "change when devices re-enumerate (the udev rule in systemd/ can add a fixed name)"
)
_PERMISSION_HINT = (
    "the user running the runtime must be in the 'dialout' group to open serial devices "
    "(`sudo usermod -aG dialout $USER`, then log in again, or restart the systemd service)"
)


# --- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotorLinkConfig:
    """Where the motor controller is and how to treat a link that stalls or vanishes."""

    port: str  # /dev/serial/by-id/... (survives replugging), /dev/ttyUSB0, or a pyserial URL
    baudrate: int = 1_000_000  # must match a real UART's controller firmware; USB CDC and ptys ignore it
    write_timeout_ms: float = 20.0  # a write that blocks longer marks the link down (the tick never stalls)
    telemetry_stale_after_s: float = 0.3  # older telemetry is not fresh: three 10 Hz ticks, as the watchdog
    reconnect_backoff_s: tuple[float, float] = (0.1, 2.0)  # (first, longest) wait between reopen attempts
    exclusive: bool = True  # flock the device so a second process cannot interleave frames
    low_latency: bool = True  # ASYNC_LOW_LATENCY on FTDI-style adapters: 1 ms instead of 16 ms latency timer
    channels: int = 2  # velocity targets per SetVelocity (wheels or joints)

    def __post_init__(self) -> None:
        check_text("motor.port", self.port,
                   "a serial device path (e.g. /dev/serial/by-id/usb-...) or a pyserial URL")
        check_range("motor.baudrate", self.baudrate, 300, 12_000_000, integer=True)
        check_range("motor.write_timeout_ms", self.write_timeout_ms, 0, 1000, unit="ms", low_open=True)
        check_range("motor.telemetry_stale_after_s", self.telemetry_stale_after_s, 0, 60, unit="s", low_open=True)
        # YAML gives a list; the frozen config keeps a tuple.
        object.__setattr__(self, "reconnect_backoff_s",
                           check_backoff("motor.reconnect_backoff_s", self.reconnect_backoff_s))
        check_bool("motor.exclusive", self.exclusive)
        check_bool("motor.low_latency", self.low_latency)
        check_range("motor.channels", self.channels, 1, MAX_CHANNELS, integer=True)

    @property
    def is_url(self) -> bool:
        return "://" in self.port


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentCommand:
    """What a send call actually put on the wire (or tried to)."""

    kind: MessageType
    seq: int
    targets: tuple[float, ...]  # as encoded (clipped to [-1, 1], float32-rounded); () for the e-stop frames
    sent_at_s: float  # time.monotonic() (or the injected clock) when the write finished or failed
    delivered: bool  # False: the link was down or the write failed; nothing reached the controller


# --- the link ----------------------------------------------------------------------------------------


class SerialMotorLink:
    """Serial link to the motor controller: ``connect()``, ``send_velocity()``, ``latest_telemetry()``."""

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
        port = self._open()
        self._stop.clear()
        self._state.new_connection()
        self._install(port)
        self._thread = threading.Thread(target=self._run, name=f"motor-link:{self.config.port}", daemon=True)
        self._thread.start()
        self._connected = True
        logger.info("motor link connected on %s", self._describe(port))

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
    def send_velocity(self, targets: Sequence[float] | np.ndarray) -> SentCommand:
        """Send one SetVelocity; returns what was sent. Never raises for link trouble (see ``delivered``).

        Raises InputError for a wrong channel count or a non-finite target: the safety layer upstream
        must never produce one, and sending "something else" instead would hide that bug.
        """
        values = self._clean_targets(targets)
        seq = self._seq.next()
        return self._send(SetVelocity(seq=seq, targets=values), MessageType.SET_VELOCITY, seq, values)

    def emergency_stop(self) -> SentCommand:
        """Send EmergencyStop. The controller latches it; repeat until telemetry shows ESTOP_LATCHED."""
        seq = self._seq.next()
        return self._send(EmergencyStop(seq=seq), MessageType.EMERGENCY_STOP, seq, ())

    def clear_emergency_stop(self) -> SentCommand:
        """Release the controller's latch; the motors stay stopped until the next SetVelocity."""
        seq = self._seq.next()
        return self._send(ClearEmergencyStop(seq=seq), MessageType.CLEAR_EMERGENCY_STOP, seq, ())

    def _clean_targets(self, targets: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        try:
            array = np.asarray(targets, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"velocity targets must be {self.config.channels} numbers, got {targets!r}") from None
        if array.shape != (self.config.channels,):
            raise InputError(
                f"velocity targets must have shape ({self.config.channels},) "
                f"(motor.channels), got shape {array.shape}"
            )
        if not np.all(np.isfinite(array)):
            raise InputError(f"velocity targets must be finite, got {array.tolist()}; the safety layer's "
                             "NaN guard should have replaced them")
        # Clip before rounding: float32 rounding cannot leave [-1, 1], so what is returned is what is sent.
        rounded = np.clip(array, -1.0, 1.0).astype(np.float32)
        return tuple(float(v) for v in rounded)

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

    @property
    def stats(self) -> LinkStats:
        return self._state.stats

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
                    port = self._open(reconnecting=True)
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
                logger.warning("motor link %s reconnected on %s", self.config.port, self._describe(port))
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
        while not self._stop.is_set():
            if self._reconnect_now.is_set():
                self._reconnect_now.clear()
                return "a write failed"
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
                self._warn_frames(
                    "motor link %s: dropped %d bad frame(s) (last: %s); the link keeps running",
                    self.config.port, stats.rejected - seen.rejected, decoder.last_error,
                )
                seen = stats
        return "stopped"

    def _handle(self, messages: list[Message], now: float, n_bytes: int) -> None:
        for restart in self._state.receive(messages, now, n_bytes):
            logger.warning("motor link %s: controller restarted (its clock went back from %d to %d ms); an "
                           "emergency stop latch, if any, is gone", self.config.port, restart.previous_time_ms,
                           restart.time_ms)

    # port handling -------------------------------------------------------------------------------------
    def _open(self, reconnecting: bool = False) -> Any:
        config = self.config
        try:
            port = self._factory(
                config.port,
                baudrate=config.baudrate,
                timeout=_READ_TIMEOUT_S,
                write_timeout=config.write_timeout_ms / 1000.0,
                exclusive=config.exclusive,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(self._open_failure_message(exc)) from exc
        if config.low_latency:
            self._set_low_latency(port, reconnecting)
        return port

    def _set_low_latency(self, port: Any, reconnecting: bool) -> None:
        log = logger.debug if reconnecting else logger.info
        setter = getattr(port, "set_low_latency_mode", None)
        if setter is None:
            log("motor link %s: low-latency mode does not apply to %s", self.config.port, type(port).__name__)
            return
        try:
            setter(True)
        except (ValueError, OSError, NotImplementedError) as exc:
            # ptys, CDC-ACM and some adapters have no ASYNC_LOW_LATENCY; they do not need it either.
            log("motor link %s: low-latency mode not supported by this device (%s)", self.config.port, exc)
        else:
            logger.debug("motor link %s: low-latency mode on", self.config.port)

    def _open_failure_message(self, exc: BaseException) -> str:
        path = self.config.port
        code = getattr(exc, "errno", None)
        text = f"cannot open motor link port {path!r}: {exc}"
        if self.config.is_url:
            return f"{text}; check the URL and that the remote end is reachable"
        if code == errno.EACCES or code == errno.EPERM:
            return f"{text}; {_PERMISSION_HINT}"
        if code == errno.EWOULDBLOCK or "exclusively lock" in str(exc):
            return (f"{text}; another process holds the port (find it with `fuser -v {path}`) and must be "
                    "stopped: two writers would interleave frames")
        if code == errno.ENOENT or not os.path.exists(path):
            return f"{text}; the device {path} does not exist: {_MISSING_PORT_HINT}; {_PERMISSION_HINT}"
        return f"{text}; {_MISSING_PORT_HINT}; {_PERMISSION_HINT}"

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

    def _describe(self, port: Any) -> str:
        name = getattr(port, "name", None) or self.config.port
        if not self.config.is_url and os.path.islink(self.config.port):
            return f"{self.config.port} -> {os.path.realpath(self.config.port)}"
        return str(name)

