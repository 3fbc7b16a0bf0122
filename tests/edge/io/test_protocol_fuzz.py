"""Fuzzing of the serial protocol v2: no input bytes may escape as anything but ProtocolError.

Property-based tests (hypothesis) for the shapes of the input, and one deterministic run of a million
decoder inputs (mutated valid frames, mutated bodies with a recomputed CRC, random bytes) for volume.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter

from cobs import cobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import ProtocolError
from edge.io.protocol import (
    KINDS,
    MAX_CHANNELS,
    MAX_FRAME_BYTES,
    POSITION,
    PROTOCOL_VERSION,
    REJECTION_COUNTERS,
    Capabilities,
    ChannelCapability,
    ClearEmergencyStop,
    CrcError,
    EmergencyStop,
    FrameDecoder,
    FramingError,
    GetCapabilities,
    PayloadError,
    SetTargets,
    StatusFlags,
    TargetRangeError,
    Telemetry,
    UnknownMessageError,
    VersionMismatchError,
    crc16_ccitt_false,
    decode,
    encode,
)

# Deadlines off: a loaded 2-core machine must not turn slow examples into failures.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

u16 = st.integers(0, 0xFFFF)
# Exactly representable in float32, so decode(encode(m)) == m.
targets = st.floats(-1.0, 1.0, width=32, allow_nan=False)
readings = st.floats(width=32, allow_nan=False, allow_infinity=False)
channels = st.lists(readings, max_size=MAX_CHANNELS).map(tuple)


@st.composite
def set_targets(draw):
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=MAX_CHANNELS))
    values = tuple(draw(readings if kind == POSITION else targets) for kind in kinds)
    return SetTargets(seq=draw(u16), targets=values, kinds=tuple(kinds))


@st.composite
def channel_capabilities(draw):
    kinds = draw(st.sampled_from([("velocity",), ("position",), KINDS]))
    low, high = sorted((draw(readings), draw(readings)))
    return ChannelCapability(kinds=kinds, position_min=low, position_max=high)


@st.composite
def telemetries(draw):
    status = draw(st.integers(0, 0x0F))
    code = draw(st.integers(1, 0xFF)) if status & StatusFlags.FAULT else 0
    return Telemetry(seq=draw(u16), controller_time_ms=draw(st.integers(0, 2**32 - 1)), velocities=draw(channels),
                     positions=draw(channels), status=StatusFlags(status), last_command_seq=draw(u16),
                     fault_code=code, **{name: draw(u16) for name in REJECTION_COUNTERS})


messages = st.one_of(
    set_targets(),
    st.builds(EmergencyStop, seq=u16),
    st.builds(ClearEmergencyStop, seq=u16),
    st.builds(GetCapabilities, seq=u16),
    st.builds(
        Capabilities,
        seq=u16,
        firmware_version=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
        channels=st.lists(channel_capabilities(), min_size=1, max_size=MAX_CHANNELS).map(tuple),
        watchdog_timeout_ms=st.integers(1, 0xFFFF),
        telemetry_period_ms=st.integers(1, 0xFFFF),
        protocol_minor=st.integers(0, 255),
    ),
    telemetries(),
)


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=2 * MAX_FRAME_BYTES))
def test_decode_of_arbitrary_bytes_raises_only_protocol_errors(data):
    try:
        message = decode(data)
    except ProtocolError:
        return
    # Accepted by (astronomically unlikely) chance: it must then be a real, re-encodable frame.
    assert encode(message) == data + b"\x00"


@st.composite
def bodies_with_valid_crc(draw):
    """Bodies that pass COBS and CRC, so the payload parser (not the CRC) meets the fuzz."""
    version = draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, 3, 255]))
    message_type = draw(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x81, 0x82, 0x00, 0x05, 0x80, 0xFF]))
    seq = draw(u16)
    if message_type == 0x81 and draw(st.booleans()):
        # Plausible fixed part so that the counts and floats get exercised, not just the length check.
        fixed = struct.pack(
            "<IBBH7HBB",
            draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 0xFF)),
            draw(st.sampled_from([0, 0, 1, 0x85, 0xFF])),
            draw(u16),
            *(draw(u16) for _ in REJECTION_COUNTERS),
            draw(st.integers(0, 10)),
            draw(st.integers(0, 10)),
        )
        payload = fixed + draw(st.binary(max_size=4 * 2 * 10))
    elif message_type == 0x82 and draw(st.booleans()):
        count = draw(st.integers(0, 10))
        fixed = struct.pack("<BBBBBBHH", draw(st.sampled_from([PROTOCOL_VERSION, 1])), 0, 1, 2, 3, count,
                            draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        payload = fixed + draw(st.binary(min_size=max(0, 9 * count - 2), max_size=9 * count + 2))
    elif message_type == 0x01 and draw(st.booleans()):
        count = draw(st.integers(0, 10))
        mask = draw(st.integers(0, 0xFF))
        payload = bytes([count, mask]) + draw(st.binary(min_size=max(0, 4 * count - 2), max_size=4 * count + 2))
    else:
        payload = draw(st.binary(max_size=95))
    body = struct.pack("<BBH", version, message_type, seq) + payload
    return cobs.encode(body + struct.pack(">H", crc16_ccitt_false(body)))


@settings(FUZZ, max_examples=1000)
@given(bodies_with_valid_crc())
def test_decode_of_crc_valid_frames_raises_only_protocol_errors_or_round_trips(frame):
    try:
        message = decode(frame)
    except ProtocolError:
        return
    # Whatever is accepted is canonical: encoding it again gives the very same bytes.
    assert encode(message) == frame + b"\x00"


@settings(FUZZ, max_examples=500)
@given(messages)
def test_every_encodable_message_round_trips(message):
    frame = encode(message)
    assert len(frame) <= MAX_FRAME_BYTES
    assert frame[-1] == 0 and 0 not in frame[:-1]
    assert decode(frame[:-1]) == message


def _message_pool(size: int) -> list:
    """Varied messages built once: drawing each field through hypothesis per frame is too slow for
    thousands of streams, and the frames' variety (zeros in seq and floats, every type and channel
    count) is what the stream property needs; the round-trip property covers field values."""
    rng = random.Random(20240611)

    def value(limit: float) -> float:
        choice = rng.random()
        if choice < 0.3:
            return 0.0  # zero bytes inside the body exercise COBS
        if choice < 0.4:
            return rng.choice([-limit, limit])
        return struct.unpack("<f", struct.pack("<f", rng.uniform(-limit, limit)))[0]

    pool = []
    for index in range(size):
        seq = rng.choice([0, 0x0100, 0x00FF, 0xFFFF, rng.randrange(0x10000)])
        kind = index % 6
        if kind == 0:
            kinds = tuple(rng.choice(KINDS) for _ in range(rng.randint(1, MAX_CHANNELS)))
            pool.append(SetTargets(seq, tuple(value(100.0 if k == POSITION else 1.0) for k in kinds), kinds))
        elif kind == 1:
            pool.append(EmergencyStop(seq))
        elif kind == 2:
            pool.append(ClearEmergencyStop(seq))
        elif kind == 3:
            pool.append(GetCapabilities(seq))
        elif kind == 4:
            chans = []
            for _ in range(rng.randint(1, MAX_CHANNELS)):
                low, high = sorted((value(10.0), value(10.0)))
                chans.append(ChannelCapability(rng.choice([("velocity",), ("position",), KINDS]), low, high))
            pool.append(Capabilities(seq, (rng.randrange(256), rng.randrange(256), rng.randrange(256)),
                                     tuple(chans), rng.randint(1, 0xFFFF), rng.randint(1, 0xFFFF),
                                     rng.randrange(256)))
        else:
            status = StatusFlags(rng.randrange(16))
            pool.append(
                Telemetry(
                    seq=seq,
                    controller_time_ms=rng.choice([0, rng.randrange(2**32)]),
                    velocities=tuple(value(2.0) for _ in range(rng.randint(0, MAX_CHANNELS))),
                    positions=tuple(value(100.0) for _ in range(rng.randint(0, MAX_CHANNELS))),
                    status=status,
                    last_command_seq=rng.randrange(0x10000),
                    fault_code=rng.randint(1, 0xFF) if status & StatusFlags.FAULT else 0,
                    **{name: rng.choice([0, rng.randrange(0x10000)]) for name in REJECTION_COUNTERS},
                )
            )
    return pool


MESSAGE_POOL = _message_pool(256)


@st.composite
def streams(draw):
    """A byte stream of valid frames and garbage, the frames expected to survive, and chunk cuts."""
    segments = draw(
        st.lists(
            st.one_of(
                st.sampled_from(MESSAGE_POOL).map(lambda m: ("frame", m)),
                # Garbage of all kinds: short noise, noise with delimiters, runs past MAX_FRAME_BYTES.
                st.binary(max_size=24).map(lambda b: ("garbage", b)),
                # (runs are built from a length and a byte: drawing 300 random bytes is slow)
                st.tuples(st.integers(MAX_FRAME_BYTES - 2, 3 * MAX_FRAME_BYTES), st.integers(1, 255)).map(
                    lambda run: ("garbage", bytes([run[1]]) * run[0])
                ),
                st.sampled_from([b"\x00", b"\x01", b"\x00\x00"]).map(lambda b: ("garbage", b)),
            ),
            max_size=8,
        )
    )
    stream = bytearray()
    untouched = []
    for kind, item in segments:
        if kind == "frame":
            # A frame survives when nothing but a delimiter (or the start) precedes it.
            if not stream or stream[-1] == 0:
                untouched.append(item)
            stream += encode(item)
        else:
            stream += item
    stream = bytes(stream)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return stream, untouched, cuts


def _is_subsequence(expected: list, received: list) -> bool:
    remaining = iter(received)
    return all(any(item == got for got in remaining) for item in expected)


@settings(FUZZ, max_examples=3000)
@given(streams())
def test_stream_decoder_never_raises_and_returns_every_untouched_frame(case):
    stream, untouched, cuts = case
    decoder = FrameDecoder()
    received = []
    start = 0
    for cut in cuts + [len(stream)]:
        received += decoder.feed(stream[start:cut])  # must never raise
        assert decoder.buffered_bytes <= MAX_FRAME_BYTES - 1
        start = cut
    # Every frame garbage did not touch comes out, in order. Garbage could in principle add a message
    # by a CRC collision, hence a subsequence and not equality.
    assert _is_subsequence(untouched, received)
    assert decoder.stats.frames == len(received)
    # Chunking does not matter: one feed of the whole stream gives the same result and counters.
    whole = FrameDecoder()
    assert whole.feed(stream) == received
    assert whole.stats == decoder.stats


# --- one million decoder inputs ------------------------------------------------------------------------

FUZZ_INPUTS = 1_000_000
_ERRORS = (CrcError, VersionMismatchError, UnknownMessageError, TargetRangeError, PayloadError, FramingError)


def _mutate(data: bytearray, rng: random.Random) -> None:
    """One to four random edits of ``data`` in place: bit flips, byte sets, inserts, deletes, cuts."""
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        n = len(data)
        if op == 0 and n:
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            data[rng.randrange(n)] = rng.choice((0x00, 0x01, 0x02, 0x04, 0x7F, 0x80, 0x81, 0x82, 0xFF,
                                                 rng.randrange(256)))
        elif op == 2:
            data.insert(rng.randint(0, n), rng.randrange(256))
        elif op == 3 and n:
            del data[rng.randrange(n)]
        elif op == 4 and n:
            del data[rng.randrange(n):]
        elif op == 5 and n:
            start = rng.randrange(n)
            data[start:start] = data[start:start + rng.randint(1, 8)]  # duplicate a slice


def test_a_million_decoder_inputs_raise_nothing_but_protocol_errors():
    """Mutated valid frames (the COBS and CRC layers), mutated bodies with a recomputed CRC (the version,
    type and payload checks behind them) and random bytes: ``decode`` returns a message or raises a
    ProtocolError subclass, and every accepted input is canonical (re-encodes to the same bytes)."""
    rng = random.Random(0x5EED_0002)
    frames = [encode(m)[:-1] for m in MESSAGE_POOL]
    bodies = [cobs.decode(f)[:-2] for f in frames]
    outcomes: Counter[str] = Counter()
    started = time.perf_counter()
    for index in range(FUZZ_INPUTS):
        mode = index % 5
        if mode == 0:  # random bytes, up to twice the largest frame
            data = rng.randbytes(rng.randrange(2 * MAX_FRAME_BYTES))
        elif mode in (1, 2):  # a whole mutated frame: the CRC almost always catches it
            edited = bytearray(rng.choice(frames))
            _mutate(edited, rng)
            data = bytes(edited)
        else:  # a mutated body sealed with a valid CRC, so the payload parser meets the mutation
            body = bytearray(rng.choice(bodies))
            _mutate(body, rng)
            data = cobs.encode(bytes(body) + struct.pack(">H", crc16_ccitt_false(bytes(body))))
        try:
            message = decode(data)
        except ProtocolError as exc:
            outcomes[next(e.__name__ for e in _ERRORS if isinstance(exc, e))] += 1
            continue
        outcomes["accepted"] += 1
        assert encode(message) == data + b"\x00", f"input {index}: {data.hex()} decoded to {message}"
    elapsed_s = time.perf_counter() - started
    print(f"{FUZZ_INPUTS} decoder inputs in {elapsed_s:.1f} s: {dict(outcomes)}")
    assert sum(outcomes.values()) == FUZZ_INPUTS
    # The mix reached every check: each error type and a good share of accepted (mutated yet valid) frames.
    for name in ("accepted", *(e.__name__ for e in _ERRORS)):
        assert outcomes[name] > 100, f"the fuzz never reached {name}: {dict(outcomes)}"
