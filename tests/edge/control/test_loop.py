"""The control loop closed through the real parts: the simulated controller on a pty (serial link) and
its MJPEG camera stream (OpenCV), the reference bundle on ONNX Runtime."""

import time

import numpy as np
import pytest

from edge.control.loop import Mode
from edge.inference.bundle import Bundle
from tests.edge.control.closed_loop import closed_loop, run_for


@pytest.fixture()
def rig(reference_bundle):
    threshold = Bundle.load(reference_bundle[0]).uncertainty_threshold("cpu") * 4
    pings = []
    with closed_loop(reference_bundle[0], uncertainty={"threshold": threshold, "hard_ceiling": 1.0},
                     on_deadline_met=lambda: pings.append(time.monotonic())) as (controller, loop):
        yield controller, loop, pings


def test_policy_drives_the_robot_to_the_named_object(rig):
    controller, loop, pings = rig
    start = controller.ground_truth()
    loop.set_instruction(start.instruction)
    run_for(loop, 20.0, until=lambda: controller.ground_truth().success)
    truth = controller.ground_truth()
    records = loop.recorder.latest()
    assert (records["mode"] == Mode.NOMINAL).sum() > 5
    assert records["delivered"].all()
    assert np.abs(records["command"]).max() <= 1.0
    assert truth.success or truth.distance_to_target_m < 0.5 * start.distance_to_target_m
    assert len(pings) > 0  # ticks that met their deadline fed the watchdog
    assert truth.last_command_seq > 0 and not truth.watchdog_tripped


def test_frozen_camera_brings_a_controlled_stop(rig):
    controller, loop, _ = rig
    loop.set_instruction(controller.ground_truth().instruction)
    run_for(loop, 1.5)
    controller.freeze_camera()
    run_for(loop, 2.5, until=lambda: controller.ground_truth().motors_stopped)
    run_for(loop, 0.5)
    records = loop.recorder.latest(5)
    assert (records["mode"] == Mode.FALLBACK).all()
    assert np.abs(records["command"][-1]).max() == 0.0
    assert controller.ground_truth().motors_stopped


def test_no_instruction_holds_still(rig):
    controller, loop, _ = rig
    run_for(loop, 1.0)
    records = loop.recorder.latest()
    assert (records["mode"] == Mode.HOLD).all()
    assert not np.abs(records["command"]).any()
    assert controller.ground_truth().motors_stopped


def test_estop_clear_holds_until_resume_and_say_while_latched_is_refused(rig):
    # Issue 13, finding 4: `clear` resumed driving at once, even toward an instruction sent meanwhile.
    from edge.errors import InputError

    controller, loop, _ = rig
    instruction = controller.ground_truth().instruction
    loop.set_instruction(instruction)
    run_for(loop, 1.5, until=lambda: np.abs(loop.recorder.latest(1)["command"]).max() > 0.05)
    assert np.abs(loop.recorder.latest(1)["command"]).max() > 0.05, "the policy drives before the e-stop"
    loop.emergency_stop()
    with pytest.raises(InputError, match="emergency stop is latched"):
        loop.set_instruction("go to the red cube")
    assert loop.instruction == instruction, "a refused say keeps the instruction"
    with pytest.raises(InputError, match="emergency stop is latched"):
        loop.resume()
    run_for(loop, 0.5)
    loop.clear_emergency_stop()
    assert loop.status().hold_reason and not loop.status().estop
    run_for(loop, 1.0)
    held = loop.recorder.latest(5)
    assert (held["mode"] == Mode.HOLD).all() and not np.abs(held["command"]).any()
    assert not any(controller.ground_truth().applied_targets)
    resumed_at = loop.counters["ticks"]
    loop.resume()
    assert loop.status().hold_reason is None
    with pytest.raises(InputError, match="nothing to resume"):
        loop.resume()
    run_for(loop, 1.5, until=lambda: np.abs(loop.recorder.latest(1)["command"]).max() > 0.05)
    records = loop.recorder.latest()
    records = records[records["tick"] >= resumed_at - 1]
    assert records["mode"][0] == Mode.HOLD and not np.abs(records["command"][0]).any(), "held up to the resume"
    nominal = np.flatnonzero(records["mode"] == Mode.NOMINAL)
    assert len(nominal) > 0, "moving again after resume"
    first = nominal[0]
    assert not np.abs(records["command"][first - 1]).any()
    # Slew from zero: the first command after the hold is within one tick's slew (4.0 per s) of zero.
    dt = records["start_s"][first] - records["start_s"][first - 1]
    assert np.abs(records["command"][first]).max() <= 4.0 * dt + 1e-5
    # A new instruction after a clear is the other explicit way to move again.
    loop.emergency_stop()
    loop.clear_emergency_stop()
    run_for(loop, 0.3)
    assert loop.recorder.latest(1)["mode"][0] == Mode.HOLD
    loop.set_instruction(instruction)
    assert loop.status().hold_reason is None
