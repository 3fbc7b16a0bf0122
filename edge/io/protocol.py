"""Wire protocol between the runtime (host) and the motor controller, version 2.

The byte-level specification a firmware engineer implements from is docs/serial-protocol.md; this
package of three modules is its reference implementation, shared by the host link and the simulated
controller. A frame is ``COBS(header + payload + crc16_be) + b"\\x00"``:

* edge.io.framing seals and opens frames (header, CRC, COBS) and numbers them;
* edge.io.messages gives the payloads their meaning: message types, status flags, fault codes,
  command kinds, ``encode``/``decode`` of whole frames;
* this module re-exports both and adds the streaming ``FrameDecoder`` a reader thread owns.

Callers import every protocol name from here. Pure functions and one small streaming decoder; no
threads, no I/O. ``decode`` raises only ProtocolError (or its subclasses) for any input, so one bad
frame never kills a loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge.errors import ProtocolError
from edge.io.framing import (
    PROTOCOL_VERSION,
    SEQ_MODULUS,
    CrcError,
    FramingError,
    PayloadError,
    SequenceCounter,
    VersionMismatchError,
    crc16_ccitt_false,
    seq_delta,
)
from edge.io.messages import (
    KINDS,
    MAX_CHANNELS,
    MAX_ENCODED_BYTES,
    MAX_FRAME_BYTES,
    POSITION,
    REJECTION_COUNTERS,
    TELEMETRY_PERIOD_S,
    VELOCITY,
    WATCHDOG_TIMEOUT_S,
    Capabilities,
    ChannelCapability,
    ClearEmergencyStop,
    EmergencyStop,
    FaultCode,
    GetCapabilities,
    Message,
    MessageType,
    SetTargets,
    StatusFlags,
    TargetRangeError,
    Telemetry,
    UnknownMessageError,
    decode,
    encode,
    fault_name,
)

__all__ = [
    "KINDS",
    "MAX_CHANNELS",
    "MAX_FRAME_BYTES",
    "POSITION",
    "PROTOCOL_VERSION",
    "REJECTION_COUNTERS",
    "SEQ_MODULUS",
    "TELEMETRY_PERIOD_S",
    "VELOCITY",
    "WATCHDOG_TIMEOUT_S",
    "Capabilities",
    "ChannelCapability",
    "ClearEmergencyStop",
    "CrcError",
    "DecoderStats",
    "EmergencyStop",
    "FaultCode",
    "FrameDecoder",
    "FramingError",
    "GetCapabilities",
    "Message",
    "MessageType",
    "PayloadError",
    "SequenceCounter",
    "SetTargets",
    "StatusFlags",
    "TargetRangeError",
    "Telemetry",
    "UnknownMessageError",
    "VersionMismatchError",
    "crc16_ccitt_false",
    "decode",
    "encode",
    "fault_name",
    "seq_delta",
]

logger = logging.getLogger(__name__)
_MAX_ENCODED_BYTES = MAX_ENCODED_BYTES


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
    range_errors: int = 0  # SetTargets with a non-finite target or a velocity outside [-1, 1]

    @property
    def rejected(self) -> int:
        return (
            self.crc_errors
            + self.framing_errors
            + self.oversized
            + self.version_errors
            + self.unknown_messages
            + self.payload_errors
            + self.range_errors
        )


_STATS_FIELD_BY_ERROR = (
    (CrcError, "crc_errors"),
    (VersionMismatchError, "version_errors"),
    (UnknownMessageError, "unknown_messages"),
    (TargetRangeError, "range_errors"),
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
        # The version byte of the last frame dropped for its version (its CRC matched, so the byte is
        # what the peer sent): a v1 controller is recognised by it (docs/serial-protocol.md, section 8).
        self.peer_version: int | None = None

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
            if isinstance(exc, VersionMismatchError):
                self.peer_version = exc.version
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
