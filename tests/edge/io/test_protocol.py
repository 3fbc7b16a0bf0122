"""Tests of the serial protocol v2 (edge/io/protocol.py) against its specification (docs/serial-protocol.md)."""

from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import pytest
from cobs import cobs

from edge.errors import ProtocolError
from edge.io import protocol
from edge.io.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    REJECTION_COUNTERS,
    WATCHDOG_TIMEOUT_S,
    Capabilities,
    ChannelCapability,
    ClearEmergencyStop,
    CrcError,
    EmergencyStop,
    FaultCode,
    FrameDecoder,
    FramingError,
    GetCapabilities,
    PayloadError,
    SequenceCounter,
    SetTargets,
    StatusFlags,
    TargetRangeError,
    Telemetry,
    UnknownMessageError,
    VersionMismatchError,
    decode,
    encode,
    fault_name,
    seq_delta,
)

DOC = Path(__file__).resolve().parents[3] / "docs" / "serial-protocol.md"
V, P = "velocity", "position"

# Worked example of the doc, derived by hand: header 02 01 02 01, n=2, position mask 0b10, 0.5 and 1.25
# as f32 LE, CRC 0x6F50 big-endian, then COBS runs [02 01 02 01 02 02] [] [] [3f] [] [a0 3f 6f 50] and the
# delimiter.
EXAMPLE_MESSAGE = SetTargets(seq=0x0102, targets=(0.5, 1.25), kinds=(V, P))
EXAMPLE_FRAME_HEX = "07 02 01 02 01 02 02 01 01 02 3f 01 05 a0 3f 6f 50 00"


def bitwise_crc16_ccitt_false(data: bytes) -> int:
    """Independent textbook implementation, so the tests do not trust binascii blindly."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def frame_from_body(body: bytes) -> bytes:
    """Encoded frame (no delimiter) for an arbitrary body with a correct CRC."""
    return cobs.encode(body + struct.pack(">H", bitwise_crc16_ccitt_false(body)))


def telemetry(seq=1, time_ms=0, velocities=(), positions=(), status=StatusFlags.NONE, last=0, fault_code=0,
              **rejections) -> Telemetry:
    return Telemetry(seq=seq, controller_time_ms=time_ms, velocities=velocities, positions=positions,
                     status=status, last_command_seq=last, fault_code=fault_code, **rejections)


def full_telemetry(seq: int = 65535) -> Telemetry:
    return telemetry(
        seq=seq,
        time_ms=2**32 - 1,
        velocities=(1.5, -1.25, 0.0, -0.0, 2.0**-10, 2.0, -3.5, 0.125),
        positions=(3.140625, -6.25, 1000.5, -0.5, 0.0, 1.0, 2.0, 4.0),
        status=StatusFlags.ESTOP_LATCHED | StatusFlags.FAULT,
        last=65535,
        fault_code=0xFF,
        **{name: 65535 - i for i, name in enumerate(REJECTION_COUNTERS)},
    )


def arm_capabilities(seq: int = 4) -> Capabilities:
    """Seven position joints and a gripper with both kinds: the largest Capabilities frame."""
    joints = tuple(ChannelCapability((P,), -2.5 - i, 2.5 + i) for i in range(7))
    return Capabilities(seq=seq, firmware_version=(1, 4, 255), channels=joints + (ChannelCapability((V, P), 0.0, 0.0625),),
                        watchdog_timeout_ms=300, telemetry_period_ms=20, protocol_minor=3)


# Float values chosen to be exact in float32 so round trips compare equal.
ROUND_TRIP_MESSAGES = [
    SetTargets(seq=0, targets=(0.0,)),
    SetTargets(seq=1, targets=(1.0, -1.0)),
    SetTargets(seq=65535, targets=(0.5, -0.25, 0.125, -0.0625, 1.0, -1.0, 0.75, 0.0)),
    # Position channels: any finite value in the channel's unit (limits are the controller's to check).
    SetTargets(seq=2, targets=(2.5, -1000.0, 0.0625), kinds=(P, P, P)),
    SetTargets(seq=3, targets=(0.25, 3.5, -1.0, 1e6, 0.5, -0.5, 0.75, 0.0), kinds=(V, P, V, P, P, V, P, V)),
    EmergencyStop(seq=0),
    EmergencyStop(seq=0xFF00),
    ClearEmergencyStop(seq=12345),
    GetCapabilities(seq=7),
    Capabilities(seq=9, firmware_version=(2, 0, 0), channels=(ChannelCapability((V,)), ChannelCapability((V,))),
                 watchdog_timeout_ms=300, telemetry_period_ms=20),
    Capabilities(seq=10, firmware_version=(0, 0, 1), channels=(ChannelCapability((P,), -1.5, -1.5),),
                 watchdog_timeout_ms=65535, telemetry_period_ms=1),
    arm_capabilities(),
    telemetry(seq=0),
    telemetry(seq=300, time_ms=123456, velocities=(0.25, -0.5), positions=(1.5,), status=StatusFlags.MOTORS_ENABLED,
              last=299, rejected_crc=3, rejected_framing=4, rejected_estop=5),
    telemetry(seq=301, status=StatusFlags.FAULT, fault_code=FaultCode.OVER_CURRENT, rejected_fault=9),
    full_telemetry(),
]


def test_constants_match_the_specification():
    assert PROTOCOL_VERSION == 2
    assert WATCHDOG_TIMEOUT_S == 0.3
    assert MAX_FRAME_BYTES == 96  # doc section 2: 4 + 24 + 64 + 2 = 94, +1 COBS, +1 delimiter
    assert [int(flag) for flag in StatusFlags if flag] == [0x01, 0x02, 0x04, 0x08]
    assert REJECTION_COUNTERS == ("rejected_crc", "rejected_framing", "rejected_channel_count", "rejected_kind",
                                  "rejected_range", "rejected_estop", "rejected_fault")


def test_fault_codes_match_the_documented_table():
    doc = DOC.read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| 0x([0-9A-F]{2}) \| ([A-Z_]+) \|", doc, flags=re.MULTILINE))
    assert {int(code, 16): name for code, name in table.items()} == {int(c): c.name for c in FaultCode}
    assert fault_name(2) == "OVER_CURRENT"
    assert fault_name(0x09) == "UNKNOWN_0x09"
    assert fault_name(0x85) == "VENDOR_0x85"


def test_crc_check_value_and_residue():
    assert protocol.crc16_ccitt_false(b"123456789") == 0x29B1
    assert bitwise_crc16_ccitt_false(b"123456789") == 0x29B1
    for data in (b"", b"\x00", b"\xff" * 7, bytes(range(256))):
        crc = protocol.crc16_ccitt_false(data)
        assert crc == bitwise_crc16_ccitt_false(data)
        # Big-endian CRC appended: the CRC over body + CRC is zero (doc section 2).
        assert protocol.crc16_ccitt_false(data + struct.pack(">H", crc)) == 0


def test_known_answer_frame_matches_the_doc_example():
    frame = bytes.fromhex(EXAMPLE_FRAME_HEX)
    assert encode(EXAMPLE_MESSAGE) == frame
    assert decode(frame[:-1]) == EXAMPLE_MESSAGE
    doc = DOC.read_text(encoding="utf-8")
    assert EXAMPLE_FRAME_HEX in doc
    # The doc's other examples must also be what the code sends.
    assert encode(EmergencyStop(seq=5)).hex(" ") in doc
    assert encode(ClearEmergencyStop(seq=6)).hex(" ") in doc
    assert encode(GetCapabilities(seq=7)).hex(" ") in doc


def test_telemetry_body_layout_byte_by_byte():
    message = telemetry(seq=7, time_ms=0x01020304, velocities=(0.5,), positions=(1.0, -2.0),
                        status=StatusFlags.FAULT, last=0x0A0B, fault_code=FaultCode.ENCODER,
                        **{name: i + 1 for i, name in enumerate(REJECTION_COUNTERS)})
    expected_body = bytes.fromhex(
        "02 81 07 00"  # version, type, seq LE
        "04 03 02 01"  # controller_time_ms LE
        "04 05"  # status, fault_code
        "0b 0a"  # last_command_seq
        "01 00 02 00 03 00 04 00 05 00 06 00 07 00"  # crc, framing, channel count, kind, range, estop, fault
        "01 02"  # n_vel, n_pos
        "00 00 00 3f"  # 0.5
        "00 00 80 3f 00 00 00 c0"  # 1.0, -2.0
    )
    frame = encode(message)
    assert frame.endswith(b"\x00") and 0 not in frame[:-1]
    raw = cobs.decode(frame[:-1])
    assert raw[:-2] == expected_body
    assert raw[-2:] == struct.pack(">H", bitwise_crc16_ccitt_false(expected_body))


def test_capabilities_body_layout_byte_by_byte():
    message = Capabilities(seq=1, firmware_version=(3, 2, 1),
                           channels=(ChannelCapability((V,)), ChannelCapability((P,), -1.0, 2.0),
                                     ChannelCapability((V, P), 0.0, 0.5)),
                           watchdog_timeout_ms=300, telemetry_period_ms=20, protocol_minor=0)
    expected_body = bytes.fromhex(
        "02 82 01 00"  # version, type, seq LE
        "02 00 03 02 01 03"  # protocol major, minor, firmware major, minor, patch, n
        "2c 01 14 00"  # watchdog 300 ms, telemetry 20 ms
        "01 00 00 00 00 00 00 00 00"  # velocity only; limits 0
        "02 00 00 80 bf 00 00 00 40"  # position, -1.0, 2.0
        "03 00 00 00 00 00 00 00 3f"  # both, 0.0, 0.5
    )
    assert cobs.decode(encode(message)[:-1])[:-2] == expected_body


def test_set_targets_position_mask_layout():
    raw = cobs.decode(encode(SetTargets(seq=1, targets=(0.0, 0.0, 0.0), kinds=(P, V, P)))[:-1])
    assert raw[4:6] == bytes([3, 0b101])  # n, mask: channels 0 and 2 are positions


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    frame = encode(message)
    assert len(frame) <= MAX_FRAME_BYTES
    decoded = decode(frame[:-1])
    assert decoded == message
    assert type(decoded) is type(message)
    # Accepts any bytes-like frame.
    assert decode(bytearray(frame[:-1])) == message
    assert decode(memoryview(frame[:-1])) == message


def test_decoded_fields_have_wire_types():
    decoded = decode(encode(full_telemetry())[:-1])
    assert isinstance(decoded.status, StatusFlags)
    assert decoded.status == StatusFlags.ESTOP_LATCHED | StatusFlags.FAULT
    assert isinstance(decoded.velocities, tuple) and all(type(v) is float for v in decoded.velocities)
    assert decoded.rejections == {name: 65535 - i for i, name in enumerate(REJECTION_COUNTERS)}
    assert len(encode(full_telemetry())) == MAX_FRAME_BYTES  # the bound is tight
    capabilities = decode(encode(arm_capabilities())[:-1])
    assert capabilities.channel_count == 8 and capabilities.channels[7].supports(P)
    assert not capabilities.channels[0].supports(V)


def test_floats_travel_as_float32_and_lists_are_accepted():
    message = SetTargets(seq=3, targets=[0.1, -0.7])  # a list becomes a tuple
    assert message.targets == (0.1, -0.7) and message.kinds == (V, V)
    decoded = decode(encode(message)[:-1])
    expected = tuple(struct.unpack("<2f", struct.pack("<2f", 0.1, -0.7)))
    assert decoded.targets == expected
    assert decoded.targets != message.targets  # really float32 on the wire


def caps(**overrides) -> Capabilities:
    fields = dict(seq=1, firmware_version=(1, 0, 0), channels=(ChannelCapability((V,)),), watchdog_timeout_ms=300,
                  telemetry_period_ms=20)
    fields.update(overrides)
    return Capabilities(**fields)


@pytest.mark.parametrize(
    "message",
    [
        SetTargets(seq=0, targets=(float("nan"),)),
        SetTargets(seq=0, targets=(0.0, float("inf"))),
        SetTargets(seq=0, targets=(float("-inf"),), kinds=(P,)),
        SetTargets(seq=0, targets=(1.0000001,)),
        SetTargets(seq=0, targets=(-1.5,)),
        SetTargets(seq=0, targets=(1e39,), kinds=(P,)),  # beyond float32
        SetTargets(seq=0, targets=()),
        SetTargets(seq=0, targets=(0.0,) * 9),
        SetTargets(seq=0, targets=("fast",)),
        SetTargets(seq=0, targets=(0.0, 0.0), kinds=(V,)),  # a kind per target
        SetTargets(seq=0, targets=(0.0,), kinds=("effort",)),
        SetTargets(seq=-1, targets=(0.0,)),
        SetTargets(seq=65536, targets=(0.0,)),
        EmergencyStop(seq=1.0),
        ClearEmergencyStop(seq="1"),
        GetCapabilities(seq=-3),
        caps(channels=()),
        caps(channels=(ChannelCapability((V,)),) * 9),
        caps(channels=(ChannelCapability(()),)),
        caps(channels=(ChannelCapability(("torque",)),)),
        caps(channels=(ChannelCapability((P,), 1.0, -1.0),)),  # min above max
        caps(channels=(ChannelCapability((P,), float("nan"), 1.0),)),
        caps(firmware_version=(1, 0)),
        caps(firmware_version=(256, 0, 0)),
        caps(watchdog_timeout_ms=0),
        caps(telemetry_period_ms=65536),
        caps(protocol_minor=-1),
        telemetry(velocities=(float("nan"),)),
        telemetry(positions=(float("inf"),)),
        telemetry(positions=(1e39,)),  # beyond float32
        telemetry(velocities=(0.0,) * 9),
        telemetry(status=0x10),  # reserved status bit
        telemetry(status=StatusFlags.FAULT),  # FAULT without a code
        telemetry(fault_code=FaultCode.DRIVER),  # a code without FAULT
        telemetry(status=StatusFlags.FAULT, fault_code=256),
        telemetry(time_ms=2**32),
        telemetry(last=65536),
        telemetry(rejected_crc=65536),
        telemetry(rejected_kind=-1),
        telemetry(rejected_fault=70000),
    ],
)
def test_encode_refuses_values_the_protocol_does_not_carry(message):
    with pytest.raises(PayloadError):
        encode(message)


def test_encode_refuses_objects_that_are_not_messages():
    with pytest.raises(UnknownMessageError, match="SetTargets"):
        encode(("SetTargets", 0, (0.0,)))


def _set_targets_body(seq: int, floats_le: bytes, count: int, mask: int = 0, version: int = PROTOCOL_VERSION) -> bytes:
    return struct.pack("<BBHBB", version, 0x01, seq, count, mask) + floats_le


def _capabilities_body(count: int, channels: bytes, major: int = PROTOCOL_VERSION, watchdog: int = 300,
                       period: int = 20) -> bytes:
    return struct.pack("<BBHBBBBBBHH", PROTOCOL_VERSION, 0x82, 9, major, 0, 1, 0, 0, count, watchdog, period) + channels


_TELEMETRY = "<BBHIBBH7HBB"


def _telemetry_body(status=0, fault=0, n_vel=0, n_pos=0, floats=b"") -> bytes:
    return struct.pack(_TELEMETRY, PROTOCOL_VERSION, 0x81, 9, 0, status, fault, 0, *[0] * 7, n_vel, n_pos) + floats


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"", FramingError),
        (b"\x05\x01", FramingError),  # COBS code promises more bytes than there are
        (b"\x02\x01\x00\x01", FramingError),  # a delimiter inside the frame
        (cobs.encode(b"\x01\x02\x03\x04\x05"), FramingError),  # shorter than header + CRC
        (b"\x01" * (MAX_FRAME_BYTES), FramingError),  # longer than any frame
        (encode(EXAMPLE_MESSAGE)[:-2], FramingError),  # truncated: COBS run incomplete
        (frame_from_body(struct.pack("<BBH", 2, 0x7F, 9)), UnknownMessageError),
        (frame_from_body(struct.pack("<BBH", 2, 0x00, 9)), UnknownMessageError),
        (frame_from_body(struct.pack("<BBH", 2, 0x05, 9)), UnknownMessageError),
        (frame_from_body(struct.pack("<BBH", 2, 0x02, 9) + b"\x00"), PayloadError),  # e-stop with payload
        (frame_from_body(struct.pack("<BBH", 2, 0x03, 9) + b"\x01"), PayloadError),
        (frame_from_body(struct.pack("<BBH", 2, 0x04, 9) + b"\x01"), PayloadError),  # GetCapabilities
        (frame_from_body(struct.pack("<BBH", 2, 0x01, 9) + b"\x01"), PayloadError),  # no mask byte
        (frame_from_body(_set_targets_body(9, b"", 0)), PayloadError),  # zero channels
        (frame_from_body(_set_targets_body(9, struct.pack("<9f", *[0.0] * 9), 9)), PayloadError),
        (frame_from_body(_set_targets_body(9, struct.pack("<f", 0.0), 2)), PayloadError),  # short
        (frame_from_body(_set_targets_body(9, struct.pack("<2f", 0.0, 0.0), 1)), PayloadError),  # long
        (frame_from_body(_set_targets_body(9, struct.pack("<f", 0.0), 1, mask=0b10)), PayloadError),  # mask > n
        (frame_from_body(_set_targets_body(9, struct.pack("<f", float("nan")), 1)), TargetRangeError),
        (frame_from_body(_set_targets_body(9, struct.pack("<f", float("inf")), 1, mask=1)), TargetRangeError),
        (frame_from_body(_set_targets_body(9, struct.pack("<f", 1.5), 1)), TargetRangeError),
        (frame_from_body(_capabilities_body(0, b"")), PayloadError),
        (frame_from_body(_capabilities_body(9, struct.pack("<Bff", 1, 0, 0) * 9)), FramingError),  # too long
        (frame_from_body(_capabilities_body(9, struct.pack("<Bff", 1, 0, 0) * 8)), PayloadError),
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 1, 0, 0), major=1)), PayloadError),
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 0, 0, 0))), PayloadError),  # no kind
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 4, 0, 0))), PayloadError),  # reserved kind
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 2, 1, 0))), PayloadError),  # min > max
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 2, 0, float("inf")))), PayloadError),
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 1, 0, 0), watchdog=0)), PayloadError),
        (frame_from_body(_capabilities_body(1, struct.pack("<Bff", 1, 0, 0), period=0)), PayloadError),
        (frame_from_body(_capabilities_body(2, struct.pack("<Bff", 1, 0, 0))), PayloadError),  # short
        (frame_from_body(struct.pack("<BBH", 2, 0x82, 9) + b"\x02" * 5), PayloadError),  # short fixed part
        (frame_from_body(struct.pack("<BBH", 2, 0x81, 9) + b"\x00" * 23), PayloadError),  # short fixed part
        (frame_from_body(_telemetry_body(status=0x20)), PayloadError),
        (frame_from_body(_telemetry_body(status=0x04)), PayloadError),  # FAULT, code 0
        (frame_from_body(_telemetry_body(fault=3)), PayloadError),  # a code, FAULT clear
        (frame_from_body(_telemetry_body(n_vel=9)), PayloadError),
        (frame_from_body(_telemetry_body(n_pos=1)), PayloadError),
        (frame_from_body(_telemetry_body(n_vel=1, floats=struct.pack("<f", float("nan")))), PayloadError),
    ],
)
def test_decode_rejects_malformed_frames(frame, error):
    with pytest.raises(error):
        decode(frame)


def test_decode_rejects_a_bad_crc():
    raw = bytearray(cobs.decode(encode(EXAMPLE_MESSAGE)[:-1]))
    raw[-1] ^= 0x01
    with pytest.raises(CrcError, match="CRC"):
        decode(cobs.encode(bytes(raw)))


def test_decode_rejects_non_bytes_with_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode("06 01 01")


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_version_mismatch_names_both_versions(version):
    body = struct.pack("<BBH", version, 0x02, 1)
    with pytest.raises(VersionMismatchError) as excinfo:
        decode(frame_from_body(body))
    assert isinstance(excinfo.value, ProtocolError)
    assert excinfo.value.version == version
    text = str(excinfo.value)
    assert f"version {version}" in text and f"version {PROTOCOL_VERSION}" in text
    decoder = FrameDecoder()
    assert decoder.peer_version is None
    assert decoder.feed(frame_from_body(body) + b"\x00" + encode(EmergencyStop(seq=2))) == [
        EmergencyStop(seq=2)
    ]
    assert decoder.stats.version_errors == 1
    assert decoder.peer_version == version
    assert isinstance(decoder.last_error, VersionMismatchError)


def test_a_v1_telemetry_frame_is_recognised_by_its_version():
    # A v1 controller's telemetry (revision 1.0 layout): dropped at the version check, never misread.
    v1 = struct.pack("<BBHIBHHHHBBff", 1, 0x81, 3, 1000, 0x08, 0, 0, 0, 0, 1, 1, 0.5, 2.0)
    decoder = FrameDecoder()
    assert decoder.feed(frame_from_body(v1) + b"\x00") == []
    assert decoder.peer_version == 1 and decoder.stats.version_errors == 1


def test_crc_is_checked_before_the_version():
    body = bytearray(struct.pack("<BBH", 1, 0x02, 1))
    frame = bytearray(cobs.decode(frame_from_body(bytes(body))))
    frame[-1] ^= 0xFF  # noise that also happens to corrupt a version: report noise
    with pytest.raises(CrcError):
        decode(cobs.encode(bytes(frame)))


# --- every single-bit flip ---------------------------------------------------------------------------

FLIP_MESSAGES = [
    EXAMPLE_MESSAGE,
    SetTargets(seq=40000, targets=(0.5, -0.25, 0.125, -1.0, 1.0, 0.0, 0.75, -0.75)),
    SetTargets(seq=40001, targets=(0.5, 2.25, 0.125, -1.0), kinds=(V, P, P, V)),
    EmergencyStop(seq=5),
    ClearEmergencyStop(seq=0),
    GetCapabilities(seq=77),
    arm_capabilities(seq=1),
    full_telemetry(seq=1),
]


@pytest.mark.parametrize("message", FLIP_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_single_bit_flip_is_rejected(message):
    frame = encode(message)
    follower = EmergencyStop(seq=777)
    follower_frame = encode(follower)
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        flipped = bytes(flipped)
        decoder = FrameDecoder()
        received = decoder.feed(flipped + follower_frame)
        if bit // 8 == len(frame) - 1:
            # The delimiter became data: the damaged frame swallows the follower, and the
            # merged piece is rejected as a whole.
            assert received == [], f"bit {bit}"
            assert decoder.stats.rejected == 1, f"bit {bit}"
            continue
        # Everything the damaged frame became (one piece, or two if the flip made a 0x00) is
        # rejected, and the next frame is recovered because its delimiter is intact.
        assert received == [follower], f"bit {bit}"
        pieces = [piece for piece in flipped[:-1].split(b"\x00") if piece]
        assert decoder.stats.rejected == len(pieces), f"bit {bit}"
        for piece in pieces:
            with pytest.raises(ProtocolError):
                decode(piece)


# --- streaming decoder -------------------------------------------------------------------------------


def test_stream_split_at_every_byte_gives_the_same_messages():
    stream = b"".join(encode(m) for m in ROUND_TRIP_MESSAGES)
    decoder = FrameDecoder()
    received = []
    for index in range(len(stream)):
        received += decoder.feed(stream[index : index + 1])
    assert received == ROUND_TRIP_MESSAGES
    assert decoder.stats.frames == len(ROUND_TRIP_MESSAGES)
    assert decoder.stats.rejected == 0
    assert decoder.buffered_bytes == 0


def test_resynchronises_after_garbage_and_recovers_following_frames():
    messages = [SetTargets(seq=i, targets=(0.5, -0.5)) for i in range(5)]
    garbage = bytes([0x13, 0x37, 0xFF, 0x01, 0x80] * 7)  # no zeros: merges with what follows
    stream = garbage + encode(messages[0]) + b"".join(encode(m) for m in messages[1:])
    stream += b"\x42\x00\x99\x00" + encode(EmergencyStop(seq=9))  # garbage containing delimiters
    decoder = FrameDecoder()
    received = decoder.feed(stream[:50]) + decoder.feed(stream[50:])
    # The first frame is lost (the garbage ran into it without a delimiter); the rest arrive.
    assert received == messages[1:] + [EmergencyStop(seq=9)]
    stats = decoder.stats
    assert stats.frames == 5
    assert stats.rejected == 3  # garbage+frame 0, b"\x42", b"\x99"
    assert isinstance(decoder.last_error, ProtocolError)


def test_leading_delimiter_flushes_noise_and_empty_frames_are_not_errors():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00") == []
    assert decoder.feed(b"\x17\x23") == []  # noise in the buffer
    assert decoder.feed(b"\x00" + encode(EXAMPLE_MESSAGE)) == [EXAMPLE_MESSAGE]
    assert decoder.stats.rejected == 1  # only the noise


def test_counts_each_kind_of_error():
    corrupted = bytearray(cobs.decode(encode(EXAMPLE_MESSAGE)[:-1]))
    corrupted[5] ^= 0x40
    stream = b"".join(
        [
            cobs.encode(bytes(corrupted)) + b"\x00",  # crc
            b"\x05\x01\x00",  # framing
            frame_from_body(struct.pack("<BBH", 2, 0x55, 1)) + b"\x00",  # unknown type
            frame_from_body(_set_targets_body(1, struct.pack("<f", 0.0), 2)) + b"\x00",  # payload
            frame_from_body(_set_targets_body(1, struct.pack("<f", 2.0), 1)) + b"\x00",  # range
            frame_from_body(struct.pack("<BBH", 3, 0x02, 1)) + b"\x00",  # version
            b"\x01" * 200 + b"\x00",  # oversized
            encode(EXAMPLE_MESSAGE),
        ]
    )
    decoder = FrameDecoder()
    assert decoder.feed(stream) == [EXAMPLE_MESSAGE]
    assert decoder.stats == protocol.DecoderStats(
        frames=1,
        crc_errors=1,
        framing_errors=1,
        oversized=1,
        version_errors=1,
        unknown_messages=1,
        payload_errors=1,
        range_errors=1,
    )
    assert decoder.stats.rejected == 7


def test_oversized_input_does_not_grow_memory():
    decoder = FrameDecoder()
    chunk = b"\x55" * 4096
    for _ in range(256):  # 1 MiB without a delimiter
        assert decoder.feed(chunk) == []
        assert decoder.buffered_bytes <= MAX_FRAME_BYTES - 1
    assert decoder.stats.oversized == 1  # one runaway frame, counted once
    # Its end is the next delimiter; the frame after it is decoded.
    assert decoder.feed(b"\x00" + encode(EXAMPLE_MESSAGE)) == [EXAMPLE_MESSAGE]
    assert decoder.stats.oversized == 1
    assert decoder.stats.rejected == 1


def test_largest_frame_is_accepted_and_one_byte_more_is_oversized():
    largest = encode(full_telemetry())
    assert len(largest) == MAX_FRAME_BYTES
    decoder = FrameDecoder()
    assert decoder.feed(largest) == [full_telemetry()]
    assert decoder.feed(b"\x01" + largest) == []
    assert decoder.stats.oversized == 1


# --- sequence numbers --------------------------------------------------------------------------------


def test_sequence_counter_wraps():
    counter = SequenceCounter(start=65534)
    assert [counter.next() for _ in range(4)] == [65534, 65535, 0, 1]
    assert counter.peek() == 2
    assert SequenceCounter().next() == 0
    with pytest.raises(ProtocolError):
        SequenceCounter(start=65536)


def test_sequence_counter_never_hands_out_a_number_twice_across_threads():
    counter = SequenceCounter()
    results: list[list[int]] = [[], []]

    def take(out: list[int]) -> None:
        for _ in range(5000):
            out.append(counter.next())

    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert sorted(results[0] + results[1]) == list(range(10000))


@pytest.mark.parametrize(
    ("a", "b", "delta"),
    [
        (0, 1, 1),
        (65535, 0, 1),
        (65530, 4, 10),
        (0, 65535, -1),
        (4, 65530, -10),
        (10, 10, 0),
        (0, 32767, 32767),
        (0, 32768, -32768),
        (100, 100 + 32767, 32767),
    ],
)
def test_seq_delta_is_signed_and_wrap_aware(a, b, delta):
    assert seq_delta(a, b) == delta


def test_seq_delta_rejects_values_outside_u16():
    for a, b in [(-1, 0), (0, 65536), (1.0, 2)]:
        with pytest.raises(ProtocolError):
            seq_delta(a, b)


def test_loss_detection_across_the_wrap():
    counter = SequenceCounter(start=65530)
    sent = [encode(EmergencyStop(seq=counter.next())) for _ in range(12)]
    delivered = [frame for index, frame in enumerate(sent) if index not in (3, 7, 8)]
    received = FrameDecoder().feed(b"".join(delivered))
    seqs = [message.seq for message in received]
    lost = sum(seq_delta(prev, cur) - 1 for prev, cur in zip(seqs, seqs[1:], strict=False))
    assert lost == 3
    assert seqs[-1] == (65530 + 11) % 65536
