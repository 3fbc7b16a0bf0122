"""Camera against real OpenCV captures: video files written here, and a real MJPEG server on loopback."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from itertools import pairwise
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.errors import CameraError, ConfigError, InputError
from edge.io.camera import Camera, CameraConfig, SourceKind, detect_source_kind
from simulator.mjpeg import MjpegServer
from tests.waiting import HANG_GUARD_S, wait_until

H, W = 48, 64


def coloured_frame(index: int) -> np.ndarray:
    """Blue = 20 * index encodes the frame index; green is a constant that proves the channel order."""
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:] = ((index * 20) % 240, 200, 60)
    return frame


def frame_index(frame: np.ndarray) -> int:
    assert frame.shape == (H, W, 3)
    assert abs(float(frame[..., 1].mean()) - 200) < 6, "frame is not one of ours (or channels swapped)"
    return round(float(frame[..., 0].mean()) / 20)


def write_video(path: Path, frames: int, fps: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for index in range(frames):
        writer.write(coloured_frame(index))
    writer.release()
    return path


class IndexedSource:
    """Frame source for MjpegServer: frame k (from 0) carries index k mod 12."""

    def __init__(self) -> None:
        self.produced = 0

    def __call__(self) -> np.ndarray:
        frame = coloured_frame(self.produced % 12)
        self.produced += 1
        return frame


def sample(camera: Camera, until, timeout_s: float = HANG_GUARD_S) -> list[tuple[float, int, int]]:
    """Poll read_into into one reused buffer; (timestamp, counter, decoded index) per new frame."""
    buffer = np.empty(camera.frame_shape, np.uint8)
    samples: list[tuple[float, int, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = camera.read_into(buffer)
        assert got is not None
        stamp, count = got
        if not samples or count != samples[-1][1]:
            samples.append((stamp, count, frame_index(buffer)))
        if until(samples):
            return samples
        time.sleep(0.002)
    raise AssertionError(f"condition not met within {timeout_s} s; last samples {samples[-3:]}")


def camera_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("camera:")]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_config(url: str, **overrides) -> CameraConfig:
    settings = {"open_timeout_s": 1.0, "stale_after_s": 0.3, "reconnect_backoff_s": (0.05, 0.2)}
    settings.update(overrides)
    return CameraConfig(url, **settings)


# config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "kind"), [
    (0, SourceKind.DEVICE_INDEX),
    ("2", SourceKind.DEVICE_INDEX),
    ("/dev/video0", SourceKind.V4L2_DEVICE),
    ("/dev/v4l/by-id/usb-cam-video-index0", SourceKind.V4L2_DEVICE),
    ("http://10.0.0.5:8080/stream.mjpg", SourceKind.URL),
    ("RTSP://cam.local/main", SourceKind.URL),
    ("nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! appsink",
     SourceKind.GSTREAMER),
    ("demo/episode.avi", SourceKind.VIDEO_FILE),
])
def test_source_kind_is_detected_from_the_value(source, kind) -> None:
    assert detect_source_kind(source) is kind
    assert CameraConfig(source).source_kind is kind


@pytest.mark.parametrize(("overrides", "key"), [
    ({"source": ""}, "camera.source"),
    ({"source": -1}, "camera.source"),
    ({"source": True}, "camera.source"),
    ({"width_px": 640}, "camera.width_px"),
    ({"width_px": 0, "height_px": 480}, "camera.width_px"),
    ({"width_px": 640, "height_px": 480.5}, "camera.height_px"),
    ({"fps": 0}, "camera.fps"),
    ({"open_timeout_s": 0}, "camera.open_timeout_s"),
    ({"stale_after_s": -0.1}, "camera.stale_after_s"),
    ({"stale_after_s": 0.03, "fps": 30.0}, "camera.stale_after_s"),
    ({"reconnect_backoff_s": (0.5,)}, "camera.reconnect_backoff_s"),
    ({"reconnect_backoff_s": (2.0, 0.2)}, "camera.reconnect_backoff_s"),
    ({"reconnect_backoff_s": (0.0, 1.0)}, "camera.reconnect_backoff_s[0]"),
    ({"backend": "dshow"}, "camera.backend"),
    ({"loop": True}, "camera.loop"),  # source 0 is a device, not a file
])
def test_config_rejects_bad_values_naming_the_key(overrides, key) -> None:
    settings = {"source": 0, **overrides}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        CameraConfig(**settings)


def test_config_takes_yaml_lists_and_is_frozen() -> None:
    config = CameraConfig("clip.avi", width_px=640, height_px=480, fps=15.0,
                          reconnect_backoff_s=[0.1, 1.0], loop=True)
    assert config.reconnect_backoff_s == (0.1, 1.0)
    with pytest.raises(AttributeError):
        config.fps = 30.0  # type: ignore[misc]


# video files -----------------------------------------------------------------------------------------
def test_video_file_frames_arrive_in_order_paced_and_intact(tmp_path: Path) -> None:
    frames, fps = 12, 50.0
    path = write_video(tmp_path / "clip.avi", frames, fps)
    camera = Camera(CameraConfig(str(path)))
    assert camera.read_latest() == (None, -math.inf, 0)
    assert camera.frame_age_s(time.monotonic()) == math.inf
    with camera:
        samples = sample(camera, lambda s: s[-1][1] == frames)
        # The file ends: the thread stops, and the last frame stays, with its own timestamp.
        assert wait_until(lambda: not camera.is_streaming)
        assert camera.is_connected
        last, stamp, count = camera.read_latest()
        assert (stamp, count) == samples[-1][:2]
        assert frame_index(last) == frames - 1
    stamps = [s[0] for s in samples]
    counts = [s[1] for s in samples]
    assert counts == sorted(set(counts))  # strictly increasing
    assert all(b > a for a, b in pairwise(stamps))
    # Without loop, counter n is the file's frame n - 1: the content is the frame, not a neighbour.
    assert all(index == count - 1 for _, count, index in samples)
    # A lower bound only pacing can produce (unpaced, 12 tiny frames decode in about a millisecond).
    assert stamps[-1] - stamps[0] >= 0.5 * (counts[-1] - counts[0]) / fps
    assert camera_threads() == []


def test_looping_video_file_starts_over(tmp_path: Path) -> None:
    frames = 5
    path = write_video(tmp_path / "loop.avi", frames, 100.0)
    with Camera(CameraConfig(str(path), loop=True)) as camera:
        samples = sample(camera, lambda s: s[-1][1] > 3 * frames)
        assert camera.read_failures == 0
        assert camera.reconnects == 0
    assert all(index == (count - 1) % frames for _, count, index in samples)


def test_read_into_copies_into_the_callers_buffer_and_checks_it(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", 3, 50.0)
    camera = Camera(CameraConfig(str(path)))
    assert camera.read_into(np.empty((H, W, 3), np.uint8)) is None  # no frame before connect
    with camera:
        assert camera.frame_shape == (H, W, 3)
        buffer = np.zeros((H, W, 3), np.uint8)
        stamp, count = camera.read_into(buffer)
        assert count >= 1 and stamp <= time.monotonic()
        assert abs(float(buffer[..., 1].mean()) - 200) < 6  # written in place
        copy, _, _ = camera.read_latest()
        copy[:] = 0  # read_latest hands out a copy; the camera's frame is untouched
        camera.read_into(buffer)
        assert float(buffer[..., 1].mean()) > 190
        with pytest.raises(InputError, match="frame_shape"):
            camera.read_into(np.empty((H, W), np.uint8))
        with pytest.raises(InputError):
            camera.read_into(np.empty((H, W, 3), np.float32))
        with pytest.raises(CameraError, match="already connected"):
            camera.connect()


def test_missing_video_file_fails_at_connect_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.avi"
    with pytest.raises(CameraError, match="nope.avi"):
        Camera(CameraConfig(str(missing))).connect()


# sources that never open -----------------------------------------------------------------------------
def test_refused_url_fails_at_connect_naming_the_source() -> None:
    url = f"http://127.0.0.1:{closed_port()}/stream.mjpg"
    camera = Camera(stream_config(url, open_timeout_s=0.5))
    with pytest.raises(CameraError) as error:
        camera.connect()
    message = str(error.value)
    assert url in message and "open_timeout_s" in message and "ffprobe" in message
    assert camera.open_failures >= 1
    assert not camera.is_connected
    assert camera_threads() == []


def test_silent_server_fails_at_connect_and_leaves_no_thread() -> None:
    # Accepts TCP connections but never answers: the open blocks until FFmpeg's open timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/stream.mjpg"
        with pytest.raises(CameraError, match=url.replace(".", r"\.")):
            Camera(stream_config(url, open_timeout_s=0.5)).connect()
    assert wait_until(lambda: camera_threads() == [])


def test_absent_device_index_fails_at_connect() -> None:
    if os.path.exists("/dev/video63"):
        pytest.skip("this machine has a /dev/video63")
    with pytest.raises(CameraError, match="63.*v4l2-ctl"):
        Camera(CameraConfig(63, open_timeout_s=0.5)).connect()


@pytest.mark.skipif(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER), reason="OpenCV has GStreamer here")
def test_gstreamer_pipeline_without_gstreamer_says_what_to_install() -> None:
    with pytest.raises(CameraError, match="GStreamer.*JetPack"):
        Camera(CameraConfig("videotestsrc ! videoconvert ! appsink")).connect()


# MJPEG over HTTP -------------------------------------------------------------------------------------
@pytest.fixture
def server():
    with MjpegServer(IndexedSource(), fps=25.0) as srv:
        yield srv


def test_mjpeg_stream_frames_flow_through_the_camera(server: MjpegServer) -> None:
    with Camera(stream_config(server.url)) as camera:
        samples = sample(camera, lambda s: len(s) >= 6)
        assert camera.is_streaming
        assert camera.frame_age_s(time.monotonic()) < HANG_GUARD_S
    counts = [s[1] for s in samples]
    stamps = [s[0] for s in samples]
    assert all(b > a for a, b in pairwise(counts))
    assert all(b > a for a, b in pairwise(stamps))
    # Server frames are indices 0..11 repeating; the camera sees them in order (maybe skipping some).
    steps = [(b - a) % 12 for a, b in pairwise(s[2] for s in samples)]
    assert all(1 <= step <= 6 for step in steps), steps


def test_frozen_stream_keeps_old_timestamp_then_recovers(server: MjpegServer) -> None:
    config = stream_config(server.url, open_timeout_s=0.6)
    with Camera(config) as camera:
        assert wait_until(lambda: camera.frame_count >= 3)
        server.pause()  # once it returns, the server publishes nothing
        opens0 = camera.open_failures
        # The read timeout (stale_after_s) ends the frozen stream, and a reconnect against the frozen
        # server fails: from then on no frame can arrive.
        assert wait_until(lambda: camera.open_failures > opens0)
        assert camera.read_failures >= 1
        frame0, stamp0, count0 = camera.read_latest()
        assert wait_until(lambda: camera.open_failures > opens0 + 1)
        frame1, stamp1, count1 = camera.read_latest()
        assert (stamp1, count1) == (stamp0, count0)  # no fresh stamp on the old frame
        np.testing.assert_array_equal(frame1, frame0)
        now = time.monotonic()
        assert camera.frame_age_s(now) == now - stamp0
        assert camera.frame_age_s(now) > config.stale_after_s
        assert camera.is_connected and not camera.is_streaming
        server.resume()
        assert wait_until(lambda: camera.frame_count > count0 and camera.is_streaming)
        _, stamp2, count2 = camera.read_latest()
        assert stamp2 > stamp0 and count2 > count0
        assert camera.reconnects >= 1


def test_dead_server_restarted_on_same_port_is_reconnected(caplog) -> None:
    caplog.set_level(logging.INFO, logger="edge.io.camera")
    srv = MjpegServer(IndexedSource(), fps=25.0).start()
    try:
        port = srv.port
        with Camera(stream_config(srv.url)) as camera:
            assert wait_until(lambda: camera.frame_count >= 3)
            srv.stop()
            opens0 = camera.open_failures
            # A failed open after stop() means the old connection is gone, and with it any frame in flight.
            assert wait_until(lambda: camera.open_failures > opens0)
            assert camera.read_failures >= 1
            _, stamp0, count0 = camera.read_latest()
            reconnects0 = camera.reconnects
            assert not camera.is_streaming
            srv.start()
            assert srv.port == port
            assert wait_until(lambda: camera.reconnects > reconnects0 and camera.frame_count > count0)
            samples = sample(camera, lambda s: len(s) >= 3)
            assert all(stamp > stamp0 for stamp, _, _ in samples)
    finally:
        srv.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("stream lost" in m for m in messages)
    assert any("stream is back" in m for m in messages)
    assert camera_threads() == []


def test_disconnect_while_reconnecting_joins_the_thread() -> None:
    srv = MjpegServer(IndexedSource(), fps=25.0).start()
    camera = Camera(stream_config(srv.url))
    try:
        camera.connect()
        srv.stop()
        assert wait_until(lambda: camera.open_failures >= 1)
    finally:
        camera.disconnect()
        srv.stop()
    assert not camera.is_connected
    assert camera_threads() == []
    # The last frame stays readable after disconnect, as stale as it is.
    frame, stamp, count = camera.read_latest()
    assert frame is not None and count >= 1 and stamp < time.monotonic()
