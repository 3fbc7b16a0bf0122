"""The control loop closed through the real parts, wired by edge.service.wiring as `vla-edge run` wires
them: the simulated controller on a pty (serial link), its MJPEG camera stream (OpenCV) and the
reference bundle on ONNX Runtime. Shared by the loop and status tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from edge.control.loop import ControlLoop
from edge.inference.bundle import Bundle
from edge.io.camera import Camera
from edge.io.motor_link import SerialMotorLink
from edge.service import wiring
from edge.service.config import config_from_dict
from simulator.controller import SimulatedController

PERIOD_S = 0.1


@contextlib.contextmanager
def closed_loop(bundle_dir, *, uncertainty: dict[str, float], wrap_camera: Callable[[Camera], Any] | None = None,
                **loop_options) -> Iterator[tuple[SimulatedController, ControlLoop]]:
    """(controller, loop) for the bundle's cpu target at T = 8 and 10 Hz; everything closed afterwards."""
    bundle = Bundle.load(bundle_dir)
    controller = SimulatedController(seed=1_234_567, target="blue ball").start()
    config = config_from_dict({
        "bundle": str(bundle_dir),
        "camera": {"source": controller.camera_url, "open_timeout_s": 10.0},
        "motor": {"port": controller.link_path},
        "policy": {"target": "cpu", "mc_samples": 8},
        "safety": {"max_slew_per_s": 4.0, "decel_per_s": 2.0},
        "uncertainty": uncertainty,
        "loop": {"rate_hz": 1.0 / PERIOD_S},
    })
    pipeline = wiring.build_pipeline(bundle, config)
    camera = Camera(config.camera)
    link = SerialMotorLink(config.motor)
    try:
        pipeline.activate()
        camera.connect()
        link.connect()
        device = wrap_camera(camera) if wrap_camera else camera
        yield controller, wiring.build_loop(pipeline, device, link, bundle, config, **loop_options)
    finally:
        link.disconnect()
        camera.disconnect()
        pipeline.close()
        controller.stop()
