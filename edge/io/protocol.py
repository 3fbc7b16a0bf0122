"""Wire protocol between the runtime (host) and the motor controller: the messages.

The byte-level specification a firmware engineer implements from is docs/serial-protocol.md; this
module and edge.io.framing are its reference implementation, shared by the host link and the simulated
controller. A frame is ``COBS(header + payload + crc16_be) + b"\\x00"``; edge.io.framing seals and
opens frames (header, CRC, COBS) and numbers them, this module gives the payloads their meaning:

* message types and status flags;
* payload per message type, little-endian, exact length (see the ``_encode_*`` functions);
* ``encode``/``decode`` of whole frames, and the streaming ``FrameDecoder`` a reader thread owns.

The framing names (errors, CRC, sequence numbers, PROTOCOL_VERSION) are re-exported here, so callers
import every protocol name from this module. Pure functions and one small streaming decoder; no
threads, no I/O. ``decode`` raises only ProtocolError (or its subclasses) for any input, so one bad
frame never kills a loop.
"""

from __future__ import annotations

import enum
import logging
import math
import operator
import struct
from dataclasses import dataclass

from edge.errors import ProtocolError
from edge.io.framing import (
    CRC_BYTES,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    SEQ_MODULUS,
    CrcError,
    FramingError,
    PayloadError,
    SequenceCounter,
    VersionMismatchError,
    check_seq,
    crc16_ccitt_false,
    seal,
    seq_delta,
    unseal,
)

__all__ = [
    "MAX_CHANNELS",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "SEQ_MODULUS",
    "TELEMETRY_PERIOD_S",
    "WATCHDOG_TIMEOUT_S",
    "ClearEmergencyStop",
    "CrcError",
    "DecoderStats",
    "EmergencyStop",
    "FrameDecoder",
    "FramingError",
    "Message",
    "MessageType",
    "PayloadError",
    "SequenceCounter",
    "SetVelocity",
    "StatusFlags",
    "Telemetry",
    "UnknownMessageError",
    "VersionMismatchError",
    "crc16_ccitt_false",
    "decode",
    "encode",
    "seq_delta",
]

logger = logging.getLogger(__name__)

# The controller stops the motors after this long without a valid SetVelocity (see the doc).
WATCHDOG_TIMEOUT_S: float = 0.3
# Suggested controller telemetry period (50 Hz): five samples per 10 Hz control tick.
TELEMETRY_PERIOD_S: float = 0.02
# Wheel/joint channels per message; bounds every frame so the reader can bound its buffer.
MAX_CHANNELS: int = 8

_COUNT = struct.Struct("<B")
_FLOAT32 = struct.Struct("<f")
# controller_time_ms, status, last_command_seq, crc_errors, framing_errors, dropped_commands,
# velocity count, position count; followed by the float32 velocities, then the float32 positions.
_TELEMETRY_FIXED = struct.Struct("<IBHHHHBB")

_FLOAT32_MAX = 3.4028234663852886e38


class MessageType(enum.IntEnum):
    """Message type byte. The high bit marks controller-to-host messages."""

    SET_VELOCITY = 0x01
    EMERGENCY_STOP = 0x02
    CLEAR_EMERGENCY_STOP = 0x03
    TELEMETRY = 0x81


class StatusFlags(enum.IntFlag):
    """Controller status bits carried in Telemetry; bits 4..7 are reserved and sent as 0."""

    NONE = 0
    WATCHDOG_TRIPPED = 0x01  # no valid SetVelocity for WATCHDOG_TIMEOUT_S: motors stopped
    ESTOP_LATCHED = 0x02  # EmergencyStop received and not yet cleared: motors stopped
    FAULT = 0x04  # controller-detected fault (driver, over-current, ...): motors disabled
    MOTORS_ENABLED = 0x08  # motors are being driven towards the last applied targets


_STATUS_MASK = 0x0F


# --- errors (the framing ones are edge.io.framing's) ------------------------------------------------


class UnknownMessageError(ProtocolError):
    """The message type byte (or the object to encode) is not a message of this protocol."""


# --- messages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetVelocity:
    """Host to controller: velocity targets, normalised to [-1, 1], one per wheel/joint (1..8)."""

    seq: int
    targets: tuple[float, ...]

    def __post_init__(self) -> None:
        # Accept lists and numpy arrays but keep the message hashable and immutable.
        if not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))


@dataclass(frozen=True)
class EmergencyStop:
    """Host to controller: stop the motors and latch until ClearEmergencyStop."""

    seq: int


@dataclass(frozen=True)
class ClearEmergencyStop:
    """Host to controller: release a latched emergency stop; motors stay stopped until a SetVelocity."""

    seq: int


@dataclass(frozen=True)
class Telemetry:
    """Controller to host, sent periodically (suggested every TELEMETRY_PERIOD_S)."""

    seq: int
    controller_time_ms: int  # controller's monotonic milliseconds, wraps at 2**32
    velocities: tuple[float, ...]  # measured, in the same normalised units as SetVelocity targets
    positions: tuple[float, ...]  # radians, per channel (meaning defined by the robot config)
    status: StatusFlags
    last_command_seq: int  # seq of the last valid host frame received, applied or not
    crc_errors: int  # controller's receive counters, each wraps at 2**16
    framing_errors: int
    dropped_commands: int  # valid SetVelocity frames ignored (e-stop latched or fault)

    def __post_init__(self) -> None:
        if not isinstance(self.velocities, tuple):
            object.__setattr__(self, "velocities", tuple(self.velocities))
        if not isinstance(self.positions, tuple):
            object.__setattr__(self, "positions", tuple(self.positions))


Message = SetVelocity | EmergencyStop | ClearEmergencyStop | Telemetry

_TYPE_BY_CLASS = {
    SetVelocity: MessageType.SET_VELOCITY,
    EmergencyStop: MessageType.EMERGENCY_STOP,
    ClearEmergencyStop: MessageType.CLEAR_EMERGENCY_STOP,
    Telemetry: MessageType.TELEMETRY,
}


def _max_raw_frame_bytes() -> int:
    telemetry = _TELEMETRY_FIXED.size + 2 * MAX_CHANNELS * _FLOAT32.size
    set_velocity = _COUNT.size + MAX_CHANNELS * _FLOAT32.size
    return HEADER_BYTES + max(telemetry, set_velocity) + CRC_BYTES


_MAX_RAW_BYTES = _max_raw_frame_bytes()
# COBS adds one code byte per started run of 254 bytes; plus the 0x00 delimiter.
MAX_FRAME_BYTES: int = _MAX_RAW_BYTES + _MAX_RAW_BYTES // 254 + 1 + 1
_MAX_ENCODED_BYTES = MAX_FRAME_BYTES - 1  # without the delimiter


# --- encoding ----------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """Full wire frame for ``message``, including the trailing 0x00 delimiter.

    Raises PayloadError for values the protocol refuses to carry (NaN/Inf, targets outside
    [-1, 1], wrong channel count, integers outside their field) and UnknownMessageError for an
    object that is not a message.
    """
    message_type = _TYPE_BY_CLASS.get(type(message))
    if message_type is None:
        raise UnknownMessageError(
            f"cannot encode a {type(message).__name__}; expected one of "
            f"{', '.join(cls.__name__ for cls in _TYPE_BY_CLASS)}"
        )
    seq = check_seq(message.seq, "seq")
    if isinstance(message, SetVelocity):
        payload = _encode_set_velocity(message)
    elif isinstance(message, Telemetry):
        payload = _encode_telemetry(message)
    else:
        payload = b""
    return seal(message_type, seq, payload)


def _encode_set_velocity(message: SetVelocity) -> bytes:
    targets = _floats(message.targets, "SetVelocity.targets", min_count=1, limit=1.0)
    return _COUNT.pack(len(targets)) + b"".join(_FLOAT32.pack(v) for v in targets)


def _encode_telemetry(message: Telemetry) -> bytes:
    velocities = _floats(message.velocities, "Telemetry.velocities", min_count=0, limit=None)
    positions = _floats(message.positions, "Telemetry.positions", min_count=0, limit=None)
    status = _uint(message.status, "Telemetry.status", 0xFF)
    if status & ~_STATUS_MASK:
        raise PayloadError(f"Telemetry.status=0x{status:02x} sets reserved bits (allowed mask 0x0F)")
    fixed = _TELEMETRY_FIXED.pack(
        _uint(message.controller_time_ms, "Telemetry.controller_time_ms", 0xFFFFFFFF),
        status,
        check_seq(message.last_command_seq, "last_command_seq"),
        _uint(message.crc_errors, "Telemetry.crc_errors", 0xFFFF),
        _uint(message.framing_errors, "Telemetry.framing_errors", 0xFFFF),
        _uint(message.dropped_commands, "Telemetry.dropped_commands", 0xFFFF),
        len(velocities),
        len(positions),
    )
    return fixed + b"".join(_FLOAT32.pack(v) for v in velocities + positions)


def _uint(value: object, name: str, maximum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise PayloadError(f"{name}={value!r} is not an integer") from None
    if not 0 <= number <= maximum:
        raise PayloadError(f"{name}={number} is outside 0..{maximum}")
    return number


def _floats(values: tuple, name: str, *, min_count: int, limit: float | None) -> tuple[float, ...]:
    if not min_count <= len(values) <= MAX_CHANNELS:
        raise PayloadError(f"{name} has {len(values)} channels; expected {min_count}..{MAX_CHANNELS}")
    result = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise PayloadError(f"{name}[{index}]={value!r} is not a number") from None
        if not math.isfinite(number):
            # The safety layer must never produce NaN/Inf; refusing here keeps it off the wire.
            raise PayloadError(f"{name}[{index}]={number} is not finite")
        if limit is not None and not -limit <= number <= limit:
            raise PayloadError(f"{name}[{index}]={number} is outside [-{limit}, {limit}]")
        if abs(number) > _FLOAT32_MAX:
            raise PayloadError(f"{name}[{index}]={number} does not fit a float32")
        result.append(number)
    return tuple(result)


# --- decoding ----------------------------------------------------------------------------------------


def decode(frame: bytes) -> Message:
    """Message in one frame given WITHOUT its 0x00 delimiter.

    Raises only ProtocolError subclasses, whatever the bytes: FramingError, CrcError,
    VersionMismatchError, UnknownMessageError or PayloadError.
    """
    type_byte, seq, payload = unseal(frame, _MAX_ENCODED_BYTES)
    if type_byte == MessageType.SET_VELOCITY:
        return _decode_set_velocity(seq, payload)
    if type_byte == MessageType.TELEMETRY:
        return _decode_telemetry(seq, payload)
    if type_byte == MessageType.EMERGENCY_STOP:
        _expect_length(payload, 0, "EmergencyStop")
        return EmergencyStop(seq=seq)
    if type_byte == MessageType.CLEAR_EMERGENCY_STOP:
        _expect_length(payload, 0, "ClearEmergencyStop")
        return ClearEmergencyStop(seq=seq)
    raise UnknownMessageError(f"unknown message type 0x{type_byte:02x} (seq {seq})")


def _expect_length(payload: bytes, expected: int, name: str) -> None:
    if len(payload) != expected:
        raise PayloadError(f"{name} payload is {len(payload)} bytes; expected {expected}")


def _unpack_floats(payload: bytes, offset: int, count: int, name: str) -> tuple[float, ...]:
    values = tuple(v for (v,) in _FLOAT32.iter_unpack(payload[offset : offset + count * _FLOAT32.size]))
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise PayloadError(f"{name}[{index}] is {value}; the protocol carries finite values only")
    return values


def _decode_set_velocity(seq: int, payload: bytes) -> SetVelocity:
    if not payload:
        raise PayloadError("SetVelocity payload is empty; expected a channel count")
    count = payload[0]
    if not 1 <= count <= MAX_CHANNELS:
        raise PayloadError(f"SetVelocity has {count} channels; expected 1..{MAX_CHANNELS}")
    _expect_length(payload, _COUNT.size + count * _FLOAT32.size, "SetVelocity")
    targets = _unpack_floats(payload, _COUNT.size, count, "SetVelocity.targets")
    for index, value in enumerate(targets):
        if not -1.0 <= value <= 1.0:
            raise PayloadError(f"SetVelocity.targets[{index}]={value} is outside [-1, 1]")
    return SetVelocity(seq=seq, targets=targets)


def _decode_telemetry(seq: int, payload: bytes) -> Telemetry:
    if len(payload) < _TELEMETRY_FIXED.size:
        raise PayloadError(
            f"Telemetry payload is {len(payload)} bytes; expected at least {_TELEMETRY_FIXED.size}"
        )
    (time_ms, status, last_seq, crc_errors, framing_errors, dropped, n_vel, n_pos) = (
        _TELEMETRY_FIXED.unpack_from(payload)
    )
    if n_vel > MAX_CHANNELS or n_pos > MAX_CHANNELS:
        raise PayloadError(
            f"Telemetry has {n_vel} velocities and {n_pos} positions; at most {MAX_CHANNELS} each"
        )
    _expect_length(payload, _TELEMETRY_FIXED.size + (n_vel + n_pos) * _FLOAT32.size, "Telemetry")
    if status & ~_STATUS_MASK:
        raise PayloadError(f"Telemetry status 0x{status:02x} sets reserved bits (allowed mask 0x0F)")
    offset = _TELEMETRY_FIXED.size
    velocities = _unpack_floats(payload, offset, n_vel, "Telemetry.velocities")
    positions = _unpack_floats(payload, offset + n_vel * _FLOAT32.size, n_pos, "Telemetry.positions")
    return Telemetry(
        seq=seq,
        controller_time_ms=time_ms,
        velocities=velocities,
        positions=positions,
        status=StatusFlags(status),
        last_command_seq=last_seq,
        crc_errors=crc_errors,
        framing_errors=framing_errors,
        dropped_commands=dropped,
    )


# --- streaming ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderStats:
    """Counters of a FrameDecoder since it was created. Each rejected frame counts once."""

    frames: int = 0  # valid messages returned
    crc_errors: int = 0
    framing_errors: int = 0  # bad COBS, too short (oversized frames are counted apart)
    oversized: int = 0  # frames longer than MAX_FRAME_BYTES, dropped while they streamed in
    version_errors: int = 0
    unknown_messages: int = 0
    payload_errors: int = 0

    @property
    def rejected(self) -> int:
        return (
            self.crc_errors
            + self.framing_errors
            + self.oversized
            + self.version_errors
            + self.unknown_messages
            + self.payload_errors
        )


_STATS_FIELD_BY_ERROR = (
    (CrcError, "crc_errors"),
    (VersionMismatchError, "version_errors"),
    (UnknownMessageError, "unknown_messages"),
    (PayloadError, "payload_errors"),
    (FramingError, "framing_errors"),
)


class FrameDecoder:
    """Streaming reader: ``feed`` arbitrary chunks of the byte stream, get the messages completed.

    Bad frames are counted and skipped, never raised: the stream resynchronises at the next 0x00.
    A frame that grows past MAX_FRAME_BYTES is dropped as it streams in, so memory stays bounded
    however long a run of noise without zeros is. Empty frames (0x00 0x00) are not errors: a sender
    may emit a leading 0x00 to flush whatever noise preceded it.
    Not thread-safe: one reader thread owns it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized frame; skip until the next delimiter
        self._counts = {name: 0 for name in DecoderStats.__dataclass_fields__}
        self.last_error: ProtocolError | None = None

    @property
    def stats(self) -> DecoderStats:
        return DecoderStats(**self._counts)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held until its delimiter arrives (at most MAX_FRAME_BYTES - 1)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        messages: list[Message] = []
        data = bytes(data)
        start = 0
        while True:
            end = data.find(0, start)
            if end < 0:
                self._append(data, start, len(data))
                return messages
            self._append(data, start, end)
            self._complete_frame(messages)
            start = end + 1

    def _append(self, data: bytes, start: int, end: int) -> None:
        if self._discarding or start == end:
            return
        if len(self._buffer) + (end - start) > _MAX_ENCODED_BYTES:
            self._buffer.clear()
            self._discarding = True
            self._counts["oversized"] += 1
            self.last_error = FramingError(
                f"frame longer than {_MAX_ENCODED_BYTES} bytes without a delimiter; dropped"
            )
            logger.debug("%s", self.last_error)
            return
        self._buffer += data[start:end]

    def _complete_frame(self, messages: list[Message]) -> None:
        if self._discarding:
            self._discarding = False  # the oversized frame ends here; it was counted when it overflowed
            return
        if not self._buffer:
            return  # empty frame: a flushing delimiter, see the class docstring
        frame = bytes(self._buffer)
        self._buffer.clear()
        try:
            message = decode(frame)
        except ProtocolError as exc:
            self.last_error = exc
            for error_type, field in _STATS_FIELD_BY_ERROR:
                if isinstance(exc, error_type):
                    self._counts[field] += 1
                    break
            else:
                self._counts["framing_errors"] += 1
            logger.debug("dropped frame of %d bytes: %s", len(frame), exc)
            return
        self._counts["frames"] += 1
        messages.append(message)
