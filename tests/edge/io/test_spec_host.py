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
import time
import tty
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.control.controller_watch import REJECTION_TICKS, ControllerWatch
from edge.control.watchdog_trips import UNEXPLAINED_TRIP_HOLD, WatchdogTrips
from edge.io.link_state import LinkState
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from edge.io.protocol import (
    Capabilities,
    ChannelCapability,
    FrameDecoder,
    GetCapabilities,
    SetTargets,
    StatusFlags,
    Telemetry,
    encode,
)
from tests.edge.control import test_controller_faults
from tests.edge.io import test_motor_link
from tests.edge.service import test_controller_check
from tests.waiting import wait_until

SPEC = Path(__file__).resolve().parents[3] / "docs" / "serial-protocol.md"


def telemetry(seq=1, echoed=0, status=StatusFlags.MOTORS_ENABLED, time_ms=1000, framing=0, dropped=0,
              velocities=(0.0, 0.0), kind=0):
    return Telemetry(seq=seq, controller_time_ms=time_ms, velocities=velocities, positions=(0.0, 0.0),
                     status=status, last_command_seq=echoed, rejected_framing=framing, rejected_estop=dropped,
                     rejected_kind=kind)


WHEELS = Capabilities(seq=100, firmware_version=(2, 0, 0), channels=(ChannelCapability(("velocity",)),) * 2,
                      watchdog_timeout_ms=300, telemetry_period_ms=20)


def read_pty(leader: int, quiet_s: float = 0.3) -> bytes:
    data = b""
    while select.select([leader], [], [], quiet_s)[0]:
        data += os.read(leader, 4096)
    return data


def on_a_pty(script) -> bytes:
    """Run `script(link, leader)` on a fresh link to a real tty; returns every byte the host wrote."""
    leader, follower = os.openpty()
    tty.setraw(follower)
    try:
        link = SerialMotorLink(MotorLinkConfig(port=os.ttyname(follower), exclusive=False, low_latency=False))
        with link:
            written = script(link, leader)
        return written + read_pty(leader)
    finally:
        os.close(follower)
        os.close(leader)


def answered(n_frames: int):
    """A script: answer the first GetCapabilities, then send `n_frames` commands."""
    def script(link, leader):
        decoder = FrameDecoder()
        data = b""
        assert wait_until(lambda: select.select([leader], [], [], 0.05)[0])
        data += os.read(leader, 4096)
        assert isinstance(decoder.feed(data)[0], GetCapabilities)
        os.write(leader, encode(WHEELS))
        assert link.wait_for_capabilities(5.0) == WHEELS
        for _ in range(n_frames):
            assert link.send_targets([0.0, 0.0]).delivered
        return data
    return script


def check_first_seq():
    messages = FrameDecoder().feed(on_a_pty(answered(2)))
    assert [m.seq for m in messages] == [1, 2, 3]
    assert [type(m) for m in messages] == [GetCapabilities, SetTargets, SetTargets]


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
    # Who caused it: a gap the host saw explains trips until a command sent after it is confirmed.
    trips = WatchdogTrips()
    assert trips.trip() == UNEXPLAINED_TRIP_HOLD  # commands sent on time: hold
    trips.host_gap("control loop stalled for 0.70 s")
    assert trips.trip() is None  # the host's own stall: drive on, ramping from a stop
    after = SimpleNamespace(delivered=True)
    trips.sent(after)
    trips.settle(tripped_now=True, is_confirmed=lambda sent: True)  # still tripped: the gap is not over
    assert trips.trip() is None
    trips.settle(tripped_now=False, is_confirmed=lambda sent: False)  # clean, but not yet confirmed
    assert trips.trip() is None
    trips.settle(tripped_now=False, is_confirmed=lambda sent: sent is after)
    assert trips.trip() == UNEXPLAINED_TRIP_HOLD  # commands arrive again: a new trip is not ours
    trips.sent(SimpleNamespace(delivered=False))  # link down: a gap
    assert trips.trip() is None
    trips.sent(None)  # nothing sent at all
    assert trips.trip() is None and (trips.explained, trips.unexplained) == (5, 2)
    # The loop side, closed through the simulated controller.
    assert callable(test_controller_faults.test_a_trip_the_host_caused_by_its_own_stall_ramps_from_zero_and_drives_on)
    assert callable(test_controller_faults.test_a_trip_the_host_did_not_cause_stops_and_holds_until_resume)


def check_rejections_are_a_fault():
    for counter in ("framing", "kind"):
        watch = ControllerWatch(channels=2)
        faults = [watch.observe(telemetry(seq=i, **{counter: i}), estopped=False) for i in range(REJECTION_TICKS + 1)]
        assert faults[:-1] == [None] * REJECTION_TICKS and "rejects" in faults[-1]
        assert f"{counter} {REJECTION_TICKS}" in faults[-1]  # the reason is named
        assert watch.counters[f"rejected_{counter}"] == REJECTION_TICKS
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
    state.receive([SetTargets(seq=3, targets=(0.0, 0.0)), GetCapabilities(seq=4)], now=1.0, n_bytes=0)
    stats = state.stats
    assert stats.ignored_frames == 2 and stats.framing_errors == 0 and state.latest()[0] is None
    # The controller side: tests/simulator/test_controller.py counts our Telemetry in rejected_framing.


def check_leading_zero():
    data = on_a_pty(answered(1))
    assert data[:1] == b"\x00" and data[1:2] != b"\x00"


def check_capabilities_requested_and_commands_held():
    def script(link, leader):
        sent = [link.send_targets([0.1, 0.1]) for _ in range(3)]
        assert not any(c.delivered for c in sent) and link.stats.held_commands == 3
        time.sleep(0.35)  # unanswered: asked again every 100 ms
        data = read_pty(leader, 0.05)
        asked = FrameDecoder().feed(data)
        assert len(asked) >= 3 and all(isinstance(m, GetCapabilities) for m in asked)
        assert [m.seq for m in asked] == list(range(1, len(asked) + 1))
        os.write(leader, encode(WHEELS))
        assert link.wait_for_capabilities(5.0) == WHEELS
        read_pty(leader, 0.15)  # a last GetCapabilities may have crossed the answer
        assert link.send_targets([0.1, 0.1]).delivered
        after = FrameDecoder().feed(read_pty(leader, 0.3))
        assert [type(m) for m in after] == [SetTargets], "asking stops once the answer arrived"
        return b""

    on_a_pty(script)
    # On a reconnect and after a controller restart the connection's capabilities are forgotten, so the
    # reader asks again: tests/edge/io/test_link_state.py and test_motor_link.py check both.
    assert callable(test_motor_link.test_a_reconnect_asks_for_capabilities_again)


def check_capabilities_change_stops_commands():
    state = LinkState()
    state.receive([WHEELS], now=1.0, n_bytes=0)
    state.new_connection(reconnect=True)
    three = Capabilities(seq=7, firmware_version=(2, 1, 0), channels=WHEELS.channels * 2,
                         watchdog_timeout_ms=300, telemetry_period_ms=20)
    state.receive([three], now=2.0, n_bytes=0)
    assert "capabilities changed" in state.command_problem(2, ("velocity", "velocity"))


def startup_check(name: str):
    def check():
        test = getattr(test_controller_check, name, None)
        assert callable(test), f"{name} is gone from tests/edge/service/test_controller_check.py"

    check.__name__ = f"start-up check: {name}"
    return check


def motor_link_test(name: str):
    def check():
        test = getattr(test_motor_link, name, None)
        assert callable(test), f"{name} is gone from tests/edge/io/test_motor_link.py"

    check.__name__ = f"motor link: {name}"
    return check


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
    ("The host treats FAULT like an emergency stop: the command becomes a stop at once, and after FAULT clears "
     "the host holds until an operator resumes or gives a new instruction, then ramps from a stop. It reports "
     "the fault code by name in its status.",
     closed_loop_test("test_controller_fault_stops_the_robot_then_holds_until_resume")),
    ("When WATCHDOG_TRIPPED appears after the controller had accepted commands (in any sample between two ticks), "
     "or the controller restarts, the host ramps its next motion from a stop, never from the command sent before "
     "the trip. A trip the host caused itself (its loop stalled past the watchdog, or a command did not reach the "
     "link, and no command sent after that was confirmed yet) needs no operator; after any other trip, a "
     "controller restart included, the host holds until an operator resumes or gives a new instruction.",
     check_watchdog_trip_counted),
    ("When any of the controller's rejection counters grows on three control ticks in a row (for "
     "`rejected_estop` and `rejected_fault`: outside a latch or FAULT), the host treats it as FAULT. Its status "
     "shows every counter by reason.", check_rejections_are_a_fault),
    ("The host computes counter increments as `(new - old) mod 65536`.", check_counter_wrap),
    ("The host treats telemetry that breaks the \"Telemetry values\" rule as missing, which stops the robot.",
     check_telemetry_values),
    ("The host counts a lost frame for each gap in the controller's seq, and a controller reset when "
     "`controller_time_ms` goes backwards.", check_lost_telemetry_and_reset),
    ("The host drops a valid frame of a host-to-controller type that it receives (an echoing adapter, a loopback) "
     "and counts it as ignored, not as a framing error; a controller counts a Telemetry or Capabilities frame it "
     "receives in `rejected_framing`.", check_other_direction_ignored),
    ("The host sends a leading 0x00 before its first frame on every (re)opened port.", check_leading_zero),
    ("The host sends GetCapabilities on every (re)opened port and after a controller restart, and repeats it "
     "every 100 ms until Capabilities arrives. It sends no SetTargets on a connection before that connection's "
     "Capabilities arrived.", check_capabilities_requested_and_commands_held),
    ("Before it arms (`vla-edge run`, before the first command) the host checks the Capabilities against the "
     "policy bundle's action spec: the channel count equals the action dimension, every channel supports the "
     "kind the bundle gives it, and for every position channel [position_min, position_max] covers the bundle's "
     "[low, high]. Any mismatch ends start-up with exit code 78 and a message naming each channel and what "
     "differs. No Capabilities within 2 s is the same error (\"the controller did not answer GetCapabilities\").",
     startup_check("test_every_mismatch_is_named_by_channel")),
    ("When a later Capabilities (after a reconnect or a controller restart) differs from the one the host armed "
     "with, the host sends no more SetTargets (the controller's watchdog stops the motors) and reports the "
     "difference; a restart of the runtime re-checks it.", check_capabilities_change_stops_commands),
    ("The host clamps each target to its kind's range before encoding (velocity to [-1, 1], position to the "
     "announced limits) and returns what it sent, so a frame it sends is never rejected for range.",
     motor_link_test("test_targets_are_clipped_to_their_kind_and_the_announced_limits")),
    ("The host refuses protocol-v1 controllers (section 8): when the frames it receives carry version 1, it "
     "reports \"the motor controller speaks serial protocol v1; this runtime speaks v2 only\", says to flash "
     "firmware that implements v2, and never arms.", startup_check("test_a_v1_controller_is_refused_with_what_to_flash")),
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
    messages = FrameDecoder().feed(encode(SetTargets(seq=9, targets=(0.5,))) + encode(telemetry(seq=2)))
    assert [type(m).__name__ for m in messages] == ["SetTargets", "Telemetry"]
