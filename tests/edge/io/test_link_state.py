"""LinkState, the motor link's shared telemetry state, on its own: no port, no thread, times as arguments."""

from __future__ import annotations

import math

import pytest

from edge.io.link_state import CapabilitiesReceived, ControllerRestart, LinkState
from edge.io.protocol import (
    Capabilities,
    ChannelCapability,
    FrameDecoder,
    SetTargets,
    StatusFlags,
    Telemetry,
    encode,
)


def telemetry(seq: int, time_ms: int = 1000, echoed: int = 0) -> Telemetry:
    return Telemetry(seq=seq, controller_time_ms=time_ms, velocities=(0.0,), positions=(0.0,),
                     status=StatusFlags.MOTORS_ENABLED, last_command_seq=echoed)


def capabilities(seq: int = 1, *kinds: tuple[str, ...], limits=(-1.0, 1.0), firmware=(2, 0, 0)) -> Capabilities:
    channels = tuple(ChannelCapability(k, *(limits if "position" in k else (0.0, 0.0))) for k in kinds)
    return Capabilities(seq=seq, firmware_version=firmware, channels=channels or (ChannelCapability(("velocity",)),),
                        watchdog_timeout_ms=300, telemetry_period_ms=20)


def test_before_any_telemetry_nothing_is_known():
    state = LinkState()
    assert state.latest() == (None, -math.inf)
    assert state.age_s(5.0) == math.inf
    assert state.last_round_trip_s is None and not state.echoes(0, 0.0)


def test_gaps_in_telemetry_seq_count_as_lost_within_one_connection_only():
    state = LinkState()
    state.receive([telemetry(1), telemetry(4)], now=1.0, n_bytes=60)
    assert state.stats.telemetry_lost == 2 and state.stats.telemetry_frames == 2
    state.new_connection(reconnect=True)  # the controller kept counting while we were away
    state.receive([telemetry(40)], now=2.0, n_bytes=30)
    stats = state.stats
    assert (stats.telemetry_lost, stats.reconnects, stats.bytes_received) == (2, 1, 90)
    assert state.latest() == (telemetry(40), 2.0) and state.age_s(2.5) == 0.5


def test_a_clock_going_back_is_returned_as_a_controller_restart():
    state = LinkState()
    assert state.receive([telemetry(1, time_ms=5000), telemetry(2, time_ms=5020)], now=1.0, n_bytes=0) == []
    assert state.receive([telemetry(3, time_ms=10)], now=1.1, n_bytes=0) == [ControllerRestart(5020, 10)]
    assert state.stats.controller_resets == 1
    # A wrap of the u32 millisecond clock is time going on, not a restart.
    assert state.receive([telemetry(4, time_ms=0xFFFFFFF0), telemetry(5, time_ms=5)], now=1.2, n_bytes=0) == [
        ControllerRestart(10, 0xFFFFFFF0)]


def test_round_trip_and_echo_come_from_the_first_telemetry_that_echoes_a_command():
    state = LinkState()
    state.sent(7, sent_at_s=10.0)
    state.sent(8, sent_at_s=10.1)
    state.receive([telemetry(1, echoed=6)], now=10.05, n_bytes=0)
    assert state.last_round_trip_s is None and not state.echoes(7, 10.0)
    state.receive([telemetry(2, echoed=8)], now=10.3, n_bytes=0)
    assert math.isclose(state.last_round_trip_s, 0.2)  # from seq 8, the newest one it confirms
    assert state.echoes(7, 10.0) and state.echoes(8, 10.1) and not state.echoes(9, 10.2)
    assert not state.echoes(8, 10.4)  # sent after the telemetry arrived: not confirmed by it
    assert state.stats.commands_sent == 2


def test_non_telemetry_frames_are_counted_and_ignored():
    state = LinkState()
    state.receive([SetTargets(seq=1, targets=(0.0,))], now=1.0, n_bytes=10)
    assert state.stats.ignored_frames == 1 and state.latest()[0] is None


def test_decoder_counts_add_up_over_connections():
    state = LinkState()
    bad = bytearray(encode(telemetry(1)))
    bad[3] ^= 0xFF  # breaks the CRC
    for _ in range(2):
        decoder = FrameDecoder()
        state.attach_decoder(decoder)
        decoder.feed(bytes(bad))
        assert state.stats.crc_errors >= 1
        state.detach_decoder()
    assert state.stats.crc_errors == 2 and state.stats.bad_frames == 2
    state.count("open_failures")
    assert state.stats.open_failures == 1


def test_status_flags_of_every_sample_since_the_last_take_are_kept():
    # Issue 13: a WATCHDOG_TRIPPED cleared by the next command within one tick must still reach the tick.
    state = LinkState()
    tripped = Telemetry(seq=1, controller_time_ms=1000, velocities=(0.0,), positions=(0.0,),
                        status=StatusFlags.WATCHDOG_TRIPPED, last_command_seq=0)
    state.receive([tripped, telemetry(2)], now=1.0, n_bytes=0)
    assert state.take_status_flags() == StatusFlags.WATCHDOG_TRIPPED | StatusFlags.MOTORS_ENABLED
    assert state.take_status_flags() == StatusFlags.NONE


# --- capabilities (docs/serial-protocol.md, section 6a, rules 13-17) -----------------------------------

V, P = ("velocity",), ("position",)


def test_commands_are_held_until_this_connections_capabilities_arrive_and_fit():
    state = LinkState()
    assert state.capabilities is None and not state.capabilities_arrived.is_set()
    assert "did not answer GetCapabilities" in state.command_problem(2, ("velocity", "position"))
    caps = capabilities(1, V, P)
    assert state.receive([caps], now=1.0, n_bytes=0) == [CapabilitiesReceived(caps)]
    assert state.capabilities == caps and state.capabilities_arrived.is_set()
    assert state.command_problem(2, ("velocity", "position")) is None
    assert "has 2 channels; motor.channels is 3" in state.command_problem(3, ("velocity",) * 3)
    problem = state.command_problem(2, ("position", "position"))
    assert "channel 0 is commanded as position" in problem and "only velocity" in problem
    assert state.stats.capabilities_frames == 1


def test_a_new_connection_or_a_controller_restart_forgets_the_capabilities():
    state = LinkState()
    state.receive([capabilities(1, V), telemetry(2, time_ms=5000)], now=1.0, n_bytes=0)
    state.new_connection(reconnect=True)
    assert state.capabilities is None and not state.capabilities_arrived.is_set()
    state.receive([capabilities(7, V)], now=2.0, n_bytes=0)
    assert state.command_problem(1, ("velocity",)) is None
    state.receive([telemetry(8, time_ms=10)], now=2.1, n_bytes=0)  # went back: restarted, maybe reflashed
    assert state.capabilities is None
    assert state.command_problem(1, ("velocity",)) is not None


def test_capabilities_that_change_hold_commands_for_the_links_life():
    state = LinkState()
    armed = capabilities(1, P, limits=(-1.0, 1.0))
    state.receive([armed], now=1.0, n_bytes=0)
    state.new_connection(reconnect=True)
    same = capabilities(40, P, limits=(-1.0, 1.0))  # another seq, same content: fine
    assert state.receive([same], now=2.0, n_bytes=0) == [CapabilitiesReceived(same)]
    assert state.command_problem(1, ("position",)) is None
    state.new_connection(reconnect=True)
    changed = capabilities(41, P, limits=(-0.5, 0.5))
    assert state.receive([changed], now=3.0, n_bytes=0) == [CapabilitiesReceived(changed, armed=armed)]
    problem = state.command_problem(1, ("position",))
    assert "capabilities changed" in problem and "[-1, 1]" in problem and "[-0.5, 0.5]" in problem
    state.new_connection(reconnect=True)
    state.receive([capabilities(42, P, limits=(-1.0, 1.0))], now=4.0, n_bytes=0)
    assert "capabilities changed" in state.command_problem(1, ("position",))  # sticky: restart the runtime


@pytest.mark.parametrize(("version", "expected"), [
    (1, "speaks serial protocol v1; this runtime speaks v2 only"),
    (3, "speaks serial protocol v3; this runtime speaks v2"),
])
def test_a_controller_of_another_version_is_named_until_capabilities_arrive(version, expected):
    state = LinkState()
    state.note_peer_version(version)
    problem = state.command_problem(2, ("velocity", "velocity"))
    assert expected in problem
    if version == 1:
        assert "flash firmware that implements protocol v2" in problem
    state.receive([capabilities(1, V, V)], now=1.0, n_bytes=0)  # reflashed: it answers now
    assert state.command_problem(2, ("velocity", "velocity")) is None


def test_capabilities_and_telemetry_share_the_controllers_sequence_for_loss_counting():
    state = LinkState()
    state.receive([telemetry(1), capabilities(2, V), telemetry(3)], now=1.0, n_bytes=0)
    assert state.stats.telemetry_lost == 0
    state.receive([telemetry(5)], now=1.1, n_bytes=0)
    assert state.stats.telemetry_lost == 1
