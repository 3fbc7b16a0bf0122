"""Doctor's checks of the devices and the process: serial port, camera source, real-time permissions.

Nothing here opens the serial port (opening a tty toggles DTR, which resets some controllers, and would
compete with a running service for its lock) or blocks on a stream: `open_camera_check` does a real
camera open, bounded by its timeout.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from edge.errors import CameraError
from edge.io.camera import Camera, CameraConfig, SourceKind
from edge.io.motor_link import MotorLinkConfig
from edge.service.checks import CheckResult, Status, _access_problem, _user_name, fail, ok, warn
from edge.service.config import RobotConfig

logger = logging.getLogger(__name__)

_CAP_SYS_NICE = 23  # bits of CapEff in /proc/self/status


_CAP_IPC_LOCK = 14


_UNSTABLE_SERIAL_PREFIXES = ("/dev/ttyUSB", "/dev/ttyACM")


_CAMERA_SCHEMES = ("http", "https", "rtsp", "rtsps")


_ARGUS_SOCKET = Path("/tmp/argus_socket")


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
