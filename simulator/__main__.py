"""Run the simulated robot (motor controller on a pty + MJPEG camera) as its own process.

    python -m simulator --seed 3 --target "red block" --print-paths [--ground-truth-port 0]
    python -m simulator --kinds position,position,position,position,position,position,position \
        --position-limits -2.5:2.5 --servo-time-constant-s 0.05      # a 7-joint arm, no world motion
    python -m simulator --protocol-version 1                           # a v1 controller (refused)

With ``--print-paths`` the first stdout line is JSON: ``serial`` (the stable symlink to give the
runtime as its motor port), ``pty``, ``camera_url`` and, with ``--ground-truth-port``, ``ground_truth``
as ``host:port``. Logs go to stderr so stdout stays machine-readable. Runs until SIGTERM or SIGINT.

The ground-truth port (127.0.0.1 only; 0 picks a free port) answers JSON lines: send an empty line
or ``ground_truth`` to get ``{"ok": true, "ground_truth": {...}}``; send ``{"cmd": NAME, "args": {...}}``
for reset_episode or a fault hook (unplug, replug, inject_garbage, flip_bits, stop_telemetry,
resume_telemetry, freeze_camera, unfreeze_camera, kill_camera, revive_camera). Tests and the demo
only; the runtime never uses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socketserver
import sys
import threading
from typing import Any

from reference_world.world import OBJECT_NAMES, OOD_VARIANTS, WorldConfig
from simulator.channels import ChannelLayout
from simulator.controller import SimulatedController

logger = logging.getLogger("simulator")

_COMMANDS = (
    "reset_episode",
    "unplug",
    "replug",
    "inject_garbage",
    "flip_bits",
    "stop_telemetry",
    "resume_telemetry",
    "set_fault",
    "drop_next",
    "restart_firmware",
    "report",
    "freeze_camera",
    "unfreeze_camera",
    "kill_camera",
    "revive_camera",
)
_MAX_REQUEST_BYTES = 4096


class _GroundTruthHandler(socketserver.StreamRequestHandler):
    server: GroundTruthServer

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(_MAX_REQUEST_BYTES)
            if not line:
                return
            reply = self.server.answer(line.decode("utf-8", errors="replace").strip())
            try:
                self.wfile.write((json.dumps(reply) + "\n").encode("utf-8"))
            except (BrokenPipeError, ConnectionResetError) as exc:
                logger.debug("ground-truth client went away: %s", exc)
                return


class GroundTruthServer(socketserver.ThreadingTCPServer):
    """JSON-lines request/reply server on 127.0.0.1 for tests and the demo."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, controller: SimulatedController, port: int = 0) -> None:
        self.controller = controller
        super().__init__(("127.0.0.1", port), _GroundTruthHandler)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ground-truth", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> GroundTruthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5.0)

    def answer(self, request: str) -> dict[str, Any]:
        if request in ("", "ground_truth"):
            return {"ok": True, "ground_truth": self.controller.ground_truth().to_dict()}
        try:
            parsed = json.loads(request)
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(parsed, dict):
            return {"ok": False, "error": 'expected {"cmd": NAME, "args": {...}}'}
        name, args = parsed.get("cmd"), parsed.get("args", {})
        if name == "ground_truth":
            return {"ok": True, "ground_truth": self.controller.ground_truth().to_dict()}
        if name not in _COMMANDS:
            return {"ok": False, "error": f"unknown cmd {name!r}; known: ground_truth, {', '.join(_COMMANDS)}"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            getattr(self.controller, name)(**args)
        except (TypeError, ValueError, RuntimeError, OSError) as exc:  # a bad request, reported to the caller
            return {"ok": False, "error": f"{name} failed: {exc}"}
        return {"ok": True, "serial": self.controller.link_path, "pty": self.controller.port_path}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="episode seed (layout, target, lighting)")
    parser.add_argument("--target", choices=OBJECT_NAMES, default=None, help="target object (default: from seed)")
    parser.add_argument("--instruction", default=None, help="instruction text (default: from seed)")
    parser.add_argument("--variant", choices=OOD_VARIANTS, default=None, help="out-of-distribution variant")
    parser.add_argument("--camera-fps", type=float, default=10.0)
    parser.add_argument("--camera-port", type=int, default=0, help="MJPEG port on 127.0.0.1 (0: pick one)")
    parser.add_argument("--telemetry-period-s", type=float, default=0.02)
    parser.add_argument("--watchdog-timeout-s", type=float, default=0.3)
    parser.add_argument("--time-limit-steps", type=int, default=None,
                        help="episode budget reported in ground truth (the simulation never stops)")
    parser.add_argument("--kinds", default="velocity,velocity",
                        help="comma-separated command kind per channel, velocity or position (default: the "
                             "reference robot's two wheels)")
    parser.add_argument("--position-limits", default=None,
                        help="LOW:HIGH for every channel, or one LOW:HIGH per channel separated by commas "
                             "(default: -pi:pi)")
    parser.add_argument("--servo-time-constant-s", type=float, default=0.05,
                        help="first-order time constant of each simulated channel (non-reference layouts)")
    parser.add_argument("--protocol-version", type=int, choices=(1, 2), default=2,
                        help="1 simulates an old controller that the runtime must refuse")
    parser.add_argument("--print-paths", action="store_true",
                        help="print one JSON line with the serial path and camera URL to stdout")
    parser.add_argument("--ground-truth-port", type=int, default=None,
                        help="serve ground truth as JSON lines on 127.0.0.1:PORT (0: pick one)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser.parse_args(argv)


def _layout(args: argparse.Namespace) -> ChannelLayout:
    """The channel layout of the command line; ValueError naming the option when it is malformed."""
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    limits: tuple = ()
    if args.position_limits:
        try:
            pairs = [tuple(float(x) for x in item.split(":")) for item in args.position_limits.split(",")]
        except ValueError:
            raise ValueError(f"--position-limits {args.position_limits!r}: expected LOW:HIGH[,LOW:HIGH...]") from None
        limits = tuple(pairs * len(kinds)) if len(pairs) == 1 else tuple(pairs)
    return ChannelLayout(kinds=kinds, position_limits=limits, time_constant_s=args.servo_time_constant_s)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # stderr, not stdout: stdout carries the JSON line a parent process parses.
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    world_config = WorldConfig()
    if args.time_limit_steps is not None:
        world_config = WorldConfig(time_limit_steps=args.time_limit_steps)
    try:
        layout = _layout(args)
        controller = SimulatedController(
            world_config=world_config,
            seed=args.seed,
            instruction=args.instruction,
            target=args.target,
            variant=args.variant,
            camera_fps=args.camera_fps,
            telemetry_period_s=args.telemetry_period_s,
            watchdog_timeout_s=args.watchdog_timeout_s,
            camera_port=args.camera_port,
            layout=layout,
            protocol_version=args.protocol_version,
        )
    except ValueError as exc:
        logger.error("cannot start the simulator: %s", exc)
        return 2
    with controller:
        ground_truth = None
        if args.ground_truth_port is not None:
            ground_truth = GroundTruthServer(controller, args.ground_truth_port).start()
        try:
            paths = {"serial": controller.link_path, "pty": controller.port_path,
                     "camera_url": controller.camera_url}
            if ground_truth is not None:
                paths["ground_truth"] = f"127.0.0.1:{ground_truth.port}"
            if args.print_paths:
                print(json.dumps(paths), flush=True)
            logger.info("simulator running: %s", paths)
            while not stop.is_set():
                stop.wait(0.5)  # a timed wait lets the signal handler run promptly
        finally:
            if ground_truth is not None:
                ground_truth.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
