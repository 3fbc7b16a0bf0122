"""Opening the motor controller's serial port, with errors that say what to check.

edge.io.motor_link owns the port once it is open; this module only opens it (exclusive, with read and
write timeouts, low latency where the adapter has it, HUPCL cleared when `motor.hangup_on_close` is
false) and names it for log lines.
"""

from __future__ import annotations

import errno
import logging
import os
import termios
from collections.abc import Callable
from typing import Any

import serial

from edge.errors import LinkError

logger = logging.getLogger(__name__)

_MISSING_PORT_HINT = (
    "check the cable and that the adapter is listed in /dev/serial/by-id/ (`ls -l /dev/serial/by-id/`); "
    "put that stable by-id path in the config rather than /dev/ttyUSB* or /dev/ttyACM*, whose numbers "
    "change when devices re-enumerate (the udev rule in systemd/ can add a fixed name)"
)
_PERMISSION_HINT = (
    "the user running the runtime must be in the 'dialout' group to open serial devices "
    "(`sudo usermod -aG dialout $USER`, then log in again, or restart the systemd service)"
)


def open_port(config: Any, factory: Callable[..., Any], read_timeout_s: float, reconnecting: bool = False) -> Any:
    """The opened port of ``config`` (a MotorLinkConfig); LinkError saying what to check when it fails."""
    try:
        port = factory(
            config.port,
            baudrate=config.baudrate,
            timeout=read_timeout_s,
            write_timeout=config.write_timeout_ms / 1000.0,
            exclusive=config.exclusive,
        )
    except (serial.SerialException, OSError, ValueError) as exc:
        raise LinkError(_open_failure_message(config, exc)) from exc
    if config.low_latency:
        _set_low_latency(config.port, port, reconnecting)
    if not config.hangup_on_close:
        _keep_lines_on_close(config.port, port)
    return port


def _keep_lines_on_close(path: str, port: Any) -> None:
    """Clear HUPCL: closing the port no longer drops DTR and RTS, so a reopen is no reset edge for a
    board that resets on DTR. A port without a file descriptor (a URL) has no such lines."""
    try:
        fd = port.fileno()
    except (AttributeError, ValueError, OSError, NotImplementedError, serial.SerialException):
        logger.debug("motor link %s: no tty to clear HUPCL on (%s)", path, type(port).__name__)
        return
    try:
        attrs = termios.tcgetattr(fd)
        attrs[2] &= ~termios.HUPCL  # cflag
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error as exc:
        raise LinkError(f"motor link {path}: cannot clear HUPCL (motor.hangup_on_close: false): {exc}; set "
                        "motor.hangup_on_close: true, or check that the port is a serial tty") from exc
    logger.debug("motor link %s: HUPCL cleared, DTR/RTS stay up across close and reopen", path)


def describe_port(path: str, port: Any) -> str:
    """The port for a log line: the configured path and, for a symlink (by-id), what it points to."""
    name = getattr(port, "name", None) or path
    if "://" not in path and os.path.islink(path):
        return f"{path} -> {os.path.realpath(path)}"
    return str(name)


def _set_low_latency(path: str, port: Any, reconnecting: bool) -> None:
    log = logger.debug if reconnecting else logger.info
    setter = getattr(port, "set_low_latency_mode", None)
    if setter is None:
        log("motor link %s: low-latency mode does not apply to %s", path, type(port).__name__)
        return
    try:
        setter(True)
    except (ValueError, OSError, NotImplementedError) as exc:
        # ptys, CDC-ACM and some adapters have no ASYNC_LOW_LATENCY; they do not need it either.
        log("motor link %s: low-latency mode not supported by this device (%s)", path, exc)
    else:
        logger.debug("motor link %s: low-latency mode on", path)


def _open_failure_message(config: Any, exc: BaseException) -> str:
    path = config.port
    code = getattr(exc, "errno", None)
    text = f"cannot open motor link port {path!r}: {exc}"
    if config.is_url:
        return f"{text}; check the URL and that the remote end is reachable"
    if code == errno.EACCES or code == errno.EPERM:
        return f"{text}; {_PERMISSION_HINT}"
    if code == errno.EWOULDBLOCK or "exclusively lock" in str(exc):
        return (f"{text}; another process holds the port (find it with `fuser -v {path}`) and must be "
                "stopped: two writers would interleave frames")
    if code == errno.ENOENT or not os.path.exists(path):
        return f"{text}; the device {path} does not exist: {_MISSING_PORT_HINT}; {_PERMISSION_HINT}"
    return f"{text}; {_MISSING_PORT_HINT}; {_PERMISSION_HINT}"
