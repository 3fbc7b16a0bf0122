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
import enum
import grp
import importlib.util
import json
import logging
import os
import pwd
import socket
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import BundleError, CameraError, ConfigError, EdgeError
from edge.inference.bundle import REBUILD, Bundle
from edge.inference.engine_key import REBUILD_COMMAND, EngineKey, key_path
from edge.io.camera import Camera, CameraConfig, SourceKind
from edge.io.motor_link import MotorLinkConfig
from edge.service.config import DIRECTORY_DEFAULTS, RobotConfig, load_config

logger = logging.getLogger(__name__)

_CAP_SYS_NICE = 23  # bits of CapEff in /proc/self/status
_CAP_IPC_LOCK = 14
_UNSTABLE_SERIAL_PREFIXES = ("/dev/ttyUSB", "/dev/ttyACM")
_CAMERA_SCHEMES = ("http", "https", "rtsp", "rtsps")
_ARGUS_SOCKET = Path("/tmp/argus_socket")


class Status(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    name: str  # what was checked: config, bundle, tensorrt, engine, onnxruntime, serial, camera, ...
    status: Status
    message: str  # what was found
    fix: str | None = None  # what to do about a WARN or FAIL

    def line(self) -> str:
        text = f"{self.status.value:<5} {self.name}: {self.message}"
        return text + (f" -> {self.fix}" if self.fix else "")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "message": self.message, "fix": self.fix}


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, Status.OK, message)


def warn(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.WARN, message, fix)


def fail(name: str, message: str, fix: str | None = None) -> CheckResult:
    return CheckResult(name, Status.FAIL, message, fix)


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
    try:
        bundle = Bundle.load(config.bundle)
    except BundleError as exc:
        message = str(exc).replace(REBUILD, _rebuild(config.bundle))
        fix = None if _rebuild(config.bundle) in message else f"copy the bundle again or rebuild it: {_rebuild(config.bundle)}"
        return [fail("bundle", message, fix)], None
    results = [ok("bundle", f"{bundle.root}: {len(bundle.manifest['files'])} files match their sha256")]
    policy = config.policy
    targets = sorted(bundle.manifest["targets"])
    if policy.target not in targets:
        results.append(fail("bundle", f"has no target {policy.target!r} (it has {targets})",
                            f"set policy.target to one of {targets}, or rebuild with the options that make "
                            f"{policy.target!r}: {_rebuild(config.bundle)}"))
        return results, bundle
    max_samples = int(bundle.dropout["max_samples"])
    if policy.mc_samples > max_samples:
        results.append(fail("bundle", f"policy.mc_samples {policy.mc_samples} exceeds the bundle's max_samples "
                            f"{max_samples} (the engine profile's largest batch)",
                            f"set policy.mc_samples <= {max_samples}, or rebuild with a larger maximum"))
    return results, bundle


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
    except EdgeError as exc:  # BackendError (no cuda-python) or CudaError (no GPU, driver mismatch)
        return [ok("tensorrt", f"TensorRT {version} importable"),
                fail("cuda", str(exc), "in a container, run it with --runtime nvidia; on the robot, check "
                     "`nvidia-smi` or `tegrastats` and that this user is in the 'video'/'render' groups")]
    results.append(ok("tensorrt", f"TensorRT {version} on {device} (compute capability {capability})"))

    fix = f"build the engines on this device: {REBUILD_COMMAND} --out {config.bundle}"
    engines = {(e.graph, e.variant): e for e in bundle.engines}
    for graph, variant in sorted(bundle.target_variants(config.policy.target).items()):
        name = f"engine {graph}/{variant}"
        entry = engines.get((graph, variant))
        if entry is None:
            results.append(fail(name, f"the bundle has no TensorRT engine for the {variant} {graph} graph "
                                f"(target {config.policy.target})", fix))
            continue
        engine_path = bundle.root / entry.path
        if not engine_path.is_file():
            results.append(fail(name, f"{engine_path} is missing", fix))
            continue
        try:
            built = EngineKey.from_dict({"source_sha256": entry.source_sha256,
                                         "tensorrt_version": entry.tensorrt_version,
                                         "compute_capability": entry.compute_capability,
                                         "precision": entry.precision})
            sidecar = key_path(engine_path)
            if sidecar.is_file():
                on_disk = EngineKey.load(sidecar)
                if on_disk != built:
                    raise BundleError(f"key file {sidecar.name} disagrees with the manifest: "
                                      + "; ".join(on_disk.mismatch(built)))
        except BundleError as exc:
            results.append(fail(name, str(exc), fix))
            continue
        source = bundle.graphs[graph].files.get(variant) if graph in bundle.graphs else None
        source_sha256 = bundle.manifest["files"].get(source, built.source_sha256) if source else built.source_sha256
        required = replace(built, source_sha256=source_sha256, tensorrt_version=version,
                           compute_capability=capability)
        problems = built.mismatch(required)
        if problems:
            results.append(fail(name, f"{entry.path} does not fit: {'; '.join(problems)} (engines run only on "
                                f"the TensorRT version and GPU that built them)", fix))
        else:
            results.append(ok(name, f"{entry.path} built by TensorRT {version} for sm {capability}, "
                              f"{entry.precision}, from the bundle's graph"))
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


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _access_problem(path: Path, st: os.stat_result, mode: int, role_group: str) -> str | None:
    """None when this process may open `path` with `mode`; otherwise a sentence on who may."""
    if os.access(path, mode, effective_ids=os.access in os.supports_effective_ids):
        return None
    group = _group_name(st.st_gid)
    member = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    rights = stat.filemode(st.st_mode)
    owner = st.st_uid
    if member:
        why = f"the group {group!r} has no {'read/write' if mode & os.W_OK else 'read'} permission ({rights})"
    else:
        why = (f"it is {rights}, owner uid {owner}, group {group!r}, and user {_user_name()!r} is not in "
               f"group {group!r}")
    return (f"{why}. Add the user to the group (`sudo usermod -aG {group} {_user_name()}`, then log in again; "
            f"the systemd unit's SupplementaryGroups= lists {role_group})")


def check_serial(motor: MotorLinkConfig) -> CheckResult:
    port = motor.port
    if motor.is_url:
        parts = urlsplit(port)
        scheme = parts.scheme.lower()
        if importlib.util.find_spec(f"serial.urlhandler.protocol_{scheme}") is None:
            return fail("serial", f"{port}: pyserial has no handler for {scheme}://",
                        "use a device path or one of pyserial's URLs (socket://, rfc2217://, loop://, ...)")
        if scheme in ("socket", "rfc2217"):
            try:
                port_number = parts.port
            except ValueError:
                port_number = None
            if not parts.hostname or port_number is None:
                return fail("serial", f"{port}: expected {scheme}://HOST:PORT", None)
        return ok("serial", f"{port}: pyserial URL, not opened by the doctor")
    path = Path(port)
    if not path.exists():
        if path.is_symlink():
            return fail("serial", f"{port} is a dangling link to {os.readlink(path)} (adapter unplugged?)",
                        "plug the motor controller in; check `ls -l /dev/serial/by-id/` and the udev rule")
        return fail("serial", f"{port} does not exist",
                    "check the cable and `ls -l /dev/serial/by-id/`; point motor.port at the adapter's "
                    "/dev/serial/by-id/... path or the udev rule's /dev/vla-motor")
    st = os.stat(path)
    resolved = path.resolve()
    shown = port if resolved == path else f"{port} -> {resolved}"
    if not stat.S_ISCHR(st.st_mode):
        return fail("serial", f"{shown} is not a character device (a serial port is one)",
                    "point motor.port at the controller's tty (/dev/serial/by-id/..., /dev/vla-motor)")
    problem = _access_problem(path, st, os.R_OK | os.W_OK, "dialout")
    if problem:
        return fail("serial", f"{shown}: no read/write access: {problem}", None)
    if port.startswith(_UNSTABLE_SERIAL_PREFIXES):
        return warn("serial", f"{shown} is a character device this user may open, but its number changes when "
                    "USB devices re-enumerate",
                    "use /dev/serial/by-id/... or the udev rule's /dev/vla-motor in motor.port")
    return ok("serial", f"{shown}: character device, readable and writable by {_user_name()}")


def _opencv_has(feature: str) -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith(f"{feature}:"):
            return "YES" in line.split(":", 1)[1]
    return False


def check_camera(camera: CameraConfig, *, open_camera: bool = False, timeout_s: float = 5.0) -> list[CheckResult]:
    results = [_check_camera_source(camera)]
    if open_camera and results[0].status is not Status.FAIL:
        results.append(open_camera_check(camera, timeout_s))
    return results


def _check_camera_source(camera: CameraConfig) -> CheckResult:
    source = camera.source
    kind = camera.source_kind
    if kind is SourceKind.URL:
        parts = urlsplit(str(source).strip())
        try:
            parts.port  # noqa: B018 - parsing is the check: a bad port raises here
        except ValueError as exc:
            return fail("camera", f"{source}: bad port ({exc})", "fix the port in camera.source")
        if parts.scheme.lower() not in _CAMERA_SCHEMES or not parts.hostname:
            return fail("camera", f"{source}: expected {'|'.join(_CAMERA_SCHEMES)}://HOST[:PORT]/...",
                        "fix camera.source")
        return ok("camera", f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''} "
                  "parses; not opened (--open-camera opens it)")
    if kind is SourceKind.GSTREAMER:
        if not _opencv_has("GStreamer"):
            return fail("camera", "camera.source is a GStreamer pipeline but this OpenCV was built without "
                        "GStreamer (pip's opencv-python wheels are)",
                        "use JetPack's OpenCV (apt python3-opencv; a venv with --system-site-packages) and "
                        "uninstall opencv-python(-headless) from the venv")
        if "appsink" not in str(source):
            return fail("camera", "the GStreamer pipeline does not end in appsink", "end camera.source with "
                        "`! appsink drop=true max-buffers=1 sync=false`")
        if "nvarguscamerasrc" in str(source) and not _ARGUS_SOCKET.exists():
            return warn("camera", f"the pipeline uses nvarguscamerasrc but {_ARGUS_SOCKET} is not visible",
                        "check `systemctl status nvargus-daemon`; under the systemd unit add PrivateTmp=no in a "
                        "drop-in (PrivateTmp hides the Argus socket)")
        return ok("camera", "GStreamer pipeline; OpenCV has GStreamer (--open-camera runs it)")
    if kind in (SourceKind.DEVICE_INDEX, SourceKind.V4L2_DEVICE):
        path = Path(f"/dev/video{int(source)}") if kind is SourceKind.DEVICE_INDEX else Path(str(source))
        if not path.exists():
            return fail("camera", f"{path} does not exist", "plug the camera in; `v4l2-ctl --list-devices` and "
                        "`ls -l /dev/v4l/by-id/` list what is there")
        st = os.stat(path)
        if not stat.S_ISCHR(st.st_mode):
            return fail("camera", f"{path} is not a character device (a V4L2 camera is one)", "fix camera.source")
        problem = _access_problem(path, st, os.R_OK | os.W_OK, "video")
        if problem:
            return fail("camera", f"{path}: no read/write access: {problem}", None)
        return ok("camera", f"{path}: character device, readable and writable by {_user_name()}")
    path = Path(str(source))  # a video file
    if not path.is_file():
        return fail("camera", f"video file {path} does not exist" if not path.exists()
                    else f"{path} is not a regular file", "fix camera.source (a device, URL, pipeline or file)")
    if not os.access(path, os.R_OK):
        return fail("camera", f"video file {path} is not readable by {_user_name()}", "fix its permissions")
    return ok("camera", f"video file {path} ({path.stat().st_size} bytes)")


def open_camera_check(camera: CameraConfig, timeout_s: float) -> CheckResult:
    """A real open: the capture thread must deliver a frame within `timeout_s`."""
    bounded = replace(camera, open_timeout_s=max(0.1, min(camera.open_timeout_s, timeout_s)))
    device = Camera(bounded)
    try:
        device.connect()
    except CameraError as exc:
        return fail("camera open", str(exc), None)
    try:
        shape = device.frame_shape
    finally:
        device.disconnect()
    return ok("camera open", f"first frame {'x'.join(map(str, shape or ()))} within {bounded.open_timeout_s:g} s")


# --- process limits -----------------------------------------------------------------------------------


def effective_capabilities() -> int:
    """CapEff of this process (0 where /proc is not readable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError as exc:
        logger.debug("cannot read capabilities: %s", exc)
    return 0


def check_realtime(config: RobotConfig, *, capabilities: int | None = None, getrlimit=None) -> list[CheckResult]:
    import resource

    caps = effective_capabilities() if capabilities is None else capabilities
    getrlimit = getrlimit or resource.getrlimit
    rt = config.realtime
    results = []
    if rt.sched_fifo_priority is not None:
        soft, _hard = getrlimit(resource.RLIMIT_RTPRIO)
        prio = rt.sched_fifo_priority
        if caps & (1 << _CAP_SYS_NICE):
            results.append(ok("realtime", f"SCHED_FIFO {prio} permitted (CAP_SYS_NICE)"))
        elif soft == resource.RLIM_INFINITY or soft >= prio:
            results.append(ok("realtime", f"SCHED_FIFO {prio} permitted (RLIMIT_RTPRIO {_limit(soft)})"))
        else:
            results.append(warn("realtime", f"realtime.sched_fifo_priority is {prio} but RLIMIT_RTPRIO is "
                                f"{_limit(soft)}: the loop will run SCHED_OTHER, with more jitter",
                                f"systemd unit: LimitRTPRIO={prio}; container: --ulimit rtprio={prio}"))
    if rt.lock_memory:
        soft, _hard = getrlimit(resource.RLIMIT_MEMLOCK)
        if caps & (1 << _CAP_IPC_LOCK) or soft == resource.RLIM_INFINITY:
            results.append(ok("realtime", "mlockall permitted"
                              + (" (CAP_IPC_LOCK)" if caps & (1 << _CAP_IPC_LOCK) else " (RLIMIT_MEMLOCK unlimited)")))
        else:
            results.append(warn("realtime", f"realtime.lock_memory is true but RLIMIT_MEMLOCK is {_limit(soft)} "
                                "bytes: memory will not be locked", "systemd unit: LimitMEMLOCK=infinity; "
                                "container: --ulimit memlock=-1"))
    if rt.cpu_affinity is not None and hasattr(os, "sched_getaffinity"):
        available = os.sched_getaffinity(0)
        missing = sorted(set(rt.cpu_affinity) - available)
        if missing:
            results.append(fail("realtime", f"realtime.cpu_affinity lists CPU(s) {missing} this process cannot "
                                f"run on (it may use {sorted(available)})",
                                "fix realtime.cpu_affinity, or the unit's CPUAffinity= / the container's --cpuset-cpus"))
        else:
            results.append(ok("realtime", f"CPUs {list(rt.cpu_affinity)} available"))
    if not results:
        results.append(ok("realtime", "nothing requested (scheduling as started; the unit starts the loop at "
                          "SCHED_FIFO itself)"))
    return results


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


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
    from edge.service.control_socket import send_request

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
    stale_s = config.camera.stale_after_s
    frame_age = camera.get("frame_age_s")
    if not isinstance(frame_age, (int, float)) or not frame_age <= stale_s:
        results.append(fail("service", f"{summary}; the camera's latest frame is {frame_age} s old "
                            f"(stale after {stale_s:g} s)", "check the camera; the service reconnects by itself"))
    if reply.get("estop"):
        results.append(warn("service", f"{summary}; the emergency stop is latched", "vla-edge clear"))
    return results or [ok("service", f"{summary}; link and camera up")]


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
        results.append(check_serial(config.motor))
        results.append(_check_camera_source(config.camera))
        return results + check_running_service(config)
    bundle_results, bundle = check_bundle(config)
    results += bundle_results
    if bundle is not None and all(r.status is not Status.FAIL for r in bundle_results):
        if config.policy.backend == "tensorrt":
            results += check_tensorrt(config, bundle, trt=trt, cudart=cudart)
        else:
            results += check_onnxruntime(config, ort=ort)
    results.append(check_serial(config.motor))
    results += check_camera(config.camera, open_camera=open_camera, timeout_s=camera_timeout_s)
    results += check_realtime(config)
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
