"""The firmware core, built for the host, against the runtime's protocol implementation (edge.io.protocol).

Frames the host encodes are accepted and applied; frames the core emits decode on the host; each bad
frame counts in exactly one rejection counter and changes nothing else; the watchdog, the e-stop latch
and faults behave as docs/serial-protocol.md, section 6, says.
"""

from __future__ import annotations

import ctypes
import math
import random
import struct

import pytest

from edge.io.framing import crc16_ccitt_false, seal
from edge.io.protocol import (
    POSITION,
    VELOCITY,
    Capabilities,
    ClearEmergencyStop,
    EmergencyStop,
    FaultCode,
    GetCapabilities,
    MessageType,
    ProtocolError,
    SetTargets,
    StatusFlags,
    TargetRangeError,
    Telemetry,
    decode,
    encode,
)
from tests.firmware import host_core
from tests.firmware.host_core import RX_MESSAGE, HostFirmware, HostMessage, Layout

ARM = Layout(kinds=(VELOCITY, POSITION, "both"), limits=((0.0, 0.0), (-1.5, 1.5), (0.0, 0.08)))


def set_targets(seq, targets, kinds=None) -> bytes:
    return encode(SetTargets(seq=seq, targets=tuple(targets), kinds=tuple(kinds or ())))


def raw_frame(body: bytes, crc: int | None = None) -> bytes:
    """A frame of any body, bypassing the host encoder's checks (for frames it would refuse to send)."""
    from cobs import cobs

    crc = crc16_ccitt_false(body) if crc is None else crc
    return cobs.encode(body + struct.pack(">H", crc)) + b"\x00"


def only_changed(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_crc_and_the_worked_example_match_the_spec(fwlib):
    assert fwlib.fw_crc16_ccitt_false(b"123456789", 9) == 0x29B1
    rng = random.Random(5)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 95)))
        assert fwlib.fw_crc16_ccitt_false(data, len(data)) == crc16_ccitt_false(data)
    # Section 7: SetTargets seq 258, channel 0 a velocity of 0.5, channel 1 a position of 1.25.
    wire = bytes.fromhex("07 02 01 02 01 02 02 01 01 02 3f 01 05 a0 3f 6f 50 00")
    message, reason = HostMessage(), ctypes.c_int(-1)
    assert fwlib.fw_parse_frame(wire[:-1], len(wire) - 1, ctypes.byref(message), ctypes.byref(reason)) == RX_MESSAGE
    assert (message.type, message.seq, message.channel_count, message.position_mask) == (1, 258, 2, 0b10)
    assert list(message.targets[:2]) == [0.5, 1.25]


def test_power_up_is_stopped_and_tripped_and_telemetry_decodes_on_the_host(firmware):
    firmware.advance(100)
    frames = firmware.telemetry()
    assert len(frames) == 6  # the first poll after boot, then every 20 ms
    first = frames[0]
    assert first.status == StatusFlags.WATCHDOG_TRIPPED
    assert first.fault_code == FaultCode.NONE and first.last_command_seq == 0
    assert first.velocities == (0.0, 0.0) and first.positions == (0.0, 0.0)
    assert [f.controller_time_ms for f in frames] == [1, 20, 40, 60, 80, 100]
    assert [(b.seq - a.seq) % 65536 for a, b in zip(frames, frames[1:])] == [1, 1, 1, 1, 1]
    assert firmware.outputs() == (True, 0, (0.0, 0.0))


def test_capabilities_answer_get_capabilities_in_any_state(fwlib):
    firmware = HostFirmware(fwlib, ARM)
    firmware.feed(encode(EmergencyStop(seq=1)) + encode(GetCapabilities(seq=2)))
    (caps,) = [m for m in firmware.take_frames() if isinstance(m, Capabilities)]
    assert caps.watchdog_timeout_ms == 300 and caps.telemetry_period_ms == 20
    assert caps.firmware_version == (1, 0, 0) and caps.protocol_minor == 0
    assert [c.kinds for c in caps.channels] == [(VELOCITY,), (POSITION,), (VELOCITY, POSITION)]
    assert (caps.channels[1].position_min, caps.channels[1].position_max) == (-1.5, 1.5)
    assert caps.channels[2].position_max == pytest.approx(0.08)
    assert caps.channels[0].position_min == caps.channels[0].position_max == 0.0
    assert firmware.state().last_command_seq == 2
    firmware.advance(20)
    assert firmware.telemetry()[-1].status == StatusFlags.WATCHDOG_TRIPPED | StatusFlags.ESTOP_LATCHED


def test_set_targets_from_the_host_are_applied_per_channel_kind(fwlib):
    firmware = HostFirmware(fwlib, ARM)
    firmware.feed(set_targets(1, (0.5, -1.25, 0.04), (VELOCITY, POSITION, POSITION)))
    firmware.advance(20)
    enabled, mask, targets = firmware.outputs()
    assert enabled and mask == 0b110 and targets == pytest.approx((0.5, -1.25, 0.04))
    telemetry = firmware.telemetry()[-1]
    assert telemetry.status == StatusFlags.MOTORS_ENABLED and telemetry.last_command_seq == 1
    assert len(telemetry.velocities) == len(telemetry.positions) == 3
    # The "both" channel takes a velocity in the next frame.
    firmware.feed(set_targets(2, (0.0, 0.0, -0.3), (VELOCITY, POSITION, VELOCITY)))
    firmware.poll()
    assert firmware.outputs()[1:] == (0b010, pytest.approx((0.0, 0.0, -0.3)))


def test_measured_values_reach_the_host(firmware):
    firmware.set_measured(0, 0.25, 3.5)
    firmware.set_measured(1, -0.75, -12.0)
    firmware.advance(20)
    telemetry = firmware.telemetry()[-1]
    assert telemetry.velocities == (0.25, -0.75) and telemetry.positions == (3.5, -12.0)


@pytest.mark.parametrize("name, frame, counter", [
    ("bad crc", raw_frame(b"\x02\x02\x05\x00", crc=0x1234), "rejected_crc"),
    ("bad cobs", b"\x05\x02\x02\x00", "rejected_framing"),
    ("too short", raw_frame(b"\x02\x02\x05")[:-1][:3] + b"\x00", "rejected_framing"),
    ("protocol v1", raw_frame(b"\x01\x02\x05\x00"), "rejected_framing"),
    ("unknown type", raw_frame(b"\x02\x09\x05\x00"), "rejected_framing"),
    ("payload on e-stop", raw_frame(b"\x02\x02\x05\x00\x01"), "rejected_framing"),
    ("set targets length", raw_frame(b"\x02\x01\x05\x00\x02\x00" + struct.pack("<f", 0.1)), "rejected_framing"),
    ("no channels", raw_frame(b"\x02\x01\x05\x00\x00\x00"), "rejected_framing"),
    ("mask beyond n", raw_frame(b"\x02\x01\x05\x00\x02\x04" + struct.pack("<2f", 0.1, 0.1)), "rejected_framing"),
    ("telemetry to the controller", encode(Telemetry(seq=3, controller_time_ms=1, velocities=(0.0, 0.0),
                                                     positions=(0.0, 0.0), status=StatusFlags.MOTORS_ENABLED,
                                                     last_command_seq=0)), "rejected_framing"),
    ("oversized", b"\x01" * 200 + b"\x00", "rejected_framing"),
    ("three channels", set_targets(5, (0.1, 0.1, 0.1)), "rejected_channel_count"),
    ("position on a velocity channel", set_targets(5, (0.1, 0.1), (VELOCITY, POSITION)), "rejected_kind"),
    ("velocity over 1", raw_frame(b"\x02\x01\x05\x00\x02\x00" + struct.pack("<2f", 0.5, 1.01)), "rejected_range"),
    ("nan", raw_frame(b"\x02\x01\x05\x00\x02\x00" + struct.pack("<2f", math.nan, 0.0)), "rejected_range"),
    ("inf", raw_frame(b"\x02\x01\x05\x00\x02\x00" + struct.pack("<2f", 0.0, -math.inf)), "rejected_range"),
])
def test_each_bad_frame_counts_once_in_its_reason_and_changes_nothing_else(firmware, name, frame, counter):
    firmware.feed(set_targets(1, (0.4, -0.4)))
    firmware.advance(1)
    before, outputs = firmware.rejections(), firmware.outputs()
    firmware.feed(b"\x00" + frame)
    firmware.poll()
    assert only_changed(before, firmware.rejections()) == {counter: 1}, name
    assert firmware.outputs() == outputs
    assert firmware.state().last_command_seq == 1  # a dropped frame is never echoed
    firmware.feed(set_targets(2, (0.1, 0.2)))  # and the receiver is in step again
    firmware.poll()
    assert firmware.outputs()[2] == pytest.approx((0.1, 0.2)) and firmware.state().last_command_seq == 2


def test_position_out_of_its_announced_limits_is_a_range_rejection(fwlib):
    firmware = HostFirmware(fwlib, ARM)
    for target in (1.5001, -1.6):
        firmware.feed(raw_frame(b"\x02\x01\x05\x00\x03\x02" + struct.pack("<3f", 0.0, target, 0.0)))
    assert firmware.rejections()["rejected_range"] == 2
    firmware.feed(set_targets(6, (0.0, 1.5, 0.0), (VELOCITY, POSITION, VELOCITY)))  # the limit itself is valid
    assert firmware.state().last_command_seq == 6


def test_rejection_counters_wrap_at_2_16(firmware):
    frame = raw_frame(b"\x02\x02\x05\x00", crc=0)
    firmware.feed(frame * 65537)
    assert firmware.rejections()["rejected_crc"] == 1


def test_watchdog_stops_the_motors_at_its_timeout_and_only_valid_set_targets_feed_it(fwlib):
    firmware = HostFirmware(fwlib, ARM)
    firmware.set_measured(1, 0.0, 0.7)
    firmware.set_measured(2, 0.0, 0.05)
    firmware.advance(1)
    firmware.feed(set_targets(1, (0.8, 1.0, 0.02), (VELOCITY, POSITION, POSITION)))
    # Frames that do not feed it: malformed, wrong kind, out of range, e-stop clear, capabilities.
    for offset in (50, 100, 150, 200, 250):
        firmware.advance(50)
        firmware.feed(set_targets(1 + offset, (0.8, 1.0, 0.02)))  # velocity on a position-only channel
        firmware.feed(raw_frame(b"\x02\x01\x05\x00\x03\x06" + struct.pack("<3f", 2.0, 1.0, 0.02)))
        firmware.feed(encode(ClearEmergencyStop(seq=2 + offset)) + encode(GetCapabilities(seq=3 + offset)))
    firmware.advance(50)
    # 300 ms on the controller's 1 ms clock after the last valid one: the command may have arrived just
    # before a tick, so the trip waits for the next one (never early, at most 1 ms late).
    assert not firmware.state().status & StatusFlags.WATCHDOG_TRIPPED
    assert firmware.outputs()[2] == pytest.approx((0.8, 1.0, 0.02))
    firmware.advance(1)
    assert firmware.state().status == StatusFlags.WATCHDOG_TRIPPED
    # Velocity to zero, position channels hold their measured position (never 0).
    assert firmware.outputs() == (True, 0b110, pytest.approx((0.0, 0.7, 0.05)))
    firmware.take_bytes()
    firmware.advance(20)
    assert firmware.telemetry()[-1].status == StatusFlags.WATCHDOG_TRIPPED
    firmware.feed(set_targets(900, (0.1, 0.2, 0.03), (VELOCITY, POSITION, POSITION)))
    firmware.poll()
    assert firmware.state().status == StatusFlags.MOTORS_ENABLED
    assert firmware.outputs()[2] == pytest.approx((0.1, 0.2, 0.03))


def test_watchdog_survives_the_millisecond_counter_wrapping(fwlib):
    firmware = HostFirmware(fwlib)
    firmware.now_ms = 2**32 - 100
    firmware.advance(1)
    firmware.feed(set_targets(1, (0.5, 0.5)))
    firmware.advance(300)  # crosses 2**32
    assert firmware.state().status == StatusFlags.MOTORS_ENABLED
    firmware.advance(1)
    assert firmware.state().status == StatusFlags.WATCHDOG_TRIPPED
    assert firmware.outputs()[2] == (0.0, 0.0)


def test_emergency_stop_latches_until_cleared_and_motors_wait_for_the_next_command(firmware):
    firmware.set_measured(0, 0.3, 1.0)
    firmware.feed(set_targets(1, (0.6, -0.6)))
    firmware.advance(10)
    firmware.feed(encode(EmergencyStop(seq=2)))  # stops at once, before the next poll
    assert firmware.outputs()[2] == (0.0, 0.0)
    assert firmware.state().status == StatusFlags.ESTOP_LATCHED
    firmware.feed(encode(EmergencyStop(seq=3)))  # repeated: harmless
    for seq in range(4, 10):  # ignored, counted, echoed, and they keep the watchdog fed
        firmware.advance(100)
        firmware.feed(set_targets(seq, (0.9, 0.9)))
    assert firmware.rejections()["rejected_estop"] == 6
    assert firmware.state().status == StatusFlags.ESTOP_LATCHED and firmware.state().last_command_seq == 9
    assert firmware.outputs()[2] == (0.0, 0.0)
    firmware.take_bytes()
    firmware.advance(20)
    telemetry = firmware.telemetry()[-1]
    assert telemetry.status == StatusFlags.ESTOP_LATCHED and telemetry.rejected_estop == 6
    firmware.feed(encode(ClearEmergencyStop(seq=10)))
    firmware.advance(5)
    assert firmware.state().status == StatusFlags.MOTORS_ENABLED and firmware.outputs()[2] == (0.0, 0.0)
    firmware.feed(set_targets(11, (0.2, 0.3)))
    firmware.poll()
    assert firmware.outputs()[2] == pytest.approx((0.2, 0.3))


def test_a_board_fault_disables_the_drivers_and_is_reported_with_its_code(fwlib, firmware):
    firmware.feed(set_targets(1, (0.6, 0.6)))
    firmware.advance(5)
    fwlib.fw_set_fault(FaultCode.OVER_CURRENT)
    assert firmware.outputs() == (False, 0, (0.0, 0.0))
    firmware.feed(set_targets(2, (0.6, 0.6)))
    firmware.take_bytes()
    firmware.advance(20)
    telemetry = firmware.telemetry()[-1]
    assert telemetry.status == StatusFlags.FAULT and telemetry.fault_code == FaultCode.OVER_CURRENT
    assert telemetry.rejected_fault == 1
    fwlib.fw_clear_fault()
    firmware.advance(1)
    assert firmware.state().status == StatusFlags.MOTORS_ENABLED and firmware.outputs() == (True, 0, (0.0, 0.0))


def test_implausible_encoder_readings_are_a_fault_and_never_reach_the_wire(firmware):
    firmware.feed(set_targets(1, (0.6, 0.6)))
    firmware.set_measured(1, math.nan, 5.0)
    firmware.take_bytes()
    firmware.advance(20)
    telemetry = firmware.telemetry()[-1]  # the host decoder accepted it: no NaN on the wire
    assert telemetry.status == StatusFlags.FAULT and telemetry.fault_code == FaultCode.ENCODER
    assert telemetry.velocities[1] == 0.0 and not firmware.outputs()[0]
    firmware.set_measured(1, 0.0, 5.0)
    firmware.advance(20)
    assert firmware.telemetry()[-1].status == StatusFlags.MOTORS_ENABLED
    assert firmware.outputs() == (True, 0, (0.0, 0.0))  # stopped until the next SetTargets


def test_telemetry_keeps_its_period_and_skips_ahead_after_a_stall(fwlib):
    firmware = HostFirmware(fwlib)
    firmware.advance(1000)
    times = [t.controller_time_ms for t in firmware.telemetry()]
    assert times[0] == 1 and len(times) == 51  # the first poll after boot, then every 20 ms
    assert all(b - a == 20 for a, b in zip(times[1:], times[2:]))
    firmware.advance(500, step_ms=500)  # the main loop stalled for half a second
    assert len(firmware.telemetry()) == 1  # one frame, not a burst of 25
    firmware.advance(20)
    assert [t.controller_time_ms for t in firmware.telemetry()] == [1520]


def test_an_invalid_config_refuses_to_run(fwlib):
    for layout in (Layout(kinds=()), Layout(limits=((1.0, 0.0), (0.0, 0.0))), Layout(watchdog_timeout_ms=0)):
        firmware = HostFirmware(fwlib, layout)
        assert firmware.init_result == -1
        firmware.feed(set_targets(1, (0.1, 0.1)))
        firmware.advance(40)
        assert firmware.take_bytes() == b"" and not firmware.outputs()[0]


def test_the_receiver_agrees_with_the_host_decoder_on_mutated_frames(fwlib):
    """Differential: the core accepts a frame's structure exactly when edge.io.protocol.decode does."""
    rng = random.Random(19)
    seeds = [set_targets(7, (0.25, -1.0)), set_targets(8, (0.5, 1.25, 0.0), (VELOCITY, POSITION, VELOCITY)),
             encode(EmergencyStop(seq=5)), encode(ClearEmergencyStop(seq=6)), encode(GetCapabilities(seq=7)),
             seal(MessageType.SET_TARGETS, 9, b"\x01\x00" + struct.pack("<f", 0.5))]
    agreed = 0
    for _ in range(3000):
        frame = bytearray(rng.choice(seeds)[:-1])
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            if op == 0:
                frame[rng.randrange(len(frame))] = rng.randrange(1, 256)
            elif op == 1 and len(frame) > 1:
                del frame[rng.randrange(len(frame))]
            else:
                frame.insert(rng.randrange(len(frame) + 1), rng.randrange(1, 256))
        frame = bytes(frame)
        try:
            decode(frame)
            host_ok = True
        except TargetRangeError:
            host_ok = True  # a range check: step 7, the controller's, not the receiver's
        except ProtocolError:
            host_ok = False
        message, reason = HostMessage(), ctypes.c_int(-1)
        core_ok = fwlib.fw_parse_frame(frame, len(frame), ctypes.byref(message), ctypes.byref(reason)) == RX_MESSAGE
        assert core_ok == host_ok, frame.hex(" ")
        agreed += 1
    assert agreed == 3000


def test_set_targets_verdicts_match_the_simulated_controller(fwlib):
    """The C core and the Python simulated controller (simulator.channels) reject the same SetTargets
    for the same reasons, on random frames around a layout of velocity and position channels."""
    from simulator.channels import ChannelLayout

    kinds, limits = (VELOCITY, POSITION, POSITION), ((0.0, 0.0), (-1.5, 1.5), (0.0, 0.08))
    reference = ChannelLayout(kinds=kinds, position_limits=limits)
    firmware = HostFirmware(fwlib, Layout(kinds=kinds, limits=limits))
    rng = random.Random(7)
    values = (0.0, 0.04, -1.0, 1.0, 1.5, -1.6, 0.09, 2.0, math.nan, math.inf)
    verdicts = set()
    for seq in range(1, 1500):
        n = rng.choice((2, 3, 3, 3, 4))
        message = SetTargets(seq=seq, targets=tuple(rng.choice(values) for _ in range(n)),
                             kinds=tuple(rng.choice((VELOCITY, POSITION)) for _ in range(n)))
        mask = sum(1 << k for k, kind in enumerate(message.kinds) if kind == POSITION)
        frame = seal(MessageType.SET_TARGETS, seq, struct.pack("<BB", n, mask)
                     + struct.pack(f"<{n}f", *message.targets))  # the host encoder refuses NaN
        before = firmware.rejections()
        firmware.feed(frame)
        changed = only_changed(before, firmware.rejections())
        expected = reference.rejection(message)
        assert changed == ({expected: 1} if expected else {}), (message, changed)
        verdicts.add(expected)
    assert verdicts == {None, "rejected_channel_count", "rejected_kind", "rejected_range"}


def test_an_implausible_encoder_at_power_up_keeps_the_drivers_off(fwlib):
    fwlib.host_reset()
    fwlib.host_set_measured(0, 0.0, 5e6)  # beyond the +-1e6 telemetry may carry
    config = Layout().config()
    assert fwlib.fw_init(ctypes.byref(config)) == 0
    state = host_core.State()
    fwlib.fw_get_state(ctypes.byref(state))
    assert state.status == StatusFlags.WATCHDOG_TRIPPED | StatusFlags.FAULT and state.fault_code == FaultCode.ENCODER
    assert not state.outputs.enabled
