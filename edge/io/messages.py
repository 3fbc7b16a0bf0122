"""Messages of the serial protocol (v2): what each payload holds, and encode/decode of whole frames.

The byte-level specification is docs/serial-protocol.md, section 4. edge.io.framing seals and opens
frames (header, CRC, COBS, sequence numbers); this module gives the payloads their meaning. Callers
import these names from edge.io.protocol, which adds the streaming decoder. Pure functions; no
threads, no I/O. ``decode`` raises only ProtocolError subclasses, whatever the bytes.
"""

from __future__ import annotations

import enum
import math
import operator
import struct
from dataclasses import dataclass

from edge.errors import ProtocolError
from edge.io.framing import CRC_BYTES, HEADER_BYTES, PROTOCOL_VERSION, PayloadError, check_seq, seal, unseal

# The controller stops the motors after this long without a valid SetTargets (reference firmware).
WATCHDOG_TIMEOUT_S: float = 0.3
# Suggested controller telemetry period (50 Hz): five samples per 10 Hz control tick.
TELEMETRY_PERIOD_S: float = 0.02
# Channels per message; bounds every frame so the reader can bound its buffer.
MAX_CHANNELS: int = 8

VELOCITY = "velocity"  # normalised speed in [-1, 1]
POSITION = "position"  # absolute position in the channel's unit, within its announced limits
KINDS = (VELOCITY, POSITION)
# Capabilities' per-channel kinds byte.
_KIND_BITS = {VELOCITY: 0x01, POSITION: 0x02}

_COUNT = struct.Struct("<B")
_FLOAT32 = struct.Struct("<f")
_SET_TARGETS_FIXED = struct.Struct("<BB")  # channel count, position mask
# protocol major, minor, firmware major, minor, patch, channel count, watchdog ms, telemetry period ms
_CAPABILITIES_FIXED = struct.Struct("<BBBBBBHH")
_CHANNEL_CAPABILITY = struct.Struct("<Bff")  # kinds, position_min, position_max
# controller_time_ms, status, fault_code, last_command_seq, the seven rejection counters, n_vel, n_pos;
# followed by the float32 velocities, then the float32 positions.
_TELEMETRY_FIXED = struct.Struct("<IBBH7HBB")
_FLOAT32_MAX = 3.4028234663852886e38

# Telemetry's per-reason rejection counters, in wire order (section 4).
REJECTION_COUNTERS = ("rejected_crc", "rejected_framing", "rejected_channel_count", "rejected_kind",
                      "rejected_range", "rejected_estop", "rejected_fault")


class MessageType(enum.IntEnum):
    """Message type byte. The high bit marks controller-to-host messages."""

    SET_TARGETS = 0x01
    EMERGENCY_STOP = 0x02
    CLEAR_EMERGENCY_STOP = 0x03
    GET_CAPABILITIES = 0x04
    TELEMETRY = 0x81
    CAPABILITIES = 0x82


class StatusFlags(enum.IntFlag):
    """Controller status bits carried in Telemetry; bits 4..7 are reserved and sent as 0."""

    NONE = 0
    WATCHDOG_TRIPPED = 0x01  # no valid SetTargets for the watchdog timeout: motors stopped
    ESTOP_LATCHED = 0x02  # EmergencyStop received and not yet cleared: motors stopped
    FAULT = 0x04  # controller-detected fault, fault_code says which: motors disabled
    MOTORS_ENABLED = 0x08  # motors are being driven towards the last applied targets


_STATUS_MASK = 0x0F


class FaultCode(enum.IntEnum):
    """Telemetry's fault_code (section 4's table); 0 exactly when FAULT is clear."""

    NONE = 0x00
    DRIVER = 0x01
    OVER_CURRENT = 0x02
    OVER_TEMPERATURE = 0x03
    UNDER_VOLTAGE = 0x04
    ENCODER = 0x05
    POSITION_LIMIT = 0x06
    FOLLOWING_ERROR = 0x07
    INTERNAL = 0x08


_VENDOR_FAULTS = 0x80


def fault_name(code: int) -> str:
    """The name the host shows for a fault code: the table's, VENDOR_0xNN or UNKNOWN_0xNN."""
    try:
        return FaultCode(code).name
    except ValueError:
        prefix = "VENDOR" if code >= _VENDOR_FAULTS else "UNKNOWN"
        return f"{prefix}_0x{code:02x}"


class UnknownMessageError(ProtocolError):
    """The message type byte (or the object to encode) is not a message of this protocol."""


class TargetRangeError(PayloadError):
    """A SetTargets target is not finite or a velocity is outside [-1, 1] (a controller's rejected_range)."""


# --- messages ----------------------------------------------------------------------------------------


def _as_tuple(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, tuple):
        object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True)
class SetTargets:
    """Host to controller: one target per channel (1..8), each a velocity or a position (``kinds``).

    ``kinds`` defaults to all velocity; a velocity target is normalised to [-1, 1], a position target
    is in the channel's unit within the limits its Capabilities announced.
    """

    seq: int
    targets: tuple[float, ...]
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _as_tuple(self, "targets")
        _as_tuple(self, "kinds")
        if not self.kinds:
            object.__setattr__(self, "kinds", (VELOCITY,) * len(self.targets))


@dataclass(frozen=True)
class EmergencyStop:
    """Host to controller: stop the motors and latch until ClearEmergencyStop."""

    seq: int


@dataclass(frozen=True)
class ClearEmergencyStop:
    """Host to controller: release a latched emergency stop; motors stay stopped until a SetTargets."""

    seq: int


@dataclass(frozen=True)
class GetCapabilities:
    """Host to controller: answer with Capabilities (at connect, after a reconnect or a restart)."""

    seq: int


@dataclass(frozen=True)
class ChannelCapability:
    """What one channel accepts: its kinds and, for the position kind, its limits in its own unit."""

    kinds: tuple[str, ...]
    position_min: float = 0.0
    position_max: float = 0.0

    def __post_init__(self) -> None:
        _as_tuple(self, "kinds")

    def supports(self, kind: str) -> bool:
        return kind in self.kinds


@dataclass(frozen=True)
class Capabilities:
    """Controller to host, in reply to GetCapabilities: what the controller is and accepts."""

    seq: int
    firmware_version: tuple[int, int, int]
    channels: tuple[ChannelCapability, ...]
    watchdog_timeout_ms: int
    telemetry_period_ms: int
    protocol_minor: int = 0

    def __post_init__(self) -> None:
        _as_tuple(self, "firmware_version")
        _as_tuple(self, "channels")

    @property
    def channel_count(self) -> int:
        return len(self.channels)

    def describe(self) -> str:
        """One line for logs and doctor."""
        major, minor, patch = self.firmware_version
        kinds = ", ".join(
            "+".join(c.kinds) + (f" [{c.position_min:g}, {c.position_max:g}]" if c.supports(POSITION) else "")
            for c in self.channels
        )
        return (f"firmware {major}.{minor}.{patch}, protocol {PROTOCOL_VERSION}.{self.protocol_minor}, "
                f"{self.channel_count} channels ({kinds}), watchdog {self.watchdog_timeout_ms} ms, "
                f"telemetry every {self.telemetry_period_ms} ms")


@dataclass(frozen=True)
class Telemetry:
    """Controller to host, sent periodically (suggested every TELEMETRY_PERIOD_S)."""

    seq: int
    controller_time_ms: int  # controller's monotonic milliseconds, wraps at 2**32
    velocities: tuple[float, ...]  # measured, normalised as velocity targets, every channel
    positions: tuple[float, ...]  # measured, in each channel's unit
    status: StatusFlags
    last_command_seq: int  # seq of the last valid host frame received, applied or not
    fault_code: int = FaultCode.NONE  # 0 exactly when FAULT is clear
    # The controller's per-reason rejection counters (REJECTION_COUNTERS), each wraps at 2**16.
    rejected_crc: int = 0
    rejected_framing: int = 0
    rejected_channel_count: int = 0
    rejected_kind: int = 0
    rejected_range: int = 0
    rejected_estop: int = 0  # valid SetTargets ignored while latched
    rejected_fault: int = 0  # valid SetTargets ignored while FAULT

    def __post_init__(self) -> None:
        _as_tuple(self, "velocities")
        _as_tuple(self, "positions")

    @property
    def rejections(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in REJECTION_COUNTERS}


Message = SetTargets | EmergencyStop | ClearEmergencyStop | GetCapabilities | Telemetry | Capabilities

_TYPE_BY_CLASS = {
    SetTargets: MessageType.SET_TARGETS,
    EmergencyStop: MessageType.EMERGENCY_STOP,
    ClearEmergencyStop: MessageType.CLEAR_EMERGENCY_STOP,
    GetCapabilities: MessageType.GET_CAPABILITIES,
    Telemetry: MessageType.TELEMETRY,
    Capabilities: MessageType.CAPABILITIES,
}
_EMPTY = {MessageType.EMERGENCY_STOP: EmergencyStop, MessageType.CLEAR_EMERGENCY_STOP: ClearEmergencyStop,
          MessageType.GET_CAPABILITIES: GetCapabilities}


def _max_raw_frame_bytes() -> int:
    telemetry = _TELEMETRY_FIXED.size + 2 * MAX_CHANNELS * _FLOAT32.size
    set_targets = _SET_TARGETS_FIXED.size + MAX_CHANNELS * _FLOAT32.size
    capabilities = _CAPABILITIES_FIXED.size + MAX_CHANNELS * _CHANNEL_CAPABILITY.size
    return HEADER_BYTES + max(telemetry, set_targets, capabilities) + CRC_BYTES


_MAX_RAW_BYTES = _max_raw_frame_bytes()
# COBS adds one code byte per started run of 254 bytes; plus the 0x00 delimiter.
MAX_FRAME_BYTES: int = _MAX_RAW_BYTES + _MAX_RAW_BYTES // 254 + 1 + 1
MAX_ENCODED_BYTES = MAX_FRAME_BYTES - 1  # without the delimiter


# --- encoding ----------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """Full wire frame for ``message``, including the trailing 0x00 delimiter.

    Raises PayloadError for values the protocol refuses to carry (NaN/Inf, a velocity outside
    [-1, 1], an unknown kind, a wrong channel count, integers outside their field) and
    UnknownMessageError for an object that is not a message.
    """
    message_type = _TYPE_BY_CLASS.get(type(message))
    if message_type is None:
        raise UnknownMessageError(
            f"cannot encode a {type(message).__name__}; expected one of "
            f"{', '.join(cls.__name__ for cls in _TYPE_BY_CLASS)}"
        )
    seq = check_seq(message.seq, "seq")
    if isinstance(message, SetTargets):
        payload = _encode_set_targets(message)
    elif isinstance(message, Telemetry):
        payload = _encode_telemetry(message)
    elif isinstance(message, Capabilities):
        payload = _encode_capabilities(message)
    else:
        payload = b""
    return seal(message_type, seq, payload)


def _encode_set_targets(message: SetTargets) -> bytes:
    targets = _floats(message.targets, "SetTargets.targets", min_count=1, limit=None)
    if len(message.kinds) != len(targets):
        raise PayloadError(f"SetTargets has {len(targets)} targets but {len(message.kinds)} kinds")
    mask = 0
    for index, (kind, value) in enumerate(zip(message.kinds, targets)):
        if kind not in KINDS:
            raise PayloadError(f"SetTargets.kinds[{index}]={kind!r}; expected one of {', '.join(KINDS)}")
        if kind == POSITION:
            mask |= 1 << index
        elif not -1.0 <= value <= 1.0:
            raise PayloadError(f"SetTargets.targets[{index}]={value} is a velocity outside [-1, 1]")
    return _SET_TARGETS_FIXED.pack(len(targets), mask) + b"".join(_FLOAT32.pack(v) for v in targets)


def _encode_capabilities(message: Capabilities) -> bytes:
    channels = message.channels
    if not 1 <= len(channels) <= MAX_CHANNELS:
        raise PayloadError(f"Capabilities has {len(channels)} channels; expected 1..{MAX_CHANNELS}")
    if len(message.firmware_version) != 3:
        raise PayloadError(f"Capabilities.firmware_version={message.firmware_version!r}; expected 3 numbers")
    firmware = [_uint(v, f"Capabilities.firmware_version[{i}]", 0xFF)
                for i, v in enumerate(message.firmware_version)]
    fixed = _CAPABILITIES_FIXED.pack(
        PROTOCOL_VERSION,
        _uint(message.protocol_minor, "Capabilities.protocol_minor", 0xFF),
        *firmware,
        len(channels),
        _uint(message.watchdog_timeout_ms, "Capabilities.watchdog_timeout_ms", 0xFFFF, minimum=1),
        _uint(message.telemetry_period_ms, "Capabilities.telemetry_period_ms", 0xFFFF, minimum=1),
    )
    parts = [fixed]
    for index, channel in enumerate(channels):
        name = f"Capabilities.channels[{index}]"
        if not channel.kinds or any(kind not in KINDS for kind in channel.kinds):
            raise PayloadError(f"{name}.kinds={channel.kinds!r}; expected one or both of {', '.join(KINDS)}")
        low, high = _floats((channel.position_min, channel.position_max), f"{name}.limits", min_count=2,
                            limit=None)
        if low > high:
            raise PayloadError(f"{name}: position_min {low} is above position_max {high}")
        bits = sum(_KIND_BITS[kind] for kind in set(channel.kinds))
        parts.append(_CHANNEL_CAPABILITY.pack(bits, low, high))
    return b"".join(parts)


def _encode_telemetry(message: Telemetry) -> bytes:
    velocities = _floats(message.velocities, "Telemetry.velocities", min_count=0, limit=None)
    positions = _floats(message.positions, "Telemetry.positions", min_count=0, limit=None)
    status = _uint(message.status, "Telemetry.status", 0xFF)
    if status & ~_STATUS_MASK:
        raise PayloadError(f"Telemetry.status=0x{status:02x} sets reserved bits (allowed mask 0x0F)")
    fault_code = _uint(message.fault_code, "Telemetry.fault_code", 0xFF)
    _check_fault_code(status, fault_code)
    fixed = _TELEMETRY_FIXED.pack(
        _uint(message.controller_time_ms, "Telemetry.controller_time_ms", 0xFFFFFFFF),
        status,
        fault_code,
        check_seq(message.last_command_seq, "last_command_seq"),
        *(_uint(getattr(message, name), f"Telemetry.{name}", 0xFFFF) for name in REJECTION_COUNTERS),
        len(velocities),
        len(positions),
    )
    return fixed + b"".join(_FLOAT32.pack(v) for v in velocities + positions)


def _check_fault_code(status: int, fault_code: int) -> None:
    faulted = bool(status & StatusFlags.FAULT)
    if faulted != (fault_code != FaultCode.NONE):
        raise PayloadError(
            f"Telemetry fault_code 0x{fault_code:02x} with FAULT {'set' if faulted else 'clear'}: the code is "
            "0 exactly when FAULT is clear"
        )


def _uint(value: object, name: str, maximum: int, minimum: int = 0) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise PayloadError(f"{name}={value!r} is not an integer") from None
    if not minimum <= number <= maximum:
        raise PayloadError(f"{name}={number} is outside {minimum}..{maximum}")
    return number


def _floats(values: tuple, name: str, *, min_count: int, limit: float | None) -> tuple[float, ...]:
    if not min_count <= len(values) <= MAX_CHANNELS:
        raise PayloadError(f"{name} has {len(values)} values; expected {min_count}..{MAX_CHANNELS}")
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
    type_byte, seq, payload = unseal(frame, MAX_ENCODED_BYTES)
    if type_byte == MessageType.SET_TARGETS:
        return _decode_set_targets(seq, payload)
    if type_byte == MessageType.TELEMETRY:
        return _decode_telemetry(seq, payload)
    if type_byte == MessageType.CAPABILITIES:
        return _decode_capabilities(seq, payload)
    empty = _EMPTY.get(type_byte)
    if empty is not None:
        _expect_length(payload, 0, empty.__name__)
        return empty(seq=seq)
    raise UnknownMessageError(f"unknown message type 0x{type_byte:02x} (seq {seq})")


def _expect_length(payload: bytes, expected: int, name: str) -> None:
    if len(payload) != expected:
        raise PayloadError(f"{name} payload is {len(payload)} bytes; expected {expected}")


def _expect_at_least(payload: bytes, fixed: struct.Struct, name: str) -> None:
    if len(payload) < fixed.size:
        raise PayloadError(f"{name} payload is {len(payload)} bytes; expected at least {fixed.size}")


def _unpack_floats(payload: bytes, offset: int, count: int, name: str,
                   error: type[PayloadError] = PayloadError) -> tuple[float, ...]:
    values = tuple(v for (v,) in _FLOAT32.iter_unpack(payload[offset : offset + count * _FLOAT32.size]))
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise error(f"{name}[{index}] is {value}; the protocol carries finite values only")
    return values


def _decode_set_targets(seq: int, payload: bytes) -> SetTargets:
    _expect_at_least(payload, _SET_TARGETS_FIXED, "SetTargets")
    count, mask = _SET_TARGETS_FIXED.unpack_from(payload)
    if not 1 <= count <= MAX_CHANNELS:
        raise PayloadError(f"SetTargets has {count} channels; expected 1..{MAX_CHANNELS}")
    _expect_length(payload, _SET_TARGETS_FIXED.size + count * _FLOAT32.size, "SetTargets")
    if mask >> count:
        raise PayloadError(f"SetTargets position mask 0x{mask:02x} marks channels beyond its {count}")
    targets = _unpack_floats(payload, _SET_TARGETS_FIXED.size, count, "SetTargets.targets", TargetRangeError)
    kinds = tuple(POSITION if mask >> k & 1 else VELOCITY for k in range(count))
    for index, (kind, value) in enumerate(zip(kinds, targets)):
        if kind == VELOCITY and not -1.0 <= value <= 1.0:
            raise TargetRangeError(f"SetTargets.targets[{index}]={value} is a velocity outside [-1, 1]")
    return SetTargets(seq=seq, targets=targets, kinds=kinds)


def _decode_capabilities(seq: int, payload: bytes) -> Capabilities:
    _expect_at_least(payload, _CAPABILITIES_FIXED, "Capabilities")
    major, minor, fw_major, fw_minor, fw_patch, count, watchdog_ms, period_ms = (
        _CAPABILITIES_FIXED.unpack_from(payload))
    if major != PROTOCOL_VERSION:
        raise PayloadError(f"Capabilities announce protocol {major} in a version-{PROTOCOL_VERSION} frame")
    if not 1 <= count <= MAX_CHANNELS:
        raise PayloadError(f"Capabilities has {count} channels; expected 1..{MAX_CHANNELS}")
    _expect_length(payload, _CAPABILITIES_FIXED.size + count * _CHANNEL_CAPABILITY.size, "Capabilities")
    if watchdog_ms == 0 or period_ms == 0:
        raise PayloadError(f"Capabilities watchdog {watchdog_ms} ms / telemetry period {period_ms} ms; "
                           "both must be at least 1")
    channels = []
    for index, (bits, low, high) in enumerate(
            _CHANNEL_CAPABILITY.iter_unpack(payload[_CAPABILITIES_FIXED.size:])):
        if bits == 0 or bits & ~0x03:
            raise PayloadError(f"Capabilities channel {index} kinds 0x{bits:02x}; expected 0x01, 0x02 or 0x03")
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise PayloadError(f"Capabilities channel {index} position limits [{low}, {high}] are not a range")
        kinds = tuple(kind for kind in KINDS if bits & _KIND_BITS[kind])
        channels.append(ChannelCapability(kinds=kinds, position_min=low, position_max=high))
    return Capabilities(seq=seq, firmware_version=(fw_major, fw_minor, fw_patch), channels=tuple(channels),
                        watchdog_timeout_ms=watchdog_ms, telemetry_period_ms=period_ms, protocol_minor=minor)


def _decode_telemetry(seq: int, payload: bytes) -> Telemetry:
    _expect_at_least(payload, _TELEMETRY_FIXED, "Telemetry")
    time_ms, status, fault_code, last_seq, *counters = _TELEMETRY_FIXED.unpack_from(payload)
    *rejections, n_vel, n_pos = counters
    if n_vel > MAX_CHANNELS or n_pos > MAX_CHANNELS:
        raise PayloadError(
            f"Telemetry has {n_vel} velocities and {n_pos} positions; at most {MAX_CHANNELS} each"
        )
    _expect_length(payload, _TELEMETRY_FIXED.size + (n_vel + n_pos) * _FLOAT32.size, "Telemetry")
    if status & ~_STATUS_MASK:
        raise PayloadError(f"Telemetry status 0x{status:02x} sets reserved bits (allowed mask 0x0F)")
    _check_fault_code(status, fault_code)
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
        fault_code=fault_code,
        **dict(zip(REJECTION_COUNTERS, rejections)),
    )
