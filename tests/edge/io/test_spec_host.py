"""The host against every sentence of docs/serial-protocol.md, section 6a ("Host behaviour"), that says what
the host does: one row per sentence, the sentence quoted next to its check (issue 13, finding 20).

Rows whose behaviour needs the whole control loop name the closed-loop test that checks it
(tests/edge/control/test_controller_faults.py, against the simulated controller on a pty); the rest
are checked here against the link's shared state, the controller watch and a real pty.
"""

from __future__ import annotations

import os
import re
import select
import tty
from pathlib import Path

import pytest

from edge.control.controller_watch import REJECTION_TICKS, ControllerWatch
from edge.io.link_state import LinkState
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from edge.io.protocol import FrameDecoder, SetVelocity, StatusFlags, Telemetry, encode
from tests.edge.control import test_controller_faults

SPEC = Path(__file__).resolve().parents[3] / "docs" / "serial-protocol.md"


def telemetry(seq=1, echoed=0, status=StatusFlags.MOTORS_ENABLED, time_ms=1000, framing=0, dropped=0,
              velocities=(0.0, 0.0)):
    return Telemetry(seq=seq, controller_time_ms=time_ms, velocities=velocities, positions=(0.0, 0.0),
                     status=status, last_command_seq=echoed, crc_errors=0, framing_errors=framing,
                     dropped_commands=dropped)


def first_bytes_on_a_pty(n_frames: int = 1) -> bytes:
    """What a fresh link writes to a real tty for `n_frames` commands."""
    leader, follower = os.openpty()
    tty.setraw(follower)
    try:
        link = SerialMotorLink(MotorLinkConfig(port=os.ttyname(follower), exclusive=False, low_latency=False))
        with link:
            for _ in range(n_frames):
                assert link.send_velocity([0.0, 0.0]).delivered
        data = b""
        while select.select([leader], [], [], 0.5)[0]:
            data += os.read(leader, 4096)
        return data
    finally:
        os.close(follower)
        os.close(leader)


def check_first_seq():
    messages = FrameDecoder().feed(first_bytes_on_a_pty(2))
    assert [m.seq for m in messages] == [1, 2]


def check_confirmation():
    state = LinkState()
    state.sent(5, 1.0)
    state.receive([telemetry(seq=1, echoed=4)], now=1.1, n_bytes=0)
    assert not state.echoes(5, 1.0), "an older echo confirms nothing"
    state.receive([telemetry(seq=2, echoed=5)], now=1.2, n_bytes=0)
    assert state.echoes(5, 1.0) and not state.echoes(5, 1.3), "received after the frame, echoing it"


def check_watchdog_trip_counted():
    watch = ControllerWatch(channels=2)
    watch.observe(telemetry(status=StatusFlags.WATCHDOG_TRIPPED), estopped=False)  # power-up
    watch.observe(telemetry(seq=2), estopped=False)
    watch.observe(telemetry(seq=3, status=StatusFlags.WATCHDOG_TRIPPED), estopped=False)
    assert watch.watchdog_trips == 1  # the loop resets its safety layer on each (edge/control/loop.py)
    watch.observe(telemetry(seq=4), estopped=False)  # accepting commands again
    watch.observe(telemetry(seq=5), estopped=False, seen=StatusFlags.WATCHDOG_TRIPPED)  # between two ticks
    assert watch.watchdog_trips == 2
    watch.observe(telemetry(seq=6, time_ms=20), estopped=False)  # the clock went back: a restart
    assert watch.watchdog_trips == 3
    # The loop side: tests/edge/control/test_controller_faults.py,
    # test_a_watchdog_trip_is_read_from_telemetry_and_motion_ramps_from_zero.
    assert callable(test_controller_faults.test_a_watchdog_trip_is_read_from_telemetry_and_motion_ramps_from_zero)


def check_rejections_are_a_fault():
    watch = ControllerWatch(channels=2)
    faults = [watch.observe(telemetry(seq=i, framing=i), estopped=False) for i in range(REJECTION_TICKS + 1)]
    assert faults[:-1] == [None] * REJECTION_TICKS and "rejects" in faults[-1]
    watch = ControllerWatch(channels=2)
    latched = StatusFlags.ESTOP_LATCHED
    assert all(watch.observe(telemetry(seq=i, dropped=i, status=latched), estopped=False) is None
               for i in range(REJECTION_TICKS + 2)), "dropped under a latch is expected"


def check_counter_wrap():
    watch = ControllerWatch(channels=2)
    watch.observe(telemetry(framing=65535), estopped=False)
    watch.observe(telemetry(seq=2, framing=0), estopped=False)  # +1 across the wrap, not -65535
    assert watch._rejecting == 1
    watch.observe(telemetry(seq=3, framing=0), estopped=False)
    assert watch._rejecting == 0


def check_telemetry_values():
    watch = ControllerWatch(channels=2)
    assert watch.problem(telemetry(velocities=(2.5, 0.0))) is not None
    assert watch.problem(telemetry(velocities=(0.0,) * 3)) is not None
    assert watch.problem(telemetry(velocities=(-2.0, 1.1))) is None


def check_lost_telemetry_and_reset():
    state = LinkState()
    state.receive([telemetry(seq=1, time_ms=5000), telemetry(seq=4, time_ms=5060)], now=1.0, n_bytes=0)
    assert state.stats.telemetry_lost == 2
    state.receive([telemetry(seq=5, time_ms=20)], now=1.1, n_bytes=0)
    assert state.stats.controller_resets == 1


def check_other_direction_ignored():
    state = LinkState()
    state.receive([SetVelocity(seq=3, targets=(0.0, 0.0))], now=1.0, n_bytes=0)
    stats = state.stats
    assert stats.ignored_frames == 1 and stats.framing_errors == 0 and state.latest()[0] is None


def check_leading_zero():
    data = first_bytes_on_a_pty(1)
    assert data[:1] == b"\x00" and data[1:2] != b"\x00"


def closed_loop_test(name: str):
    def check():
        test = getattr(test_controller_faults, name, None)
        assert callable(test), f"{name} is gone from tests/edge/control/test_controller_faults.py"

    check.__name__ = f"closed loop: {name}"
    return check


SENTENCES = [
    ("The host's first frame after it starts carries seq 1.", check_first_seq),
    ("The host uses `last_command_seq` to confirm that a frame arrived: a frame counts as confirmed once "
     "telemetry received after it echoes its seq or a later one.", check_confirmation),
    ("The host repeats EmergencyStop, once per control tick, until telemetry shows ESTOP_LATCHED and echoes the "
     "EmergencyStop's seq or a later one.",
     closed_loop_test("test_a_lost_emergency_stop_is_repeated_until_the_controller_shows_the_latch")),
    ("When ESTOP_LATCHED disappears while the host still holds its e-stop (a controller reset), the host sends "
     "EmergencyStop again.",
     closed_loop_test("test_a_lost_emergency_stop_is_repeated_until_the_controller_shows_the_latch")),
    ("The host treats FAULT like an emergency stop: the command becomes zero at once, and after FAULT clears the "
     "host holds until an operator resumes or gives a new instruction, then ramps from zero.",
     closed_loop_test("test_controller_fault_stops_the_robot_then_holds_until_resume")),
    ("When WATCHDOG_TRIPPED appears after the controller had accepted commands (in any sample between two ticks), "
     "or the controller restarts, the host ramps its next motion from zero, never from the command sent before "
     "the trip.", check_watchdog_trip_counted),
    ("When the controller's `crc_errors`, `framing_errors` or (outside a latch or FAULT) `dropped_commands` grow "
     "on three control ticks in a row, the host treats it as FAULT.", check_rejections_are_a_fault),
    ("The host computes counter increments as `(new - old) mod 65536`.", check_counter_wrap),
    ("The host treats telemetry that breaks the \"Telemetry values\" rule as missing, which stops the robot.",
     check_telemetry_values),
    ("The host counts a lost telemetry frame for each gap in the telemetry seq, and a controller reset when "
     "`controller_time_ms` goes backwards.", check_lost_telemetry_and_reset),
    ("The host drops a valid frame of a host-to-controller type that it receives (an echoing adapter, a loopback) "
     "and counts it as ignored, not as a framing error; a controller counts a Telemetry frame it receives in "
     "`framing_errors`.", check_other_direction_ignored),
    ("The host sends a leading 0x00 before its first frame on every (re)opened port.", check_leading_zero),
]


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _host_section() -> list[str]:
    text = SPEC.read_text()
    section = text.split("## 6a. Host behaviour", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"\n\d+\. ", "\n" + section.split("\n\n", 2)[2])
    return [_normalised(item) for item in items if item.strip()]


def test_every_host_sentence_of_the_spec_has_a_row_and_every_row_quotes_the_spec():
    assert [_normalised(quote) for quote, _ in SENTENCES] == _host_section()


@pytest.mark.parametrize(("sentence", "check"), SENTENCES, ids=[f"6a.{i + 1}" for i in range(len(SENTENCES))])
def test_the_host_does_what_the_spec_says(sentence, check):
    check()


def test_telemetry_the_host_receives_from_itself_is_not_confused_with_telemetry():
    # The decoder's view of sentence 11, through the wire format.
    messages = FrameDecoder().feed(encode(SetVelocity(seq=9, targets=(0.5,))) + encode(telemetry(seq=2)))
    assert [type(m).__name__ for m in messages] == ["SetVelocity", "Telemetry"]
