"""The control loop closed through the real parts, wired by edge.service.wiring as `vla-edge run` wires
them: the simulated controller on a pty (serial link), its MJPEG camera stream (OpenCV) and the
reference bundle on ONNX Runtime. Shared by the loop and status tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from edge.control.loop import ControlLoop
from edge.inference.bundle import Bundle
from edge.io.camera import Camera
from edge.io.motor_link import SerialMotorLink
from edge.service import wiring
from edge.service.config import RobotConfig, config_from_dict
from simulator.controller import SimulatedController

PERIOD_S = 0.1


def robot_config(bundle_dir, controller: SimulatedController, uncertainty: dict[str, float],
                 policy: dict | None = None) -> RobotConfig:
    """The robot config of these rigs: the bundle's cpu target at T = 8 and 10 Hz on the simulator;
    `policy` adds keys to the policy section (replan_every, temporal_ensemble ...)."""
    return config_from_dict({
        "bundle": str(bundle_dir),
        "camera": {"source": controller.camera_url, "open_timeout_s": 10.0},
        "motor": {"port": controller.link_path},
        "policy": {"target": "cpu", "mc_samples": 8, **(policy or {})},
        "safety": {"max_slew_per_s": 4.0, "decel_per_s": 2.0},
        "uncertainty": uncertainty,
        "loop": {"rate_hz": 1.0 / PERIOD_S},
    })


def run_for(loop: ControlLoop, seconds: float, until: Callable[[], bool] | None = None) -> None:
    """Run the loop on its own thread for `seconds` or until `until()`; it must stop when asked."""
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


@contextlib.contextmanager
def closed_loop(bundle_dir, *, uncertainty: dict[str, float], wrap_camera: Callable[[Camera], Any] | None = None,
                policy: dict | None = None, **loop_options) -> Iterator[tuple[SimulatedController, ControlLoop]]:
    """(controller, loop) for the bundle's cpu target at T = 8 and 10 Hz; everything closed afterwards."""
    bundle = Bundle.load(bundle_dir)
    controller = SimulatedController(seed=1_234_567, target="blue ball").start()
    config = robot_config(bundle_dir, controller, uncertainty, policy)
    pipeline = wiring.build_pipeline(bundle, config)
    camera = Camera(config.camera)
    link = SerialMotorLink(wiring.motor_config(bundle, config))
    try:
        pipeline.activate()
        camera.connect()
        link.connect()
        device = wrap_camera(camera) if wrap_camera else camera
        loop = wiring.build_loop(pipeline, device, link, bundle, config, **loop_options)
        try:
            yield controller, loop
        finally:
            loop.close()
    finally:
        link.disconnect()
        camera.disconnect()
        pipeline.close()
        controller.stop()
