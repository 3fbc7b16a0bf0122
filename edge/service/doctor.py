"""`vla-edge doctor --config FILE`: check, before the robot moves, everything `vla-edge run` will need.

The systemd unit runs it as ExecStartPre= inside the service's own sandbox, so a missing device, a
permission the sandbox withholds or a bundle built for another GPU shows up as one readable line
instead of a failed start half-way through. One line per check:

    OK    bundle: /var/lib/vla-edge/bundle: 23 files match their sha256
    WARN  realtime: ... -> what to do
    FAIL  serial: /dev/vla-motor does not exist -> what to do

Exit status 1 if any check FAILed, else 0 (WARN: the robot runs, with less margin). Note that systemd's
RestartPreventExitStatus= applies to the main process only, not to ExecStartPre= (systemd issue
#11868): a failing doctor is retried until the unit's start limit, then the unit stays failed.

`--running` is the health check of a running service (the container's HEALTHCHECK): it skips what only
matters before a start (re-hashing the bundle, the inference backends, the metrics port being free)
and asks the service itself over its control socket whether its motor link and camera are up.

Nothing here opens the serial port (opening a tty toggles DTR, which resets some controllers, and
would compete with a running service for its lock) or blocks on a stream: `--open-camera` does a
real camera open, bounded by `--camera-timeout-s`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge.errors import BundleError, ConfigError, EdgeError
from edge.inference.bundle import REBUILD, Bundle
from edge.service import startup, wiring
from edge.service.checks import CheckResult, Status, _user_name, fail, ok, warn
from edge.service.config import DIRECTORY_DEFAULTS, RobotConfig, load_config
from edge.service.device_checks import (  # noqa: F401 - _opencv_has: the tests ask it what OpenCV has
    _check_camera_source,
    _opencv_has,
    check_camera,
    check_realtime,
    check_serial,
)
from edge.service.jetson_power import check_jetson_power

logger = logging.getLogger(__name__)


# --- config and bundle --------------------------------------------------------------------------------


def check_config(path: str | Path, environ: Mapping[str, str] | None = None) -> tuple[CheckResult, RobotConfig | None]:
    try:
        config = load_config(path, environ=environ)
    except ConfigError as exc:
        return fail("config", str(exc), "fix the key named above (every key is described in "
                    "systemd/robot.example.yaml)"), None
    policy = config.policy
    return ok("config", f"{path} loads: target {policy.target} on {policy.backend}"
              f"{' (' + policy.device + ')' if policy.backend == 'onnxruntime' else ''}, "
              f"{config.loop.rate_hz:g} Hz, bundle {config.bundle}"), config


def _rebuild(bundle_dir: str | Path) -> str:
    return REBUILD.replace("<bundle dir>", str(bundle_dir))


def check_bundle(config: RobotConfig) -> tuple[list[CheckResult], Bundle | None]:
    unreadable = startup.bundle_access_problems(config.bundle)
    if unreadable:
        return [fail("bundle", p.message, p.fix) for p in unreadable], None
    try:
        bundle = Bundle.load(config.bundle)
    except BundleError as exc:
        message = str(exc).replace(REBUILD, _rebuild(config.bundle))
        fix = None if _rebuild(config.bundle) in message else f"copy the bundle again or rebuild it: {_rebuild(config.bundle)}"
        return [fail("bundle", message, fix)], None
    results = [ok("bundle", f"{bundle.root}: {len(bundle.manifest['files'])} files match their sha256")]
    try:
        bundle.check_runnable()
    except BundleError as exc:  # a bundle this runtime cannot run yet: not ready, say why
        results.append(fail("bundle", str(exc), "run it with a runtime that supports it, or build a policy it runs"))
        return results, None
    # The same checks `vla-edge run` makes before it opens a device (wiring.check_startup): each its own line.
    for problem in startup.policy_problems(bundle, config):
        results.append((fail if problem.fatal else warn)("bundle", problem.message, problem.fix))
    return results, bundle


def check_tuning(bundle: Bundle, config: RobotConfig) -> CheckResult:
    """How run will choose policy.target and threads: as configured, cached by `vla-edge tune` for this
    machine's fingerprint, or measured at start-up (edge/service/tune.py)."""
    from edge.service import tune

    policy = config.policy
    if not policy.needs_tuning:
        return ok("tuning", f"target {policy.target}, threads {policy.threads or 'default'} as configured")
    try:
        key, choice = tune.cached_choice(bundle, config)
        candidates = tune.candidate_targets(bundle, config)
    except EdgeError as exc:
        return fail("tuning", str(exc), "set policy.target to a target the bundle has")
    if choice is not None:
        return ok("tuning", f"cached choice for fingerprint {key} in {tune.cache_path(config)}: {choice.line()}")
    return ok("tuning", f"no cached choice for fingerprint {key}: run measures {', '.join(candidates)} x threads "
              f"{', '.join(map(str, tune.candidate_threads(config)))} within {policy.tune_budget_s:g} s at start-up "
              f"(`vla-edge tune --config FILE` measures longer once and caches it)")


# --- inference backends -------------------------------------------------------------------------------


def check_tensorrt(config: RobotConfig, bundle: Bundle, *, trt: Any = None, cudart: Any = None) -> list[CheckResult]:
    """TensorRT and CUDA importable, a GPU visible, an engine per graph of the target, and each engine's
    key matching this TensorRT version, this GPU and the graph the bundle ships."""
    from edge.inference import cuda
    from edge.inference.backends.tensorrt import TENSORRT_HINT

    results = []
    if trt is None:
        try:
            import tensorrt as trt
        except ImportError:
            return [fail("tensorrt", "TensorRT's Python bindings are not importable", TENSORRT_HINT)]
    version = str(trt.__version__)
    try:
        rt = cudart if cudart is not None else cuda.load_runtime()
        capability = cuda.device_compute_capability(cudart=rt)
        device = cuda.device_name(cudart=rt)
        multiprocessors = str(cuda.device_multiprocessors(cudart=rt))
    except EdgeError as exc:  # BackendError (no cuda-python) or CudaError (no GPU, driver mismatch)
        return [ok("tensorrt", f"TensorRT {version} importable"),
                fail("cuda", str(exc), "in a container, run it with --runtime nvidia; on the robot, check "
                     "`nvidia-smi` or `tegrastats` and that this user is in the 'video'/'render' groups")]
    from edge.inference.backends.tensorrt import tensorrt_version_problem

    too_old = tensorrt_version_problem(version)
    if too_old:
        return [fail("tensorrt", too_old, "flash JetPack 6.1 or newer (TensorRT 10.3), then build the engines: "
                     f"{wiring.engines_command(config.bundle)}")]
    results.append(ok("tensorrt", f"TensorRT {version} on {device} (compute capability {capability}, "
                      f"{multiprocessors} multiprocessors)"))

    fix = f"build the engines on this device: {wiring.engines_command(config.bundle)}"
    from edge.service.tune import candidate_targets

    try:  # target auto: every TensorRT target it may choose
        targets = candidate_targets(bundle, config)
    except BundleError as exc:
        return results + [fail("tensorrt", str(exc), fix)]
    fits = [fit for target in targets for fit in wiring.engine_fit(bundle, target, version, capability,
                                                                  gpu_name=device, multiprocessors=multiprocessors)]
    for fit in fits:
        name = f"engine {fit.graph}/{fit.variant}"
        if fit.problem is not None:
            results.append(fail(name, fit.problem, fix))
        else:
            results.append(ok(name, f"{fit.path} built by TensorRT {version} for sm {capability}, "
                              f"{fit.precision}, from the bundle's graph"))
    return results


def check_onnxruntime(config: RobotConfig, *, ort: Any = None) -> list[CheckResult]:
    if ort is None:
        try:
            import onnxruntime as ort
        except ImportError:
            return [fail("onnxruntime", "onnxruntime is not installed",
                         "pip install onnxruntime (or onnxruntime-gpu from NVIDIA's Jetson wheel index)")]
    providers = list(ort.get_available_providers())
    text = f"onnxruntime {ort.__version__}, providers {', '.join(providers)}"
    if config.policy.device == "cuda" and "CUDAExecutionProvider" not in providers:
        return [fail("onnxruntime", f"{text}: policy.device is cuda but there is no CUDAExecutionProvider",
                     "install onnxruntime-gpu for this JetPack (NVIDIA's Jetson wheel index; the 'gpu' extra) "
                     "instead of onnxruntime, or set policy.device: cpu")]
    return [ok("onnxruntime", f"{text}; running on {config.policy.device}")]


# --- devices ------------------------------------------------------------------------------------------


# --- process limits -----------------------------------------------------------------------------------


# --- ROS 2 ---------------------------------------------------------------------------------------------


def check_ros2(config: RobotConfig, environ: Mapping[str, str] | None = None) -> list[CheckResult]:
    """The ros2: section on this machine, by the start-up validation run applies (startup.ros2_problems);
    one OK line naming the domain, interface and roles when nothing is wrong. Joins no DDS domain."""
    section = config.ros2
    if section is None:
        return []
    problems = startup.ros2_problems(config, environ)
    results = [(fail if p.fatal else warn)("ros2", p.message, p.fix) for p in problems]
    if not any(p.fatal for p in problems):
        topics = ", ".join(f"{role} {getattr(section, role).topic}" for role in section.roles)
        results.append(ok("ros2", f"DDS domain {section.domain_id} on {section.interface_address} (peers "
                          f"{', '.join(section.peers) or 'none'}, multicast "
                          f"{'on' if section.allow_multicast else 'off'}); {topics}"))
    return results


# --- service endpoints --------------------------------------------------------------------------------


def check_metrics(config: RobotConfig) -> list[CheckResult]:
    metrics = config.metrics
    if not metrics.enabled:
        return []
    if importlib.util.find_spec("prometheus_client") is None:
        return [fail("metrics", "metrics.enabled is true but prometheus-client is not installed",
                     "pip install 'vla-edge[metrics]', or set metrics.enabled: false")]
    if metrics.port == 0:
        return [ok("metrics", f"{metrics.host}, a free port picked at start")]
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        probe.bind((metrics.host, metrics.port))
    except OSError as exc:
        return [fail("metrics", f"cannot listen on {metrics.host}:{metrics.port}: {exc.strerror or exc}",
                     f"another process holds the port (`ss -ltnp 'sport = :{metrics.port}'`): stop it or change "
                     "metrics.port")]
    finally:
        probe.close()
    return [ok("metrics", f"http://{metrics.host}:{metrics.port}/metrics can be served")]


def check_control_socket(config: RobotConfig, environ: Mapping[str, str] | None = None) -> list[CheckResult]:
    path_text = config.instruction.socket
    if not path_text:
        return []
    env = os.environ if environ is None else environ
    path = Path(path_text)
    directory = path.parent
    if not directory.is_dir():
        if "RUNTIME_DIRECTORY" not in env and str(directory) == DIRECTORY_DEFAULTS["RUNTIME_DIRECTORY"]:
            # Run by hand while the service is stopped: systemd creates (and removes) this directory.
            return [warn("control socket", f"{directory} does not exist yet; the unit's RuntimeDirectory= "
                         "creates it when the service starts", None)]
        return [fail("control socket", f"directory {directory} does not exist",
                     "under systemd it is the RuntimeDirectory (/run/vla-edge, created at start); by hand, "
                     "create it or change instruction.socket")]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [fail("control socket", f"{directory} is not writable by {_user_name()}",
                     "fix its owner, or use ${RUNTIME_DIRECTORY}/control.sock in instruction.socket")]
    if path.exists() and not stat.S_ISSOCK(os.lstat(path).st_mode):
        return [fail("control socket", f"{path} exists and is not a socket", "remove it or change "
                     "instruction.socket")]
    return [ok("control socket", f"{path} can be created")]


def check_running_service(config: RobotConfig, timeout_s: float = 2.0) -> list[CheckResult]:
    """Ask the running service for its status over the control socket."""
    from edge.service.control_protocol import send_request

    path = config.instruction.socket
    if not path:
        return [warn("service", "instruction.socket is not set, so the running service cannot be asked",
                     "set instruction.socket (e.g. ${RUNTIME_DIRECTORY}/control.sock)")]
    try:
        reply = send_request(path, {"cmd": "status"}, timeout_s=timeout_s)
    except EdgeError as exc:
        return [fail("service", str(exc), None)]
    if not reply.get("ok"):
        return [fail("service", f"status refused: {reply.get('error')}", None)]
    results = []
    link = reply.get("link") or {}
    camera = reply.get("camera") or {}
    counters = reply.get("counters") or {}
    summary = f"mode {reply.get('mode')}, {counters.get('ticks', '?')} ticks, {reply.get('overruns', '?')} overruns"
    if not link.get("connected"):
        results.append(fail("service", f"{summary}; the motor link is down (the robot holds still)",
                            "check the cable and the motor controller's power; the service reconnects by itself"))
    stale_s = config.camera.stale_after_s if config.camera is not None else config.ros2.camera.stale_after_s
    frame_age = camera.get("frame_age_s")
    if not isinstance(frame_age, (int, float)) or not frame_age <= stale_s:
        results.append(fail("service", f"{summary}; the camera's latest frame is {frame_age} s old "
                            f"(stale after {stale_s:g} s)", "check the camera; the service reconnects by itself"))
    if reply.get("estop"):
        results.append(warn("service", f"{summary}; the emergency stop is latched", "vla-edge clear"))
    elif reply.get("hold_reason"):
        results.append(warn("service", f"{summary}; holding: {reply['hold_reason']}",
                            "vla-edge resume (or a new vla-edge say) once it is safe to move"))
    tuning = (reply.get("tuning") or {}).get("line")
    return results or [ok("service", f"{summary}; link and camera up" + (f"; policy {tuning}" if tuning else ""))]


# --- all of it ----------------------------------------------------------------------------------------


def run_checks(config_path: str | Path, *, open_camera: bool = False, camera_timeout_s: float = 5.0,
               running: bool = False, environ: Mapping[str, str] | None = None, trt: Any = None,
               cudart: Any = None, ort: Any = None) -> list[CheckResult]:
    """Every check, in the order the service needs them; `running` checks a running service instead of a
    start (see the module docstring). `trt`, `cudart`, `ort` replace those modules (tests)."""
    result, config = check_config(config_path, environ)
    results = [result]
    if config is None:
        return results
    if running:
        if config.motor is not None:
            results.append(check_serial(config.motor))
        results += [_check_camera_source(camera) for camera in (config.cameras or {"": config.camera}).values()
                    if camera is not None]
        return results + check_running_service(config)
    bundle_results, bundle = check_bundle(config)
    results += bundle_results
    if bundle is not None and all(r.status is not Status.FAIL for r in bundle_results):
        if config.policy.backend == "tensorrt":
            results += check_tensorrt(config, bundle, trt=trt, cudart=cudart)
        else:
            results += check_onnxruntime(config, ort=ort)
        results.append(check_tuning(bundle, config))
    results += check_ros2(config, environ)
    if config.motor is not None:  # else the commands go to a ROS 2 topic (ros2.command)
        results.append(check_serial(config.motor))
    for camera in (config.cameras or {"": config.camera}).values():  # every camera of `cameras:`, else the one
        if camera is not None:  # else the frames come from a ROS 2 topic (ros2.camera)
            results += check_camera(camera, open_camera=open_camera, timeout_s=camera_timeout_s)
    results += check_realtime(config)
    results += check_jetson_power()  # nothing off a Jetson
    results += check_metrics(config)
    results += check_control_socket(config, environ)
    return results


def exit_status(results: list[CheckResult]) -> int:
    return 1 if any(r.status is Status.FAIL for r in results) else 0


def format_results(results: list[CheckResult]) -> str:
    counts = {s: sum(r.status is s for r in results) for s in Status}
    summary = (f"{counts[Status.FAIL]} FAIL, {counts[Status.WARN]} WARN, {counts[Status.OK]} OK: "
               + ("the service will not start until the FAIL lines are fixed" if counts[Status.FAIL]
                  else "ready to run"))
    return "\n".join([*(r.line() for r in results), summary])


def _doctor(args: argparse.Namespace) -> int:
    if args.json:
        # stdout carries one JSON document: move log lines (camera connect, warnings) to stderr.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
    results = run_checks(args.config, open_camera=args.open_camera, camera_timeout_s=args.camera_timeout_s,
                         running=args.running)
    status = exit_status(results)
    if args.json:
        print(json.dumps({"ok": status == 0, "config": str(args.config),
                          "checks": [r.to_dict() for r in results]}, indent=2))
    else:
        print(format_results(results))
    return status


def add_doctor_command(subparsers) -> argparse.ArgumentParser:
    """Register `vla-edge doctor` on the CLI's subparsers (edge/cli.py)."""
    parser = subparsers.add_parser(
        "doctor", help="check config, bundle, engines, devices and permissions before running",
        description="One line per check (OK / WARN / FAIL with what to do); exit status 1 if any check fails. "
                    "Run by the systemd unit as ExecStartPre=.")
    parser.add_argument("--config", required=True, help="robot configuration file (YAML)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--open-camera", action="store_true",
                        help="also open the camera and wait for a frame (bounded by --camera-timeout-s)")
    parser.add_argument("--camera-timeout-s", type=float, default=5.0,
                        help="longest wait for the first frame with --open-camera (default 5)")
    parser.add_argument("--running", action="store_true",
                        help="health check of a running service: skip the start-up checks (bundle hashes, "
                             "backends, free metrics port) and ask the service over its control socket")
    parser.set_defaults(handler=_doctor)
    return parser
