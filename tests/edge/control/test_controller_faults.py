"""What the motor controller reports reaches the safety layer (issue 13, findings 5 and 14-18).

The watch on its own with telemetry built by hand; then the loop closed through the simulated controller
on a pty (edge/control/closed_loop.py), whose fault hooks raise FAULT, lose an EmergencyStop on the
line or restart the firmware.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.control.controller_watch import REJECTION_TICKS, VELOCITY_BOUND, ControllerWatch
from edge.control.loop import Mode
from edge.control.safety import SafetyReason
from edge.control.watchdog_trips import UNEXPLAINED_TRIP_HOLD, WatchdogTrips
from edge.errors import InputError
from edge.inference.bundle import Bundle
from edge.io.protocol import REJECTION_COUNTERS, FaultCode, StatusFlags, Telemetry
from edge.service.loop_control import status_reply
from tests.edge.control.closed_loop import closed_loop
from tests.waiting import HANG_GUARD_S


def sample(status=StatusFlags.MOTORS_ENABLED, velocities=(0.1, -0.1), positions=(1.0, 2.0), crc=0, framing=0,
           dropped=0, seq=1, fault_code=None, **rejections):
    if fault_code is None:
        fault_code = FaultCode.DRIVER if status & StatusFlags.FAULT else FaultCode.NONE
    counters = {"rejected_crc": crc, "rejected_framing": framing, "rejected_estop": dropped, **rejections}
    return Telemetry(seq=seq, controller_time_ms=1000 + seq, velocities=velocities, positions=positions,
                     status=status, last_command_seq=seq, fault_code=fault_code, **counters)


# --- the watch on its own ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("telemetry", "expected"), [
    (sample(velocities=(5.0, 0.0)), "velocity[0] = 5.0 is beyond"),  # finding 17
    (sample(velocities=(0.0, 1e30)), "velocity[1] = 1e+30 is beyond"),
    (sample(velocities=(3.4e38, 0.0)), "is beyond"),
    (sample(velocities=(), positions=()), "0 velocities for 2 channels"),
    (sample(velocities=(0.0,) * 3, positions=(0.0,) * 3), "3 velocities for 2 channels"),
    (sample(velocities=(0.0,) * 8, positions=(0.0,) * 8), "8 velocities for 2 channels"),
    (sample(positions=(0.0,)), "1 positions for 2 channels"),
    (sample(positions=(float("inf"), 0.0)), "position[0] = inf"),
])
def test_telemetry_out_of_bounds_or_of_another_channel_count_is_refused(telemetry, expected):
    problem = ControllerWatch(channels=2).problem(telemetry)
    assert problem is not None and expected in problem


def test_telemetry_within_bounds_is_believed():
    watch = ControllerWatch(channels=2)
    assert watch.problem(sample(velocities=(VELOCITY_BOUND, -1.05))) is None
    assert watch.problem(sample(positions=())) is None  # a controller may send no positions


def test_fault_is_a_fault_and_the_counters_and_flags_are_kept():
    watch = ControllerWatch(channels=2)
    assert watch.observe(sample(crc=4, framing=2, dropped=1, rejected_range=3), estopped=False) is None
    assert watch.counters == {**dict.fromkeys(REJECTION_COUNTERS, 0), "rejected_crc": 4, "rejected_framing": 2,
                              "rejected_estop": 1, "rejected_range": 3}
    assert watch.fault_name == "NONE"
    fault = watch.observe(sample(status=StatusFlags.FAULT, seq=2, dropped=2, fault_code=FaultCode.OVER_TEMPERATURE),
                          estopped=False)
    assert fault is not None and "FAULT OVER_TEMPERATURE" in fault and watch.flag_names == ["FAULT"]
    assert watch.fault_code == FaultCode.OVER_TEMPERATURE and watch.fault_name == "OVER_TEMPERATURE"
    vendor = watch.observe(sample(status=StatusFlags.FAULT, seq=3, fault_code=0x91), estopped=False)
    assert "FAULT VENDOR_0x91" in vendor


def test_a_fault_seen_only_between_two_ticks_is_named_by_the_last_code_seen():
    watch = ControllerWatch(channels=2)
    assert "(code not seen)" in watch.observe(sample(), estopped=False, seen=StatusFlags.FAULT)
    watch.observe(sample(status=StatusFlags.FAULT, seq=2, fault_code=FaultCode.UNDER_VOLTAGE), estopped=False)
    assert "UNDER_VOLTAGE" in watch.observe(sample(seq=3), estopped=False, seen=StatusFlags.FAULT)
    assert watch.fault_code == 0  # the latest sample is healthy again


@pytest.mark.parametrize("counter", ["rejected_crc", "rejected_framing", "rejected_channel_count", "rejected_kind",
                                     "rejected_range", "rejected_estop", "rejected_fault"])
def test_every_rejection_reason_becomes_a_fault_when_it_keeps_growing(counter):
    watch = ControllerWatch(channels=2)
    results = [watch.observe(sample(seq=1 + i, **{counter: i}), estopped=False) for i in range(REJECTION_TICKS + 1)]
    assert results[:-1] == [None] * REJECTION_TICKS
    reason = counter[len("rejected_"):]
    assert results[-1] is not None and f"{reason} {REJECTION_TICKS}" in results[-1]
    assert watch.counters[counter] == REJECTION_TICKS


def test_rejected_commands_become_a_fault_after_a_few_ticks_in_a_row_and_counters_wrap():
    watch = ControllerWatch(channels=2)
    watch.observe(sample(framing=65534), estopped=False)
    results = [watch.observe(sample(framing=(65534 + i) % 65536, seq=1 + i), estopped=False)
               for i in range(1, REJECTION_TICKS + 1)]
    assert results[:-1] == [None] * (REJECTION_TICKS - 1)
    assert results[-1] is not None and "rejects our commands" in results[-1]
    assert watch.observe(sample(framing=1, seq=10), estopped=False) is None, "a calm tick ends it"
    # Dropped commands while a latch is held (ours or the controller's) are expected, not rejections.
    for i in range(REJECTION_TICKS + 1):
        assert watch.observe(sample(framing=1, dropped=i, seq=20 + i), estopped=True) is None
        assert watch.observe(sample(status=StatusFlags.ESTOP_LATCHED, framing=1, dropped=100 + i, seq=40 + i),
                             estopped=False) is None


def test_watchdog_trip_counts_only_after_the_controller_accepted_commands():
    watch = ControllerWatch(channels=2)
    watch.observe(sample(status=StatusFlags.WATCHDOG_TRIPPED), estopped=False)  # power-up: as if tripped
    assert watch.watchdog_trips == 0
    watch.observe(sample(seq=2), estopped=False)
    watch.observe(sample(status=StatusFlags.WATCHDOG_TRIPPED, seq=3), estopped=False)
    watch.observe(sample(status=StatusFlags.WATCHDOG_TRIPPED, seq=4), estopped=False)
    assert watch.watchdog_trips == 1


# --- the loop closed through the simulated controller ------------------------------------------------------


@pytest.fixture()
def rig(reference_bundle):
    threshold = Bundle.load(reference_bundle[0]).uncertainty_threshold("cpu") * 4
    with closed_loop(reference_bundle[0], uncertainty={"threshold": threshold, "hard_ceiling": 1.0}) as pair:
        yield pair


def run_for(loop, seconds, until=None):
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=HANG_GUARD_S)
    assert not thread.is_alive()


def moving(loop) -> bool:
    return bool(np.abs(loop.recorder.latest(1)["command"]).max() > 0.05)


def test_controller_fault_stops_the_robot_then_holds_until_resume(rig):
    controller, loop = rig
    loop.set_instruction(controller.ground_truth().instruction)
    run_for(loop, 3.0, until=lambda: moving(loop))
    assert moving(loop), "the policy drives before the fault"
    fault_at = loop.counters["ticks"]
    controller.set_fault(True, code="OVER_CURRENT")
    run_for(loop, 1.0, until=lambda: loop.status().hold_reason is not None)
    run_for(loop, 0.3)
    records = loop.recorder.latest()
    after = records[records["tick"] >= fault_at]
    stopped = np.flatnonzero(~np.abs(after["command"]).any(axis=1))
    assert len(stopped) > 0, "zero command after FAULT"
    # One zero command and every later one: the stop is immediate (no ramp), and it stays.
    assert not np.abs(after["command"][stopped[0]:]).any()
    status = loop.status()
    assert "FAULT" in status.hold_reason and "FAULT" in status.controller["flags"]
    assert "OVER_CURRENT" in status.controller["fault"]  # the fault code, by name
    assert set(status.controller["counters"]) == set(REJECTION_COUNTERS)  # every reason, by name
    assert "| holding: controller fault" in status.line()  # systemd's STATUS= line says why
    assert loop.counters["controller_faults"] == 1
    with pytest.raises(InputError, match="FAULT"):
        loop.resume()
    reply = status_reply(status)
    assert reply["controller"]["fault"] and reply["hold_reason"] == status.hold_reason
    controller.set_fault(False)
    run_for(loop, 1.0)
    held = loop.recorder.latest(5)
    assert (held["mode"] == Mode.HOLD).all() and not np.abs(held["command"]).any(), "healthy again, still held"
    resumed_at = loop.counters["ticks"]
    loop.resume()
    run_for(loop, 3.0, until=lambda: moving(loop))
    records = loop.recorder.latest()
    records = records[records["tick"] >= resumed_at - 1]
    first = np.flatnonzero(np.abs(records["command"]).any(axis=1))[0]
    dt = records["start_s"][first] - records["start_s"][first - 1]
    assert np.abs(records["command"][first]).max() <= 4.0 * dt + 1e-5, "ramps from zero"


def test_a_lost_emergency_stop_is_repeated_until_the_controller_shows_the_latch(rig):
    controller, loop = rig
    run_for(loop, 0.5)
    controller.drop_next("emergency_stop", 2)  # finding 15: the one frame was lost and never repeated
    loop.emergency_stop()
    assert not controller.ground_truth().estop_latched
    run_for(loop, 2.0, until=lambda: controller.ground_truth().estop_latched and loop.status().controller
            ["estop_confirmed"])
    assert controller.ground_truth().estop_latched
    assert loop.counters["estop_resends"] >= 2
    assert loop.status().controller["estop_confirmed"] is True
    resends = loop.counters["estop_resends"]
    run_for(loop, 0.5)
    assert loop.counters["estop_resends"] == resends, "no more repeats once confirmed"
    # Finding 16: after a controller reset the latch is gone; the host sends it again.
    controller.restart_firmware()
    run_for(loop, 2.0, until=lambda: controller.ground_truth().estop_latched)
    assert controller.ground_truth().estop_latched
    assert loop.counters["estop_resends"] > resends
    assert not np.abs(loop.recorder.latest(10)["command"]).any()


@pytest.mark.parametrize(("velocities", "positions"), [([1e30, 0.0], None), ([0.0] * 3, [0.0] * 3)])
def test_telemetry_out_of_bounds_or_of_another_channel_count_stops_the_robot(rig, velocities, positions):
    controller, loop = rig
    loop.set_instruction(controller.ground_truth().instruction)
    run_for(loop, 3.0, until=lambda: moving(loop))
    assert moving(loop)
    controller.report(velocities=velocities, positions=positions)  # finding 17
    run_for(loop, 0.6)
    records = loop.recorder.latest(3)
    assert (records["mode"] == Mode.FALLBACK).all()
    assert loop.counters["telemetry_rejected"] >= 3
    assert (records["reasons"] & SafetyReason.STALE_TELEMETRY).all()  # treated as missing
    controller.report()
    run_for(loop, 3.0, until=lambda: moving(loop))
    assert moving(loop), "believable telemetry again: the robot drives on"


def first_move_ramps_from_zero(loop, since_tick):
    """The first non-zero command from tick `since_tick` on is at most one slew step (4/s) from zero."""
    records = loop.recorder.latest()
    records = records[records["tick"] >= since_tick - 1]
    first = np.flatnonzero(np.abs(records["command"]).any(axis=1))
    first = first[first > 0][0]
    dt = min(records["start_s"][first] - records["start_s"][first - 1], 3 * 0.1)  # the layer's dt clamp
    return bool(np.abs(records["command"][first]).max() <= 4.0 * dt + 1e-5)


def test_a_trip_the_host_caused_by_its_own_stall_ramps_from_zero_and_drives_on(rig):
    # Finding 14: after a trip the next command jumped straight back. A stall the host saw (no tick for
    # longer than the watchdog) explains the trip: no operator is needed, motion ramps from a stop.
    controller, loop = rig
    loop.set_instruction(controller.ground_truth().instruction)
    run_for(loop, 3.0, until=lambda: moving(loop))
    run_for(loop, 1.0)  # up to speed, the controller accepting our commands
    before = np.abs(loop.recorder.latest(1)["command"]).max()
    assert before > 4.0 * 0.1 + 0.05, "driving faster than one slew step from zero"
    trips = loop.counters["watchdog_trips"]
    time.sleep(0.6)  # no tick: the controller's watchdog stops the motors
    assert controller.ground_truth().watchdog_tripped
    resumed_at = loop.counters["ticks"]
    run_for(loop, 3.0, until=lambda: loop.counters["watchdog_trips"] > trips and moving(loop))
    assert loop.counters["watchdog_trips"] == trips + 1, "read from the telemetry's WATCHDOG_TRIPPED"
    assert loop.trips.explained == 1 and loop.trips.unexplained == 0
    assert loop.status().hold_reason is None and moving(loop), "a trip the host explains needs no operator"
    (first,) = loop.recorder.latest()[loop.recorder.latest()["tick"] == resumed_at]
    assert np.abs(first["command"]).max() <= 4.0 * 0.1 + 1e-5, "slews from zero, not from the command before"


@pytest.mark.parametrize("fault", ["commands lost on the line", "controller restart"])
def test_a_trip_the_host_did_not_cause_stops_and_holds_until_resume(rig, fault):
    # Finding 14 and 18: the host ticked on time and every write was delivered, yet the controller's
    # watchdog stopped the motors (or the controller restarted): read from telemetry, a controlled stop,
    # then the e-stop-clear rule.
    controller, loop = rig
    loop.set_instruction(controller.ground_truth().instruction)
    run_for(loop, 3.0, until=lambda: moving(loop))
    run_for(loop, 0.5)  # the controller accepting our commands
    assert moving(loop)
    trips = loop.counters["watchdog_trips"]
    if fault == "controller restart":
        controller.restart_firmware()
    else:
        controller.drop_next("set_targets", 6)  # 0.6 s of commands never arrive
    run_for(loop, 2.0, until=lambda: loop.status().hold_reason is not None)
    run_for(loop, 0.5)
    # One trip the host did not cause; a pause of this test between two run_for calls may add one it did.
    assert loop.counters["watchdog_trips"] >= trips + 1 and loop.trips.unexplained == 1
    assert loop.status().hold_reason == UNEXPLAINED_TRIP_HOLD
    held = loop.recorder.latest(4)
    assert (held["mode"] == Mode.HOLD).all() and not np.abs(held["command"]).any(), "held at a stop"
    resumed_at = loop.counters["ticks"]
    loop.resume()
    run_for(loop, 3.0, until=lambda: moving(loop))
    assert moving(loop), "resume drives again"
    assert first_move_ramps_from_zero(loop, resumed_at)


def test_a_trip_seen_between_two_ticks_counts():
    watch = ControllerWatch(channels=2)
    watch.observe(sample(), estopped=False)
    assert watch.observe(sample(seq=2), estopped=False, seen=StatusFlags.WATCHDOG_TRIPPED) is None
    assert watch.watchdog_trips == 1
    assert watch.observe(sample(seq=3), estopped=False, seen=StatusFlags.FAULT) is not None


def test_a_controller_restart_counts_as_a_trip_even_when_no_sample_shows_the_flag():
    # Power-up behaves as if the watchdog had tripped (spec, section 6), but our next command may clear the
    # flag before any telemetry carries it; the clock going back still says the motors were stopped.
    watch = ControllerWatch(channels=2)
    watch.observe(sample(), estopped=False)
    restarted = Telemetry(seq=9, controller_time_ms=12, velocities=(0.0, 0.0), positions=(0.0, 0.0),
                          status=StatusFlags.MOTORS_ENABLED, last_command_seq=9)
    assert watch.observe(restarted, estopped=False) is None
    assert watch.watchdog_trips == 1


def test_a_ros2_joint_state_is_checked_for_channels_and_bounds_though_it_has_no_status_flags():
    from edge.control.controller_watch import ControllerWatch
    from edge.io.ros2.sources import JointSample

    watch = ControllerWatch(channels=2)
    good = JointSample(names=("a", "b"), position=(0.1, 0.2), velocity=(0.3, -0.3), effort=(), stamp_s=0.0)
    assert watch.problem(good) is None
    three = JointSample(names=("a", "b", "c"), position=(), velocity=(0.0, 0.0, 0.0), effort=(), stamp_s=0.0)
    assert "3 velocities for 2 channels" in watch.problem(three)
    wild = JointSample(names=("a", "b"), position=(), velocity=(0.0, float("inf")), effort=(), stamp_s=0.0)
    assert "velocity[1]" in watch.problem(wild)


def test_a_restart_holds_even_when_the_link_held_commands_back_meanwhile():
    # Seen in CI: the link's reader saw the restart first and held this tick's command until the new
    # Capabilities arrived; that gap is the restart's consequence, so it must not explain the trip away.
    watch, trips = ControllerWatch(channels=2), WatchdogTrips()
    watch.observe(sample(), estopped=False)
    trips.sent(None)  # held back: the restarted controller has not sent its Capabilities yet
    restarts = watch.restarts
    restarted = Telemetry(seq=9, controller_time_ms=12, velocities=(0.0, 0.0), positions=(0.0, 0.0),
                          status=StatusFlags.MOTORS_ENABLED | StatusFlags.WATCHDOG_TRIPPED, last_command_seq=0)
    watch.observe(restarted, estopped=False)
    assert watch.restarts == restarts + 1 and watch.watchdog_trips == 1
    assert trips.trip(restarted=True) == UNEXPLAINED_TRIP_HOLD
    assert (trips.explained, trips.unexplained) == (0, 1)
    trips.sent(None)  # a later gap of the host's own explains a later trip, as before
    assert trips.trip() is None
