"""MjpegServer over real sockets: multipart stream, snapshot, pause, stop/restart, vanishing clients."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from simulator.mjpeg import MjpegServer
from tests.waiting import HANG_GUARD_S, wait_until


class CountingSource:
    """Frames whose blue channel is 10 * their index (mod 250), so a decoded JPEG tells which it was."""

    def __init__(self) -> None:
        self.index = 0
        self.lock = threading.Lock()

    def __call__(self) -> np.ndarray:
        with self.lock:
            self.index += 1
            index = self.index
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:] = ((index * 10) % 250, 128, 30)
        return frame


def decode_index(jpeg: bytes) -> int:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "part is not a decodable JPEG"
    assert image.shape == (48, 64, 3)
    green = float(image[..., 1].mean())
    assert abs(green - 128) < 4, f"green channel {green} should survive JPEG at about 128"
    return round(float(image[..., 0].mean()) / 10)


class StreamClient:
    """A raw-socket MJPEG client that parses the multipart stream itself."""

    def __init__(self, port: int, path: str = "/stream.mjpg") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = self.file.readline().decode().strip()
        self.headers: dict[str, str] = {}
        for line in iter(self.file.readline, b"\r\n"):
            assert line, "connection closed inside the response headers"
            key, _, value = line.decode().partition(":")
            self.headers[key.strip().lower()] = value.strip()

    def read_part(self) -> bytes:
        boundary = self.file.readline()
        assert boundary == b"--frame\r\n", boundary
        part_headers = {}
        for line in iter(self.file.readline, b"\r\n"):
            key, _, value = line.decode().partition(":")
            part_headers[key.strip().lower()] = value.strip()
        assert part_headers["content-type"] == "image/jpeg"
        jpeg = self.file.read(int(part_headers["content-length"]))
        assert self.file.read(2) == b"\r\n"
        return jpeg

    def close(self, reset: bool = False) -> None:
        if reset:  # linger 0: close with RST, as a client that crashes does
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.file.close()
        self.sock.close()


@pytest.fixture
def server():
    with MjpegServer(CountingSource(), fps=50.0) as srv:
        yield srv


def test_url_names_loopback_and_picked_port(server: MjpegServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/stream.mjpg"
    assert server.snapshot_url == f"http://127.0.0.1:{server.port}/snapshot.jpg"


def test_stream_is_multipart_jpeg_in_frame_order(server: MjpegServer) -> None:
    client = StreamClient(server.port)
    try:
        assert client.status.startswith("HTTP/1.0 200")
        assert client.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
        indices = [decode_index(client.read_part()) for _ in range(6)]
    finally:
        client.close()
    # One producer and a fast reader: consecutive parts are consecutive frames of the source.
    assert indices == list(range(indices[0], indices[0] + 6))


def test_snapshot_is_the_latest_frame(server: MjpegServer) -> None:
    assert wait_until(lambda: server.frames_produced >= 2)
    with urllib.request.urlopen(server.snapshot_url, timeout=HANG_GUARD_S) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        index = decode_index(response.read())
    assert index >= 2


def test_snapshot_before_any_frame_is_503_and_unknown_path_404() -> None:
    with MjpegServer(lambda: None, fps=50.0) as srv:
        with pytest.raises(urllib.error.HTTPError) as no_frame:
            urllib.request.urlopen(srv.snapshot_url, timeout=HANG_GUARD_S)
        assert no_frame.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=HANG_GUARD_S)
        assert unknown.value.code == 404
        assert srv.frames_produced == 0


def test_pause_keeps_connection_but_sends_nothing_then_resume_continues(server: MjpegServer) -> None:
    client = StreamClient(server.port)
    try:
        client.read_part()
        server.pause()
        produced = server.frames_produced
        # Drain what was already in flight when pause() returned.
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            while True:
                client.read_part()
        # Nothing is produced while paused, and the connection is still open (no EOF, no reset).
        assert server.frames_produced == produced
        with pytest.raises(TimeoutError):
            client.sock.recv(1)
        assert server.client_count == 1
        server.resume()
        client.sock.settimeout(HANG_GUARD_S)
        # A socket file refuses reads after a timeout; the drain stopped at a part boundary, so a fresh
        # one starts clean at the next part.
        client.file = client.sock.makefile("rb")
        index = decode_index(client.read_part())
        assert server.frames_produced > produced
        assert index > 0
    finally:
        client.close()


def test_stop_drops_clients_and_restart_reuses_the_port() -> None:
    srv = MjpegServer(CountingSource(), fps=50.0).start()
    try:
        port = srv.port
        client = StreamClient(port)
        client.read_part()
        srv.stop()
        assert not srv.is_running
        client.sock.settimeout(HANG_GUARD_S)
        # Parts that were in flight, then EOF (recv returns b""): the stream is dead, not frozen.
        b"".join(iter(lambda: client.sock.recv(65536), b""))
        client.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
        srv.start()
        assert srv.port == port
        again = StreamClient(port)
        try:
            assert again.status.startswith("HTTP/1.0 200")
            decode_index(again.read_part())
        finally:
            again.close()
    finally:
        srv.stop()


def test_clients_that_vanish_do_not_hurt_the_server(server: MjpegServer, capsys) -> None:
    for reset in (False, True, False, True):
        client = StreamClient(server.port)
        client.read_part()
        client.close(reset=reset)
    assert wait_until(lambda: server.client_count == 0)
    survivor = StreamClient(server.port)
    try:
        first, second = decode_index(survivor.read_part()), decode_index(survivor.read_part())
        assert second == first + 1
    finally:
        survivor.close()
    # socketserver prints unhandled handler errors to stderr; a vanished client must not be one.
    assert "Traceback" not in capsys.readouterr().err


def test_a_failing_frame_source_is_logged_and_the_stream_goes_on(caplog) -> None:
    calls = {"n": 0}
    good = CountingSource()

    def flaky() -> np.ndarray:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("simulated renderer failure")
        return good()

    with MjpegServer(flaky, fps=50.0) as srv:
        client = StreamClient(srv.port)
        try:
            first, second = decode_index(client.read_part()), decode_index(client.read_part())
        finally:
            client.close()
    assert second == first + 1
    assert any("frame_source raised" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs", [{"fps": 0.0}, {"jpeg_quality": 0}, {"jpeg_quality": 101}])
def test_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        MjpegServer(CountingSource(), **kwargs)
