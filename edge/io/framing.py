"""Framing of the serial protocol: what every frame has, whatever message it carries.

The byte-level specification is docs/serial-protocol.md. A frame on the wire is
``COBS(header + payload + crc16_be) + b"\\x00"``:

* header: ``<BBH`` = protocol version, message type, sequence number (little-endian u16, wraps);
* CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no xorout) over header + payload,
  appended big-endian;
* COBS removes every zero byte so that 0x00 only ever delimits frames, and a reader that joins a
  stream mid-frame or hits noise resynchronises at the next 0x00.

This module seals a payload into a frame and opens a frame back into (type, seq, payload), and keeps
the sequence numbers (sender counter, wrap-aware distance). What the payloads hold, the message types
and the streaming decoder are edge.io.protocol, which builds on it and re-exports its public names.
Pure functions; no threads besides the counter's lock, no I/O.
"""

from __future__ import annotations

import binascii
import operator
import struct
import threading

from cobs import cobs

from edge.errors import ProtocolError

PROTOCOL_VERSION: int = 2
SEQ_MODULUS: int = 1 << 16

_HEADER = struct.Struct("<BBH")  # version, message type, sequence number
_CRC = struct.Struct(">H")  # big-endian, so the CRC over header + payload + crc is 0
HEADER_BYTES: int = _HEADER.size
CRC_BYTES: int = _CRC.size
_MIN_RAW_BYTES = HEADER_BYTES + CRC_BYTES


# --- errors ----------------------------------------------------------------------------------------


class FramingError(ProtocolError):
    """The bytes between two delimiters are not a frame: bad COBS, too short or too long."""


class CrcError(ProtocolError):
    """The frame's CRC does not match its contents (line noise or a truncated frame)."""


class VersionMismatchError(ProtocolError):
    """The frame was written for another major protocol version (``version``, read after the CRC matched)."""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class PayloadError(ProtocolError):
    """The payload has the wrong length or carries a value the protocol refuses (NaN, out of range)."""


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no xorout (check 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


# --- frames ------------------------------------------------------------------------------------------


def seal(message_type: int, seq: int, payload: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """The wire frame of one payload: header, CRC, COBS and the trailing 0x00 delimiter.

    ``version`` other than PROTOCOL_VERSION only for a simulated controller of an older protocol."""
    raw = _HEADER.pack(version, message_type, check_seq(seq, "seq")) + payload
    raw += _CRC.pack(crc16_ccitt_false(raw))
    return cobs.encode(raw) + b"\x00"


def unseal(frame: bytes, max_encoded_bytes: int) -> tuple[int, int, bytes]:
    """(message type byte, seq, payload) of one frame given WITHOUT its 0x00 delimiter.

    Raises FramingError, CrcError or VersionMismatchError, whatever the bytes; the type byte and the
    payload are the caller's to check.
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise FramingError(f"a frame is bytes; got a {type(frame).__name__}")
    frame = bytes(frame)
    if not frame:
        raise FramingError("empty frame")
    if len(frame) > max_encoded_bytes:
        raise FramingError(f"frame of {len(frame)} bytes exceeds the {max_encoded_bytes}-byte maximum")
    if 0 in frame:
        raise FramingError("frame contains a 0x00 byte (pass one frame without its delimiter)")
    try:
        raw = cobs.decode(frame)
    except cobs.DecodeError as exc:
        raise FramingError(f"invalid COBS encoding: {exc}") from None
    if len(raw) < _MIN_RAW_BYTES:
        raise FramingError(f"frame of {len(raw)} bytes is shorter than header + CRC ({_MIN_RAW_BYTES})")
    body, (received_crc,) = raw[: -_CRC.size], _CRC.unpack(raw[-_CRC.size :])
    computed_crc = crc16_ccitt_false(body)
    if received_crc != computed_crc:
        raise CrcError(
            f"CRC mismatch: frame carries 0x{received_crc:04x}, contents give 0x{computed_crc:04x}"
        )
    # Checked only after the CRC, so line noise is reported as noise and not as a version problem.
    version, type_byte, seq = _HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"frame uses protocol version {version}, this runtime speaks version {PROTOCOL_VERSION}: "
            "update the motor controller firmware or the runtime so both speak the same version",
            version=version,
        )
    return type_byte, seq, body[_HEADER.size :]


# --- sequence numbers --------------------------------------------------------------------------------


class SequenceCounter:
    """Sender-side u16 sequence numbers; ``next()`` returns start, start+1, ... wrapping at 2**16.

    A lock makes it safe to share between the tick and, say, an e-stop path on another thread:
    two frames must never carry the same number.
    """

    def __init__(self, start: int = 0) -> None:
        self._next = check_seq(start, "start")
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            value = self._next
            self._next = (value + 1) % SEQ_MODULUS
            return value

    def peek(self) -> int:
        """The number the next call to ``next()`` returns."""
        with self._lock:
            return self._next


def seq_delta(a: int, b: int) -> int:
    """Signed wrap-aware distance from ``a`` to ``b`` in [-32768, 32767].

    ``seq_delta(65535, 0) == 1``; a delta > 1 between consecutive received frames means
    ``delta - 1`` frames were lost; a delta <= 0 means a duplicate, reordered or restarted sender.
    """
    a = check_seq(a, "a")
    b = check_seq(b, "b")
    return (b - a + SEQ_MODULUS // 2) % SEQ_MODULUS - SEQ_MODULUS // 2


def check_seq(value: object, name: str) -> int:
    """``value`` as a u16 sequence number; PayloadError naming ``name`` when it is not one."""
    try:
        seq = operator.index(value)  # rejects floats and strings, accepts numpy integers
    except TypeError:
        raise PayloadError(
            f"sequence number {name}={value!r} is a {type(value).__name__}; expected an int in 0..65535"
        ) from None
    if not 0 <= seq < SEQ_MODULUS:
        raise PayloadError(f"sequence number {name}={seq} is outside 0..65535 (u16)")
    return seq
