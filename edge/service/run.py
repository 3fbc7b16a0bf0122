"""`vla-edge run --config robot.yaml`: wire bundle, backends, camera, motor link and loop, then run.

Start-up order: load the config -> verify the bundle (readable by this user) -> check the config
against the bundle (edge/service/startup.py, as doctor does) -> activate the backends -> connect camera and
motor link -> the controller's Capabilities against the bundle's action spec (exit 78) -> warm up the pipeline -> control socket and metrics endpoint -> real-time set-up (gc
frozen) -> READY=1 -> loop. Each step is announced as STATUS= for `systemctl status`, so a start that
hangs shows where. Shutdown (SIGTERM/SIGINT): the signal only sets the stop event; the loop notices it
at its next tick boundary (within one period), then STOPPING=1 -> commanded stop (zero velocity) ->
close the sockets, the port and the camera.

Exit status (the unit's RestartPreventExitStatus=78 relies on it):
- 0 after a requested stop;
- 78 (EX_CONFIG) for a ConfigError or BundleError at start: the config or the bundle is wrong, and
  restarting cannot fix it;
- 2 for any other EdgeError (a camera or port that is missing may come back: systemd restarts);
- an unexpected exception propagates (traceback in the journal, exit 1, restarted).

systemd's directories: the config may place the bundle and the control socket in the unit's
StateDirectory / RuntimeDirectory with ${STATE_DIRECTORY} / ${RUNTIME_DIRECTORY} (edge/service/config.py);
a relative path stays relative to the config file.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge.control.loop import ControlLoop
from edge.control.realtime import configure_realtime
from edge.errors import BundleError, ConfigError, EdgeError, InputError
from edge.inference.bundle import REBUILD, Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.io.camera import Camera
from edge.io.motor_link import SerialMotorLink
from edge.service import wiring
from edge.service.config import RobotConfig, load_config
from edge.service.sdnotify import SystemdNotifier
from edge.service.startup import controller_problems, raise_if_fatal

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h
STATUS_EVERY_S = 10.0  # STATUS= while running: often enough for `systemctl status`, rare enough to cost nothing


def exit_code_for(exc: EdgeError) -> int:
    """78 for errors that a restart cannot fix (config, bundle), 2 for the rest."""
    return EXIT_CONFIG if isinstance(exc, (ConfigError, BundleError)) else EXIT_RUNTIME_ERROR


class RobotService:
    """One robot service: ``start()`` (returns False if a stop was requested meanwhile), ``run()``
    (until ``request_stop``), ``shutdown()`` (always; idempotent)."""

    def __init__(self, config: RobotConfig, notifier: SystemdNotifier | None = None):
        self.config = config
        self._owns_notifier = notifier is None
        self.notifier = notifier or SystemdNotifier()
        self.stop_event = threading.Event()
        self.bundle: Bundle | None = None
        self.pipeline: PolicyPipeline | None = None
        self.choice = None  # edge.inference.tuning.TuneChoice: how policy.target and threads were chosen
        self.camera: Camera | None = None  # the first of `cameras`
        self.cameras: dict[str, Camera] = {}  # one per spec camera, by spec name
        self.link: SerialMotorLink | None = None
        self.loop: ControlLoop | None = None
        self.control_socket = None  # edge.service.control_socket.ControlSocketServer when instruction.socket is set
        self.metrics = None  # edge.service.metrics.MetricsServer when metrics.enabled
        self.ros2 = None  # edge.service.ros2_roles.Ros2Roles when the config has a ros2: section
        self.started_s = time.monotonic()
        self._next_status_s = 0.0
        self._shut_down = False

    # -- start-up -----------------------------------------------------------------------------------
    def _step(self, text: str) -> bool:
        """Announce a start-up step; False when a stop was requested (start() then returns early)."""
        if self.stop_event.is_set():
            logger.info("stop requested during start-up, before: %s", text)
            return False
        logger.info("start-up: %s", text)
        self.notifier.status(f"starting: {text}")
        return True

    def start(self) -> bool:
        cfg = self.config
        if not self._step(f"verifying bundle {cfg.bundle}"):
            return False
        self.bundle = wiring.load_bundle(cfg)
        logger.info("bundle %s verified (%d files)", cfg.bundle, len(self.bundle.manifest["files"]))
        budget = cfg.policy.tune_budget_s
        if cfg.policy.needs_tuning and not self._step(f"choosing target and threads (within {budget:g} s)"):
            return False
        self.config = cfg = self._resolve_policy(cfg)
        # The same start-up validation doctor reports (edge/service/startup.py): a fatal problem is a
        # ConfigError, exit 78, before the camera or the port is opened.
        for problem in wiring.check_startup(self.bundle, cfg):
            logger.warning("%s: %s", problem.key, problem.text())
        if not self._step(f"activating {cfg.policy.backend} backends for target {cfg.policy.target}"):
            return False
        self.pipeline = wiring.build_pipeline(self.bundle, cfg, choice=self.choice)
        self.pipeline.activate()
        if not self._connect_devices():
            return False
        if not self._step(f"warming up ({cfg.loop.warmup_ticks} inference passes)"):
            return False
        self._warm_up()
        self.loop = wiring.build_loop(self.pipeline, self.cameras, self.link, self.bundle, cfg,
                                      on_deadline_met=self._on_deadline_met)
        self.loop.start_worker()  # a chunk policy's inference thread, at normal priority (before real-time set-up)
        if cfg.instruction.initial:
            self.loop.set_instruction(cfg.instruction.initial)
        if cfg.instruction.socket:
            from edge.service.control_socket import ControlSocketServer
            from edge.service.loop_control import LoopControl

            self.control_socket = ControlSocketServer(cfg.instruction.socket, LoopControl(self.loop))
            self.control_socket.start()
        if self.ros2 is not None:
            self.ros2.attach(self.loop)  # e-stop and instruction topics in, status topics out
        if cfg.metrics.enabled:
            from edge import __version__
            from edge.service.metrics import LoopCollector, MetricsServer

            labels = {"version": __version__, "target": cfg.policy.target, "backend": cfg.policy.backend,
                      "bundle": str(cfg.bundle)}
            self.metrics = MetricsServer(LoopCollector(self.loop, labels=labels),
                                         port=cfg.metrics.port, host=cfg.metrics.host)
            self.metrics.start()
        self._check_watchdog_interval()
        if self.stop_event.is_set():
            return False
        # Last, on this (the control) thread: the helper threads above keep normal priority, and gc is
        # frozen only once every start-up object exists.
        report = configure_realtime(cfg.realtime)
        logger.info("real-time set-up: applied %s, refused %s", report.applied, report.refused)
        self.notifier.ready(status=f"running {cfg.policy.target} policy at {cfg.loop.rate_hz:g} Hz")
        logger.info("ready %.2f s after start", time.monotonic() - self.started_s)
        return True

    def _resolve_policy(self, cfg: RobotConfig) -> RobotConfig:
        """policy.target/threads: auto made concrete (cached or measured), the choice kept for status."""
        cfg, self.choice = wiring.resolve_policy(self.bundle, cfg)
        return cfg

    def _connect_devices(self) -> bool:
        """The ROS 2 roles first where the config has them (their camera and link are the devices then),
        then the OpenCV camera and the serial link for the roles left on devices."""
        cfg = self.config
        if cfg.ros2 is not None:
            if not self._step(f"joining DDS domain {cfg.ros2.domain_id} on {cfg.ros2.interface_address} for "
                              f"the ROS 2 roles {', '.join(cfg.ros2.roles)}"):
                return False
            self.ros2 = wiring.ros2_roles(cfg)
            self.ros2.connect()  # the image topic's first frame included, when the camera is a topic
        for name, camera in wiring.make_cameras(self.bundle, cfg, self.ros2).items():
            source = camera.config.source if cfg.camera is not None or cfg.cameras else cfg.ros2.camera.topic
            if not self._step(f"connecting camera {name} ({source})"):
                return False
            self.cameras[name] = camera
            self.camera = self.camera or camera
            if not camera.is_connected:
                camera.connect()
        if not self._step(f"connecting motor link {cfg.ros2.command.topic if cfg.motor is None else cfg.motor.port}"):
            return False
        self.link = wiring.make_link(cfg, self.ros2, self.bundle)
        self.link.connect()  # the ROS 2 link connects only what the bridge has not
        if cfg.motor is not None:
            # Before the first command: the controller can carry this bundle's action (exit 78 if not).
            raise_if_fatal(controller_problems(self.link, self.bundle.spec.action))
        return True

    def _warm_up(self) -> None:
        """Run the pipeline a few times so that first-run costs (allocation, page faults, lazy kernel
        selection) happen before the first real tick; encode the initial instruction now."""
        initial = self.config.instruction.initial
        spec = self.bundle.spec
        embedding = None  # a policy without language takes none
        if spec.language is not None:
            embedding = (self.pipeline.cache.encode_now(initial) if initial
                         else np.zeros((1, self.pipeline.bundle.graphs["language"].outputs[0].shape[-1]), np.float32))
        frames = [np.zeros(camera.frame_shape or (240, 320, 3), np.uint8) for camera in self.cameras.values()]
        proprio = np.zeros(spec.proprio.dim, np.float32)
        for _ in range(self.config.loop.warmup_ticks):
            self.pipeline.infer(frames[0] if len(frames) == 1 else frames, proprio, embedding)

    def _check_watchdog_interval(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        period = self.config.loop.period_s
        # A few late ticks in a row are jitter, not a hang; a watchdog that fires on them restarts a
        # working robot.
        if interval < 5 * period:
            logger.warning("systemd's watchdog interval %.3f s is under 5 control periods (%.3f s): a few late "
                           "ticks will make systemd kill the service; raise WatchdogSec=", interval, 5 * period)
        else:
            logger.info("systemd watchdog: %.3f s, pinged by every tick that meets its deadline", interval)

    # -- running ------------------------------------------------------------------------------------
    def _on_deadline_met(self) -> None:
        """Called by the loop after each tick that met its deadline: the systemd watchdog ping, and now and
        then a STATUS= line."""
        self.notifier.watchdog()
        now = time.monotonic()
        if now >= self._next_status_s:
            self._next_status_s = now + STATUS_EVERY_S
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """The STATUS= line, from the loop's published snapshot."""
        return "starting" if self.loop is None else self.loop.status().line()

    def run(self) -> None:
        self.loop.run(self.stop_event)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at its next tick boundary; safe from a signal handler and any thread."""
        if not self.stop_event.is_set():
            logger.info("stopping: %s", reason)
        self.stop_event.set()

    # -- shutdown -----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """STOPPING=1, commanded stop, then close everything; each part even if another failed."""
        if self._shut_down:
            return
        self._shut_down = True
        self.notifier.stopping("commanded stop")
        if self.ros2 is not None:
            self.ros2.detach()  # no e-stop or instruction from a topic into a loop that is stopping
        self._commanded_stop()
        if self.loop is not None:
            logger.info("%s", self.loop.summary_line())
            logger.info("%s", self.loop.keeper.summary())
            self.loop.close()
        parts = [(name, getattr(self, name)) for name in ("control_socket", "metrics", "link")]
        parts += [(f"camera {name}", camera) for name, camera in self.cameras.items()]
        if not self.cameras:
            parts.append(("camera", self.camera))
        parts.append(("ros2", self.ros2))
        for name, part in parts:
            if part is None:
                continue
            try:
                part.stop() if name in ("control_socket", "metrics") else part.disconnect()
            except EdgeError as exc:
                logger.error("closing the %s: %s", name.replace("_", " "), exc)
        if self.pipeline is not None:
            try:
                self.pipeline.close()
            except EdgeError as exc:
                logger.error("closing the pipeline: %s", exc)
        self.notifier.status("stopped")
        if self._owns_notifier:
            self.notifier.close()

    def _commanded_stop(self) -> None:
        link = self.link
        if link is None or not link.is_connected:
            if link is not None:
                logger.warning("motor link is down: no commanded stop; the controller's watchdog stops the motors")
            return
        held = ""
        if self.loop is not None:
            self.loop.stop_motors()
        else:
            # Start-up failed after the port opened: we never commanded motion, but the controller may
            # still hold a previous run's command until its watchdog fires; a stop is always safe.
            stop_targets = getattr(link, "stop_targets", None)  # the serial link holds position channels
            try:
                stop = stop_targets() if stop_targets else np.zeros(wiring.command_width(self.config), np.float32)
            except InputError as exc:
                logger.warning("%s; the controller's watchdog stops the motors", exc)
                return
            for _ in range(3):
                link.send_targets(stop)
            kinds = getattr(getattr(link, "config", None), "kinds", ())
            held = ", position channels held" if "position" in kinds else ""
        logger.info("commanded stop sent (zero velocity%s)", held)


def run_service(config: RobotConfig | str | os.PathLike, *, environ: Mapping[str, str] | None = None) -> int:
    """The service's main(): returns the process exit status (see the module docstring).

    `config` is a loaded RobotConfig or the path of the config file; given a path, a config error also
    exits 78. `environ` (default os.environ) supplies NOTIFY_SOCKET, WATCHDOG_USEC and systemd's
    directories.
    """
    if not faulthandler.is_enabled():
        # A watchdog SIGABRT (or a crash in a native library) then leaves every thread's traceback in
        # the journal, which says where the loop hung.
        faulthandler.enable(all_threads=True)
    env = os.environ if environ is None else environ
    notifier = SystemdNotifier(environ=env)
    service: RobotService | None = None
    stop_requested: list[str] = []

    def on_signal(signum, _frame):
        # Only set a flag here: the loop checks it at its tick boundary (within one period), and the
        # commanded stop runs on the main thread after the loop returns.
        name = signal.Signals(signum).name
        if service is not None:
            service.request_stop(f"received {name}")
        else:
            stop_requested.append(name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not isinstance(config, RobotConfig):
            config = load_config(Path(config), environ=env)
        service = RobotService(config, notifier)
        if stop_requested:
            service.request_stop(f"received {stop_requested[0]} while loading the config")
        try:
            if service.start():
                service.run()
        finally:
            service.shutdown()
    except EdgeError as exc:
        code = exit_code_for(exc)
        message = str(exc)
        if isinstance(exc, BundleError) and isinstance(config, RobotConfig):
            message = message.replace(REBUILD, f"build-engines --int8 --out {config.bundle} --force")
        logger.error("%s", message)
        logger.error("exiting with status %d (%s)", code, "EX_CONFIG: fix the config or bundle; systemd will "
                     "not restart" if code == EXIT_CONFIG else "systemd restarts the service")
        notifier.status(f"failed: {message}")
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        notifier.close()
    return EXIT_OK
