"""The robot service's instruction and status socket server: JSON lines over a UNIX stream socket.

The requests and replies are in edge/service/control_protocol.py. Every complete line gets exactly one
reply, whatever its bytes, so a client can always pair replies with requests.

The server is one thread with a selector over non-blocking sockets: a client that stalls mid-line, floods
requests without reading replies, or disconnects rudely costs the others nothing. The handler runs on
that thread and must be quick (set a field, read a snapshot); it never runs on the control loop's thread.

The socket lives in the service's RuntimeDirectory (``/run/vla-edge/control.sock``). systemd starts the
service with ``UMask=0027``, which leaves a socket without group write permission, and ``connect()`` needs
write permission, so the server chmods it (0660 by default) after ``bind()``.
"""

from __future__ import annotations

import grp
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError, EdgeError
from edge.ratelimit import RateLimitedWarnings
from edge.service.control_protocol import (
    RECV_BYTES,
    ControlHandler,
    RequestError,
    decode_request,
    encode_reply,
    error_reply,
    validate_request,
)

logger = logging.getLogger(__name__)

_MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
# A client that sends requests but does not read replies: stop reading from it once this much is
# queued for it, so its replies cannot grow without bound; reading resumes when it drains them.
_MAX_PENDING_REPLY_BYTES = 256 * 1024
_ACCEPT_PAUSE_S = 0.5  # after accept() fails (e.g. out of file descriptors), instead of spinning on it
_WARN_INTERVAL_S = 5.0


@dataclass
class _Client:
    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an oversized line: drop bytes up to its newline
    last_active_s: float = 0.0
    closing: bool = False  # answer what was received, flush, then close (refused, or the client sent EOF)


class ControlSocketServer:
    """JSON-lines control server on a UNIX stream socket, served by one background thread.

    ``start()`` binds (removing a stale socket file first), chmods/chowns and starts the thread;
    ``stop()`` closes every connection and removes the socket file. Usable as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handler: ControlHandler,
        *,
        group: str | None = None,  # chown the socket to this group (when this process may)
        mode: int = 0o660,  # permission bits of the socket file; group members need write to connect
        max_line_bytes: int = 4096,  # longest request line, newline excluded
        max_clients: int = 8,  # connections beyond this get an error reply and are closed
        idle_timeout_s: float | None = 300.0,  # close a client silent for this long (None: never)
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.group = group
        self.mode = mode
        if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 64:
            raise ConfigError(f"control socket max_line_bytes must be an integer >= 64, got {max_line_bytes!r}")
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or not 1 <= max_clients <= 1024:
            raise ConfigError(f"control socket max_clients must be an integer in [1, 1024], got {max_clients!r}")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ConfigError(f"control socket idle_timeout_s must be > 0 s or None, got {idle_timeout_s!r}")
        self.max_line_bytes = max_line_bytes
        self.max_clients = max_clients
        self.idle_timeout_s = idle_timeout_s
        self.counters = {"connections": 0, "refused_connections": 0, "requests": 0, "bad_requests": 0,
                         "oversized_lines": 0, "handler_errors": 0, "internal_errors": 0, "idle_closed": 0}
        self._counters_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._bound_inode: tuple[int, int] | None = None
        self._accept_paused_until_s: float | None = None
        self._warn = RateLimitedWarnings(logger, _WARN_INTERVAL_S)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._check_path()
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.path))
            st = os.stat(self.path)
            self._bound_inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)
            self._apply_group()
            listener.listen(self.max_clients)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            self._unlink_own_socket()
            raise EdgeError(f"cannot serve the control socket at {self.path}: {exc.strerror or exc}; check that "
                            f"its directory exists and is writable by this user") from exc
        except EdgeError:
            listener.close()
            self._unlink_own_socket()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="control-socket", daemon=True)
        self._thread.start()
        logger.info("control socket listening on %s (mode %03o)", self.path, self.mode)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, close every connection and remove the socket file. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError as exc:  # a full wake-up buffer already means "wake up"
            logger.debug("control socket wake-up: %s", exc)
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("control socket thread did not stop within %.1f s", timeout_s)
        self._thread = None
        for client in list(self._clients.values()):
            self._close_client(client)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._wake_r = self._wake_w = None
        self._selector = None
        self._unlink_own_socket()
        logger.info("control socket %s closed", self.path)

    def __enter__(self) -> ControlSocketServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def stats(self) -> dict[str, int]:
        with self._counters_lock:
            return dict(self.counters, clients=len(self._clients))

    # -- set-up ------------------------------------------------------------------------------------------
    def _check_path(self) -> None:
        encoded = os.fsencode(self.path)
        if len(encoded) > _MAX_UNIX_PATH_BYTES:
            raise ConfigError(f"control socket path {self.path} is {len(encoded)} bytes; UNIX socket paths are "
                              f"limited to {_MAX_UNIX_PATH_BYTES} bytes")
        if not self.path.parent.is_dir():
            raise ConfigError(f"control socket directory {self.path.parent} does not exist (under systemd it is "
                              f"the RuntimeDirectory, /run/vla-edge)")

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"control socket path {self.path} exists and is not a socket; refusing to remove it "
                              f"(choose another path or remove the file)")
        # A socket file outlives a crashed server. If something still accepts on it, it is not stale:
        # taking it over would cut another running service off from its operators.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(0.5)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            logger.info("removing stale control socket %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise EdgeError(f"control socket {self.path} exists and cannot be probed ({exc}); is another "
                            f"vla-edge service running?") from exc
        finally:
            probe.close()
        raise EdgeError(f"control socket {self.path} is in use by another process; is another vla-edge service "
                        f"running? (systemctl status vla-edge)")

    def _apply_group(self) -> None:
        if self.group is None:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError as exc:
            raise ConfigError(f"control socket group {self.group!r} does not exist") from exc
        try:
            os.chown(self.path, -1, gid)
        except PermissionError as exc:
            # Under the systemd unit chown is filtered (~@privileged); the socket already has the
            # service's group there, so this is worth a warning, not a refusal to start.
            logger.warning("control socket %s: cannot chown to group %r (%s); members of its current group "
                           "can still connect", self.path, self.group, exc.strerror)

    def _unlink_own_socket(self) -> None:
        """Remove the socket file only if it is still the one this server bound."""
        if self._bound_inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound_inode:
                self.path.unlink()
        except FileNotFoundError:
            logger.debug("control socket %s already removed", self.path)
        except OSError as exc:
            logger.warning("could not remove control socket %s: %s", self.path, exc)
        self._bound_inode = None

    # -- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        selector = self._selector
        while not self._stopping.is_set():
            try:
                events = selector.select(self._select_timeout_s())
            except OSError as exc:  # only EINTR-like failures are expected; do not spin on a broken selector
                self._count("internal_errors")
                logger.error("control socket: select failed (%s); stopping the control socket", exc)
                return
            for key, mask in events:
                try:
                    self._dispatch(key, mask)
                except Exception:  # one client's failure must not end the server
                    self._count("internal_errors")
                    logger.exception("control socket: unexpected error; closing that connection")
                    client = key.data if isinstance(key.data, _Client) else None
                    if client is not None:
                        self._close_client(client)
            try:
                self._housekeeping()
            except Exception:  # same reason as above
                self._count("internal_errors")
                logger.exception("control socket: unexpected error in housekeeping")

    def _select_timeout_s(self) -> float | None:
        timeouts = []
        if self.idle_timeout_s is not None and self._clients:
            timeouts.append(min(1.0, self.idle_timeout_s / 2))
        if self._accept_paused_until_s is not None:
            timeouts.append(max(0.0, self._accept_paused_until_s - time.monotonic()))
        return min(timeouts) if timeouts else None

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "wake":
            try:
                self._wake_r.recv(64)
            except BlockingIOError:
                logger.debug("control socket: spurious wake-up")
            return
        if key.data == "listener":
            self._accept()
            return
        client: _Client = key.data
        if client.sock.fileno() < 0:  # closed earlier in this round; its fd may already be reused
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if mask & selectors.EVENT_READ and client.sock.fileno() >= 0:
            self._read(client)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # e.g. EMFILE: the listener stays readable, so pause accepting instead of spinning on it.
            self._count("internal_errors")
            self._warn("control socket: accept failed (%s); pausing new connections for %.1f s",
                       exc, _ACCEPT_PAUSE_S)
            self._selector.unregister(self._listener)
            self._accept_paused_until_s = time.monotonic() + _ACCEPT_PAUSE_S
            return
        sock.setblocking(False)
        client = _Client(sock, last_active_s=time.monotonic())
        if len(self._clients) >= self.max_clients:
            self._count("refused_connections")
            self._warn("control socket: refusing a connection, %d clients already connected",
                       len(self._clients))
            client.closing = True
            self._queue(client, error_reply(f"too many clients ({self.max_clients} connected); try again later"))
            self._clients[sock.fileno()] = client
            self._flush(client)
            return
        self._count("connections")
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until_s is not None and now >= self._accept_paused_until_s:
            self._accept_paused_until_s = None
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        if self.idle_timeout_s is None:
            return
        for client in list(self._clients.values()):
            if now - client.last_active_s > self.idle_timeout_s:
                self._count("idle_closed")
                logger.info("control socket: closing a client silent for %.0f s", now - client.last_active_s)
                self._close_client(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.debug("control socket: client read failed: %s", exc)
            self._close_client(client)
            return
        if not data:
            # End of the client's requests (it may have half-closed to wait for the replies, as
            # `socat` does): answer the complete lines it sent, then close.
            client.closing = True
            self._flush(client)
            return
        client.last_active_s = time.monotonic()
        client.inbox += data
        self._flush(client)

    def _process(self, client: _Client) -> None:
        """Answer the complete lines in the client's inbox, until its pending replies reach the cap."""
        inbox = client.inbox
        start = 0
        while len(client.outbox) < _MAX_PENDING_REPLY_BYTES:
            newline = inbox.find(b"\n", start)
            if newline < 0:
                break
            line = bytes(inbox[start:newline])
            start = newline + 1
            if client.discarding:  # the tail of an oversized line, already answered
                client.discarding = False
                continue
            if len(line) > self.max_line_bytes:
                self._queue(client, self._oversized())
                continue
            self._queue(client, self._respond(line))
        del inbox[:start]
        if b"\n" in inbox:
            return  # more complete lines wait for the client to read its replies
        if not client.discarding and len(inbox) > self.max_line_bytes:
            # Answer now rather than at the newline, so a client that never sends one still hears why.
            self._queue(client, self._oversized())
            client.discarding = True
        if client.discarding:
            inbox.clear()

    def _oversized(self) -> dict[str, Any]:
        self._count("oversized_lines")
        self._count("bad_requests")
        return error_reply(f"request line longer than {self.max_line_bytes} bytes; the rest of it is ignored")

    def _queue(self, client: _Client, reply: Mapping[str, Any]) -> None:
        client.outbox += encode_reply(reply)

    def _flush(self, client: _Client) -> None:
        if client.inbox and len(client.outbox) < _MAX_PENDING_REPLY_BYTES:
            self._process(client)
        if client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # EPIPE/ECONNRESET: the client went away without reading
                logger.debug("control socket: client write failed: %s", exc)
                self._close_client(client)
                return
            del client.outbox[:sent]
        if client.closing and not client.outbox and b"\n" not in client.inbox:
            self._close_client(client)
            return
        # Complete lines still waiting (processing stopped at the reply cap): ask for a write event to
        # answer them next round, and read nothing more from this client until they are answered.
        pending_lines = b"\n" in client.inbox
        events = 0
        if client.outbox or pending_lines:
            events |= selectors.EVENT_WRITE
        if not client.closing and not pending_lines and len(client.outbox) < _MAX_PENDING_REPLY_BYTES:
            events |= selectors.EVENT_READ
        self._set_events(client, events)

    def _set_events(self, client: _Client, events: int) -> None:
        fd = client.sock.fileno()
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            self._selector.register(client.sock, events, client)
            return
        if key.events != events:
            self._selector.modify(client.sock, events, client)

    def _close_client(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            if self._selector is not None:
                try:
                    self._selector.unregister(client.sock)
                except (KeyError, ValueError):
                    logger.debug("control socket: client %d was not registered", fd)
            self._clients.pop(fd, None)
        client.sock.close()

    def _count(self, name: str) -> None:
        with self._counters_lock:
            self.counters[name] += 1

    # -- requests ----------------------------------------------------------------------------------------
    def _respond(self, line: bytes) -> dict[str, Any]:
        self._count("requests")
        request_id = None
        try:
            request = decode_request(line)
            request_id = request.get("id")
            validate_request(request)
            reply = self._execute(request)
        except RequestError as exc:
            self._count("bad_requests")
            reply = error_reply(str(exc))
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        try:
            if cmd == "say":
                text = request["text"].strip()
                self.handler.say(text)
                return {"ok": True, "instruction": text}
            if cmd == "stop":
                self.handler.stop()
                return {"ok": True, "instruction": None}
            if cmd == "estop":
                self.handler.estop()
                return {"ok": True, "estop": True}
            if cmd == "clear":
                self.handler.clear()
                return {"ok": True, "estop": False}
            if cmd == "resume":
                self.handler.resume()
                return {"ok": True}
            status = self.handler.status()
            reply = {"ok": True}
            reply.update(status)
            reply["ok"] = True
            encode_reply(reply)  # refuse an unserialisable status here, as an internal error
            return reply
        except EdgeError as exc:
            self._count("handler_errors")
            logger.warning("control socket: %s refused: %s", cmd, exc)
            return error_reply(str(exc))
        except Exception as exc:  # a handler bug must not end the server
            self._count("handler_errors")
            logger.exception("control socket: handler failed on %r", cmd)
            return error_reply(f"internal error while handling {cmd!r}: {type(exc).__name__}; see the service log")
