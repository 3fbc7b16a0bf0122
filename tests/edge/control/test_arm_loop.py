"""The 7-DoF tiny bundle (two cameras, no language, chunks of 8, six position joints and a position gripper,
proprio of 14 from telemetry) on ONNX Runtime, wired as `vla-edge run` wires it, against a fake motor
link and fake cameras on a fake clock: commands stay within the limits and slew rates, telemetry feeds
proprio by the spec's sources, and a stop holds the joints where they were commanded."""

from __future__ import annotations

import numpy as np
import pytest

from edge.control.loop import Mode
from edge.inference.bundle import Bundle
from edge.service import wiring
from edge.service.config import config_from_dict
from tests.edge.control.doubles import PERIOD, FakeCamera, FakeClock, FakeLink, wait_until


@pytest.fixture()
def arm(tiny_bundle_dir):
    root = tiny_bundle_dir("arm7")
    bundle = Bundle.load(root)
    names = [c.name for c in bundle.spec.cameras]
    config = config_from_dict({
        "bundle": str(root), "motor": {"port": "/dev/null", "channels": 7},
        "cameras": {n: {"source": f"/dev/video{i}"} for i, n in enumerate(names)},
        "policy": {"target": "cpu", "mc_samples": 8, "replan_every": 2},
        "uncertainty": {"threshold": 1.0, "hard_ceiling": 2.0},
        "loop": {"rate_hz": 1.0 / PERIOD},
    })
    wiring.check_startup(bundle, config)
    clock = FakeClock()
    cameras = {n: FakeCamera(clock, shape=(120, 160, 3), value=60 + 40 * i) for i, n in enumerate(names)}
    link = FakeLink(clock, 7, positions=[0.1 * i for i in range(7)])
    link.velocities = tuple(0.01 * i for i in range(7))
    pipeline = wiring.build_pipeline(bundle, config)
    pipeline.activate()
    seen = []
    infer = pipeline.infer

    def recording_infer(frames, proprio, language):
        seen.append((len(frames), np.array(proprio), language))
        return infer(frames, proprio, language)

    pipeline.infer = recording_infer
    loop = wiring.build_loop(pipeline, cameras, link, bundle, config, clock=clock, sleep=clock.advance)
    try:
        yield bundle, clock, cameras, link, loop, seen
    finally:
        loop.close()
        pipeline.close()


def run_ticks(loop, clock, count):
    rows = []
    worker = loop.chunks.worker
    for _ in range(count):
        rows.append(loop.tick().copy())
        # Inference finishes within the period here: each request is done before the next tick.
        wait_until(lambda: worker.queue_depth == 0 and not worker.in_flight, "the worker never finished")
        clock.advance(PERIOD)
    return np.array(rows)


def test_the_arm_is_driven_within_its_limits_and_slew_and_telemetry_feeds_proprio(arm):
    bundle, clock, _, link, loop, seen = arm
    action = bundle.spec.action
    rows = run_ticks(loop, clock, 20)
    assert (rows["mode"][1:] == Mode.NOMINAL).all(), rows["mode"]
    assert rows["delivered"].all() and len(link.sent) == 20
    commands = np.array(link.sent)
    assert (commands >= np.array(action.low) - 1e-6).all() and (commands <= np.array(action.high) + 1e-6).all()
    steps = np.abs(np.diff(np.vstack([[0.1 * i for i in range(7)], commands]), axis=0))
    assert (steps <= np.array(action.max_slew_per_s) * PERIOD + 1e-5).all(), "slew-limited from the measured pose"
    assert all(n == 2 and language is None for n, _, language in seen), "both cameras, no language"
    expected = np.array([0.1 * i for i in range(7)] + [0.01 * i for i in range(7)], np.float32)
    np.testing.assert_allclose(seen[-1][1], expected, rtol=1e-6)
    stats = loop.status().chunks
    assert stats.replans >= 9 and stats.entry_index == 1 and stats.empty_stops == 0


def test_a_stale_camera_holds_the_joints_at_their_last_target(arm):
    _, clock, cameras, link, loop, _ = arm
    run_ticks(loop, clock, 8)
    next(iter(cameras.values())).fresh = False
    rows = run_ticks(loop, clock, 6)
    stopped = np.flatnonzero(rows["mode"] == Mode.FALLBACK)
    assert len(stopped) >= 2 and stopped[-1] == len(rows) - 1
    sent = np.array(link.sent[-len(rows):])
    last_target = sent[stopped[0] - 1]
    assert np.abs(last_target).max() > 0.05, "the arm was away from 0 when it stopped"
    for i in stopped:
        np.testing.assert_array_equal(sent[i], last_target)  # held, not ramped toward 0
    assert loop.status().stale_cameras == (next(iter(cameras)),)


def test_the_arm_bundle_drives_a_simulated_v2_arm_over_the_serial_link(tiny_bundle_dir):
    """Issue 15, item 8: the 7-DoF bundle through the real serial link (protocol v2, position channels) and
    the simulator's MJPEG stream (both spec cameras read it), as `vla-edge run` wires them."""
    from edge.io.motor_link import SerialMotorLink
    from edge.io.protocol import POSITION
    from edge.service import startup
    from simulator.channels import ChannelLayout
    from simulator.controller import SimulatedController
    from tests.edge.control.closed_loop import run_for

    root = tiny_bundle_dir("arm7")
    bundle = Bundle.load(root)
    action = bundle.spec.action
    controller = SimulatedController(seed=7, layout=ChannelLayout(kinds=(POSITION,) * 7)).start()
    config = config_from_dict({
        "bundle": str(root), "motor": {"port": controller.link_path, "channels": 7},
        "cameras": {c.name: {"source": controller.camera_url, "open_timeout_s": 10.0} for c in bundle.spec.cameras},
        "policy": {"target": "cpu", "mc_samples": 8, "replan_every": 2},
        "uncertainty": {"threshold": 1.0, "hard_ceiling": 2.0},
        "safety": {"max_slew_per_s": 1.0, "decel_per_s": 1.0},
    })
    wiring.check_startup(bundle, config)
    pipeline = wiring.build_pipeline(bundle, config)
    cameras = wiring.build_cameras(bundle, config)
    link = SerialMotorLink(wiring.motor_config(bundle, config))
    loop = None
    try:
        pipeline.activate()
        for camera in cameras.values():
            camera.connect()
        link.connect()
        startup.raise_if_fatal(startup.controller_problems(link, action))  # run's capabilities check
        loop = wiring.build_loop(pipeline, cameras, link, bundle, config)
        run_for(loop, 6.0, until=lambda: loop.status().chunks.replans >= 10)
        records = loop.recorder.latest()
        stats = loop.status().chunks
        truth = controller.ground_truth()
        moving_at = loop.counters["ticks"]
        controller.freeze_camera()  # both spec cameras read this stream: a stop
        run_for(loop, 1.5)
        stopped = loop.recorder.latest()
        stopped = stopped[stopped["tick"] >= moving_at]
        held = controller.ground_truth().applied_targets
    finally:
        if loop is not None:
            loop.close()
        link.disconnect()
        for camera in cameras.values():
            camera.disconnect()
        pipeline.close()
        controller.stop()
    assert stats.replans >= 10 and stats.worker_errors == 0
    sent = records[records["delivered"]]
    assert (records["mode"] == Mode.NOMINAL).sum() > 10 and len(sent) > 10
    assert (sent["command"] >= np.array(action.low) - 1e-6).all()
    assert (sent["command"] <= np.array(action.high) + 1e-6).all()
    steps = np.abs(np.diff(sent["command"], axis=0)).max(axis=1)
    assert (steps <= 1.0 * np.clip(np.diff(sent["start_s"]), 0, 0.3) + 1e-5).all(), "slew-limited targets"
    # The controller applied our position targets: the last ones we sent (float32 on the wire).
    np.testing.assert_allclose(truth.applied_targets, records["command"][-1], atol=1e-5)
    assert not truth.watchdog_tripped and truth.last_command_seq > 0
    # The frozen cameras stop the robot: the joints hold their last targets (a position stop), never 0.
    assert stopped["mode"][-1] == Mode.FALLBACK and set(loop.status().stale_cameras) == set(cameras)
    np.testing.assert_array_equal(stopped["command"][-1], stopped["command"][-2])
    np.testing.assert_allclose(held, stopped["command"][-1], atol=1e-5)
    assert np.abs(np.asarray(held)).max() > 0.01, "held where the arm was, not driven to 0"
