"""The control socket's wire format, shared by the server (edge/service/control_socket.py) and its
clients (`vla-edge say/status/...`, doctor): JSON lines over a UNIX stream socket.

One request per line, one reply line per request, in order::

    {"cmd": "say", "text": "go to the red block"}   set the instruction
    {"cmd": "stop"}                                   clear the instruction (hold: controlled stop)
    {"cmd": "estop"}                                  latch the emergency stop
    {"cmd": "clear"}                                  release the emergency stop (the robot then holds)
    {"cmd": "resume"}                                 end that hold: move again on the current instruction
    {"cmd": "status"}                                 mode, uncertainty, timings, link, camera, counters

Replies are ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; a request may carry an ``"id"``
(string or integer) that the reply echoes. Replies are strict JSON: non-finite numbers become null.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edge.errors import ConfigError, EdgeError
from edge.validation import check_text

DEFAULT_SOCKET_NAME = "control.sock"
DEFAULT_RUNTIME_DIR = "/run/vla-edge"
MAX_TEXT_CHARS = 512
COMMANDS = ("say", "stop", "estop", "clear", "resume", "status")
_FIELDS = {"say": {"cmd", "id", "text"}, "stop": {"cmd", "id"}, "estop": {"cmd", "id"},
           "clear": {"cmd", "id"}, "resume": {"cmd", "id"}, "status": {"cmd", "id"}}
RECV_BYTES = 65536
MAX_SOCKET_PATH_BYTES = 107  # sizeof(sockaddr_un.sun_path) on Linux is 108, one of them the NUL (unix(7))


@dataclass(frozen=True)
class InstructionConfig:
    """The ``instruction:`` section of the robot config: the instruction at start and the socket that
    takes new ones."""

    initial: str | None = None  # instruction at start; None: hold until one arrives on the socket
    socket: str | None = None  # UNIX socket path for instructions and status

    def __post_init__(self) -> None:
        check_text("instruction.initial", self.initial, "a non-empty string or left out", nullable=True)
        check_text("instruction.socket", self.socket, "the path of a UNIX socket (e.g. "
                   "${RUNTIME_DIRECTORY}/control.sock) or left out", nullable=True)
        if self.socket is not None and len(os.fsencode(self.socket)) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(f"instruction.socket is {len(os.fsencode(self.socket))} bytes long, over the "
                              f"{MAX_SOCKET_PATH_BYTES} a UNIX socket path may have (sun_path); use a shorter "
                              "path, e.g. ${RUNTIME_DIRECTORY}/control.sock")


class ControlHandler(Protocol):
    """What the server calls, on its own thread. Each call must return quickly.

    Raising an EdgeError refuses the request with its message; any other exception is logged, counted
    and answered with an internal error.
    """

    def say(self, text: str) -> None: ...

    def stop(self) -> None: ...

    def estop(self) -> None: ...

    def clear(self) -> None: ...

    def resume(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class RequestError(Exception):
    """A request the server refuses; its message is the reply's error."""


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line as a JSON object with a valid (or no) id, or RequestError saying what is wrong."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise RequestError('empty request; send a JSON object such as {"cmd": "status"}')
    try:
        request = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise RequestError(f"request must be a JSON object, got {type(request).__name__}")
    request_id = request.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))
                                   or (isinstance(request_id, str) and len(request_id) > 64)):
        raise RequestError("id must be a string (at most 64 characters) or an integer")
    return request


def validate_request(request: dict[str, Any]) -> None:
    """Check the command and its fields, or raise RequestError saying what is wrong."""
    cmd = request.get("cmd")
    if cmd is None:
        raise RequestError(f"request has no 'cmd'; one of {', '.join(COMMANDS)}")
    if not isinstance(cmd, str):
        raise RequestError(f"cmd must be a string, one of {', '.join(COMMANDS)}; got {type(cmd).__name__}")
    if cmd not in _FIELDS:
        raise RequestError(f"unknown cmd {cmd[:40]!r}; one of {', '.join(COMMANDS)}")
    unknown = sorted(set(request) - _FIELDS[cmd])
    if unknown:
        raise RequestError(f"unknown field(s) for {cmd!r}: {', '.join(k[:40] for k in unknown[:5])}")
    if cmd == "say":
        text = request.get("text")
        if not isinstance(text, str):
            raise RequestError(f"say needs 'text', a string; got {type(text).__name__}")
        if not text.strip():
            raise RequestError("say needs a non-empty text; send {\"cmd\": \"stop\"} to clear the instruction")
        if len(text) > MAX_TEXT_CHARS:
            raise RequestError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _jsonable(value: Any) -> Any:
    """JSON without NaN/Infinity (which strict parsers such as jq refuse): non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    return json.dumps(_jsonable(reply), allow_nan=False, separators=(",", ":")).encode() + b"\n"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """$RUNTIME_DIRECTORY/control.sock (set by systemd for the service) or /run/vla-edge/control.sock."""
    env = os.environ if environ is None else environ
    runtime_dir = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_RUNTIME_DIR
    return os.path.join(runtime_dir, DEFAULT_SOCKET_NAME)


def send_request(path: str | os.PathLike[str], request: dict[str, Any], timeout_s: float = 2.0) -> dict[str, Any]:
    """Send one request and return the reply (``{"ok": false, ...}`` replies are returned, not raised).

    Raises EdgeError when the service cannot be reached or does not answer.
    """
    path = os.fspath(path)
    payload = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError as exc:
            raise EdgeError(f"no control socket at {path}: is the service running? (systemctl status vla-edge; "
                            f"or pass --socket)") from exc
        except PermissionError as exc:
            raise EdgeError(f"permission denied on {path}: add this user to the vla-edge group "
                            f"(sudo usermod -aG vla-edge $USER, then log in again)") from exc
        except ConnectionRefusedError as exc:
            raise EdgeError(f"nothing listens on {path}: the service is not running "
                            f"(systemctl status vla-edge)") from exc
        except OSError as exc:
            raise EdgeError(f"cannot connect to the control socket {path}: {exc}") from exc
        try:
            sock.sendall(payload)
            reply = bytearray()
            while not reply.endswith(b"\n"):
                chunk = sock.recv(RECV_BYTES)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError as exc:
            raise EdgeError(f"the service did not answer on {path} within {timeout_s:g} s") from exc
        except OSError as exc:  # e.g. ECONNRESET: the service went away mid-request
            raise EdgeError(f"control socket {path} failed before the reply: {exc}") from exc
    finally:
        sock.close()
    line = bytes(reply).split(b"\n", 1)[0]
    if not line:
        raise EdgeError(f"the service closed {path} without answering")
    try:
        decoded = json.loads(line)
    except ValueError as exc:
        raise EdgeError(f"the service sent an unreadable reply on {path}: {line[:80]!r}") from exc
    if not isinstance(decoded, dict) or "ok" not in decoded:
        raise EdgeError(f"the service sent an unexpected reply on {path}: {line[:80]!r}")
    return decoded
