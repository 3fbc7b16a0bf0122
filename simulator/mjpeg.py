"""MJPEG-over-HTTP camera server, the way an IP camera streams.

`/stream.mjpg` answers with ``multipart/x-mixed-replace`` parts of ``image/jpeg``; `/snapshot.jpg`
answers with the latest JPEG. One producer thread calls ``frame_source`` at ``fps`` and encodes once
per frame, however many clients are connected. ``pause()`` freezes the stream (connections stay open,
no parts are sent) and ``stop()`` drops every client (a dead stream); both exist for fault injection.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

logger = logging.getLogger(__name__)

BOUNDARY = "frame"
STREAM_PATH = "/stream.mjpg"
SNAPSHOT_PATH = "/snapshot.jpg"
# A client that goes away mid-write shows up as one of these; it is the client's business, not an error.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart on the same port while old connections sit in TIME_WAIT

    def __init__(self, address: tuple[str, int], owner: MjpegServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        try:
            if path == STREAM_PATH:
                owner._serve_stream(self)
            elif path == SNAPSHOT_PATH:
                owner._serve_snapshot(self)
            else:
                self.send_error(404, f"try {STREAM_PATH} or {SNAPSHOT_PATH}")
        except _CLIENT_GONE as exc:
            logger.debug("client %s went away: %s", self.client_address, exc)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        logger.debug("%s %s", self.client_address[0], format % args)


class MjpegServer:
    """Serve frames from ``frame_source`` as an MJPEG stream on ``host:port`` (port 0 picks a free one).

    ``frame_source`` returns a uint8 BGR (HxWx3) or grey (HxW) image, or None to skip a frame.
    """

    def __init__(
        self,
        frame_source: Callable[[], np.ndarray | None],
        fps: float = 10.0,
        jpeg_quality: int = 90,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        self._frame_source = frame_source
        self._period_s = 1.0 / fps
        self._jpeg_quality = int(jpeg_quality)
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._paused = threading.Event()
        # Guards the latest JPEG, its sequence number and the set of client sockets.
        self._cond = threading.Condition()
        self._jpeg: bytes | None = None
        self._seq = 0
        self._clients: set[socket.socket] = set()
        self._connections = 0  # stream clients ever served: tests see whether anything opened the camera

    # lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> MjpegServer:
        """Bind and serve. After ``stop()`` it starts again on the port it had (restart fault)."""
        if self._server is not None:
            raise RuntimeError("MjpegServer already started")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._port = self._server.server_address[1]  # keep the picked port so a restart reuses it
        self._threads = [
            threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                             name=f"mjpeg-http:{self._port}", daemon=True),
            threading.Thread(target=self._produce, name=f"mjpeg-frames:{self._port}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("MJPEG server streaming at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and drop every client, as a camera that lost power."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            clients = list(self._clients)
            self._cond.notify_all()
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the client sees EOF now, not when its handler wakes
            except OSError as exc:  # already closed by the client
                logger.debug("client socket already closed: %s", exc)
        server.shutdown()
        server.server_close()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads = []
        self._server = None
        logger.info("MJPEG server on port %d stopped", self._port)

    def pause(self) -> None:
        """Freeze the stream: clients stay connected but receive no new frames."""
        with self._cond:
            self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # properties ----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}{STREAM_PATH}"

    @property
    def snapshot_url(self) -> str:
        return f"http://{self._host}:{self._port}{SNAPSHOT_PATH}"

    @property
    def is_running(self) -> bool:
        return self._server is not None

    @property
    def is_paused(self) -> bool:
        return self._paused.is_set()

    @property
    def frames_produced(self) -> int:
        """JPEG frames encoded since construction (not counting paused or skipped periods)."""
        with self._cond:
            return self._seq

    @property
    def connections(self) -> int:
        """Stream clients served since construction (each connect counts, also ones that left)."""
        with self._cond:
            return self._connections

    @property
    def client_count(self) -> int:
        with self._cond:
            return len(self._clients)

    # producer ------------------------------------------------------------------------------------------
    def _produce(self) -> None:
        deadline = time.monotonic()
        while not self._stopping.is_set():
            if not self._paused.is_set():
                self._publish_one()
            deadline += self._period_s
            now = time.monotonic()
            if deadline < now:  # overran: skip ahead rather than burst to catch up
                deadline = now + self._period_s
            self._stopping.wait(deadline - now)

    def _publish_one(self) -> None:
        try:
            frame = self._frame_source()
        except Exception:  # a broken frame source must not kill the stream thread; it is logged in full
            logger.exception("frame_source raised; skipping this frame")
            return
        if frame is None:
            return
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self._jpeg_quality])
        if not ok:
            logger.error("could not JPEG-encode a frame of shape %s dtype %s", frame.shape, frame.dtype)
            return
        with self._cond:
            if self._paused.is_set():  # checked under the lock: once pause() returns, nothing is published
                return
            self._jpeg = encoded.tobytes()
            self._seq += 1
            self._cond.notify_all()

    # handlers (run on the HTTP server's per-client threads) ------------------------------------------
    def _serve_snapshot(self, handler: _Handler) -> None:
        with self._cond:
            jpeg = self._jpeg
        if jpeg is None:
            handler.send_error(503, "no frame yet")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(jpeg)))
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()
        handler.wfile.write(jpeg)

    def _serve_stream(self, handler: _Handler) -> None:
        sock = handler.connection
        with self._cond:
            if self._stopping.is_set():
                return
            self._clients.add(sock)
            self._connections += 1
            seen = self._seq
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            handler.send_header("Cache-Control", "no-cache")
            handler.send_header("Connection", "close")
            handler.end_headers()
            while True:
                with self._cond:
                    # The timeout only bounds how long a handler sleeps if a notify were ever missed.
                    self._cond.wait_for(lambda last=seen: self._stopping.is_set() or self._seq != last,
                                        timeout=1.0)
                    if self._stopping.is_set():
                        return
                    if self._seq == seen:
                        continue
                    seen, jpeg = self._seq, self._jpeg
                if jpeg is None:  # cannot happen once seq > 0; keeps the type checker honest
                    continue
                head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(jpeg)}\r\n\r\n").encode("ascii")
                handler.wfile.write(head + jpeg + b"\r\n")
        except OSError as exc:
            if self._stopping.is_set() or isinstance(exc, _CLIENT_GONE):
                logger.debug("stream to %s ended: %s", handler.client_address, exc)
            else:
                raise
        finally:
            with self._cond:
                self._clients.discard(sock)
