"""The control loop closed through the real parts: the simulated controller on a pty (serial link) and
its MJPEG camera stream (OpenCV), the reference bundle on ONNX Runtime."""

import threading
import time

import numpy as np
import pytest

from edge.control.loop import ControlLoop, Mode
from edge.control.safety import SafetyConfig, SafetyLayer
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.io.camera import Camera, CameraConfig
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from simulator.controller import SimulatedController

PERIOD_S = 0.1


@pytest.fixture()
def rig(reference_bundle):
    bundle = Bundle.load(reference_bundle[0])
    controller = SimulatedController(seed=1_234_567, target="blue ball").start()
    camera = Camera(CameraConfig(source=controller.camera_url, open_timeout_s=10.0))
    link = SerialMotorLink(MotorLinkConfig(port=controller.link_path))
    pipeline = PolicyPipeline(bundle, target="cpu", mc_samples=8)
    pipeline.activate()
    camera.connect()
    link.connect()
    safety = SafetyLayer(SafetyConfig(action_low=(-1.0, -1.0), action_high=(1.0, 1.0), max_slew_per_s=(4.0, 4.0),
                                      decel_per_s=(2.0, 2.0), period_s=PERIOD_S))
    gate = UncertaintyGate(GateConfig(threshold=bundle.uncertainty_threshold("cpu") * 4, hard_ceiling=1.0))
    pings = []
    loop = ControlLoop(pipeline, camera, link, safety, gate, PERIOD_S, stale_after_s=3 * PERIOD_S,
                       on_deadline_met=lambda: pings.append(time.monotonic()))
    yield controller, loop, pings
    link.disconnect()
    camera.disconnect()
    pipeline.close()
    controller.stop()


def _run(loop, seconds, until=None):
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_policy_drives_the_robot_to_the_named_object(rig):
    controller, loop, pings = rig
    start = controller.ground_truth()
    loop.set_instruction(start.instruction)
    _run(loop, 20.0, until=lambda: controller.ground_truth().success)
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
    _run(loop, 1.5)
    controller.freeze_camera()
    _run(loop, 2.5, until=lambda: controller.ground_truth().motors_stopped)
    _run(loop, 0.5)
    records = loop.recorder.latest(5)
    assert (records["mode"] == Mode.FALLBACK).all()
    assert np.abs(records["command"][-1]).max() == 0.0
    assert controller.ground_truth().motors_stopped


def test_no_instruction_holds_still(rig):
    controller, loop, _ = rig
    _run(loop, 1.0)
    records = loop.recorder.latest()
    assert (records["mode"] == Mode.HOLD).all()
    assert not np.abs(records["command"]).any()
    assert controller.ground_truth().motors_stopped
