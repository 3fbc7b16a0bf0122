"""Camera with latest-frame semantics: a capture thread grabs continuously, the control loop never waits.

The thread owns the ``cv2.VideoCapture``. It decodes each frame into a back buffer and swaps it with the
front buffer under a lock, so a reader copies the newest frame into its own buffer (``read_into``) and
gets the frame's capture time on ``time.monotonic()`` and a frame counter. When the stream is lost
(a read fails, the stream dies, or no frame comes for ``stale_after_s``) the thread reconnects with
exponential backoff; meanwhile readers keep getting the last frame with its old timestamp, so the
control loop sees it age and falls back, and never mistakes an old frame for a new one.

Sources, told apart by their value: a device index (``0`` or ``"0"``), a V4L2 path (``/dev/video0``,
``/dev/v4l/by-id/...``), a URL (http, https, rtsp), a GStreamer pipeline (contains ``!``, e.g. a Jetson
CSI camera ``"nvarguscamerasrc ! ... ! appsink"``) or a video file (paced at its own frame rate).
Frames are BGR, as OpenCV delivers them.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edge.errors import CameraError, ConfigError
from edge.io.latest_frame import LatestFrame, LatestFrameReader
from edge.ratelimit import RateLimitedWarnings
from edge.validation import check_backoff, check_bool, check_choice, check_range, check_text

logger = logging.getLogger(__name__)

_BACKENDS = {
    "auto": None,  # chosen from the source kind, see _api_for
    "any": cv2.CAP_ANY,
    "ffmpeg": cv2.CAP_FFMPEG,
    "gstreamer": cv2.CAP_GSTREAMER,
    "v4l2": cv2.CAP_V4L2,
}
_URL_SCHEMES = ("http://", "https://", "rtsp://", "rtsps://")
_MAX_SIDE_PX = 16384
_FALLBACK_FILE_FPS = 30.0  # pacing for a video file whose container does not state its frame rate
_WARN_INTERVAL_S = 5.0


class SourceKind(str, enum.Enum):
    DEVICE_INDEX = "device_index"
    V4L2_DEVICE = "v4l2_device"
    VIDEO_FILE = "video_file"
    URL = "url"
    GSTREAMER = "gstreamer"


def detect_source_kind(source: str | int) -> SourceKind:
    """Tell what kind of source a config value names (the value is assumed validated)."""
    if isinstance(source, int):
        return SourceKind.DEVICE_INDEX
    text = source.strip()
    if text.isdigit():
        return SourceKind.DEVICE_INDEX
    if "!" in text:
        return SourceKind.GSTREAMER
    if text.lower().startswith(_URL_SCHEMES):
        return SourceKind.URL
    if text.startswith("/dev/"):
        return SourceKind.V4L2_DEVICE
    return SourceKind.VIDEO_FILE


@dataclass(frozen=True)
class CameraConfig:
    """Where frames come from and how to treat a source that stalls or drops."""

    source: str | int
    width_px: int | None = None  # requested from devices that take it (V4L2); others deliver their own
    height_px: int | None = None
    fps: float | None = None  # requested from devices; for a video file it overrides the file's rate
    open_timeout_s: float = 5.0  # connect() fails if the first frame has not arrived by then
    stale_after_s: float = 0.3  # no frame for this long counts as a lost stream (where the backend can tell)
    reconnect_backoff_s: tuple[float, float] = (0.2, 2.0)  # (first, longest) wait between reconnects
    backend: str = "auto"  # auto | any | ffmpeg | gstreamer | v4l2
    loop: bool = False  # video files only: start over at the end (demos and tests)

    def __post_init__(self) -> None:
        source = self.source
        if isinstance(source, int) and not isinstance(source, bool):
            check_range("camera.source", source, 0, integer=True, hint="a device index counts from 0")
        else:
            check_text("camera.source", source, "a device index, path, URL or GStreamer pipeline")
        if (self.width_px is None) != (self.height_px is None):
            raise ConfigError("camera.width_px and camera.height_px must be given together or both left out")
        for key in ("width_px", "height_px"):
            check_range(f"camera.{key}", getattr(self, key), 1, _MAX_SIDE_PX, unit="px", integer=True, nullable=True)
        check_range("camera.fps", self.fps, 0, 1000, unit="frames/s", low_open=True, nullable=True)
        check_range("camera.open_timeout_s", self.open_timeout_s, 0, 120, unit="s", low_open=True)
        check_range("camera.stale_after_s", self.stale_after_s, 0, 60, unit="s", low_open=True)
        if self.fps is not None and self.stale_after_s <= 1.0 / self.fps:
            raise ConfigError(f"camera.stale_after_s ({self.stale_after_s} s) must exceed one frame period "
                              f"(1/fps = {1.0 / self.fps:.3f} s), or every frame would count as a stall")
        # YAML gives a list; the frozen config keeps a tuple.
        object.__setattr__(self, "reconnect_backoff_s",
                           check_backoff("camera.reconnect_backoff_s", self.reconnect_backoff_s))
        check_choice("camera.backend", self.backend, sorted(_BACKENDS))
        check_bool("camera.loop", self.loop)
        if self.loop and self.source_kind is not SourceKind.VIDEO_FILE:
            raise ConfigError(f"camera.loop applies only to video files; source {source!r} is a "
                              f"{self.source_kind.value}")

    @property
    def source_kind(self) -> SourceKind:
        return detect_source_kind(self.source)


_HINTS = {
    SourceKind.DEVICE_INDEX: "check that the camera is plugged in and listed by `v4l2-ctl --list-devices`, "
                             "that no other process holds it, and that this user is in the 'video' group",
    SourceKind.V4L2_DEVICE: "check that the device exists (`ls -l /dev/video* /dev/v4l/by-id/`), that no "
                            "other process holds it, and that this user is in the 'video' group",
    SourceKind.VIDEO_FILE: "check that the file is a video that FFmpeg decodes (`ffprobe PATH`)",
    SourceKind.URL: "check that the stream plays elsewhere (`ffprobe URL`), the address and port, and "
                    "the network between robot and camera",
    SourceKind.GSTREAMER: "check the pipeline with `gst-launch-1.0` (appsink replaced by fakesink), that it "
                          "ends in appsink, and for a CSI camera that nvargus-daemon runs "
                          "(`sudo systemctl restart nvargus-daemon`)",
}


class _Outcome(enum.Enum):
    STOPPED = "stopped"
    LOST = "lost"
    END_OF_FILE = "end_of_file"


class Camera(LatestFrameReader):
    """Latest-frame camera: ``connect()``, ``read_into()`` / ``read_latest()``, ``disconnect()``."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self._kind = config.source_kind
        self._api = self._api_for(config.backend, self._kind)
        self._frames = LatestFrame("the camera")
        self._back: np.ndarray | None = None  # owned by the capture thread: retrieve() fills it in place
        self._stop = threading.Event()
        self._first_frame_or_exit = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._streaming = False
        self._reconnects = 0
        self._read_failures = 0
        self._open_failures = 0
        self._last_error = "no attempt yet"
        self._warn = RateLimitedWarnings(logger, _WARN_INTERVAL_S)

    # lifecycle -----------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Start the capture thread and wait for the first frame (at most ``open_timeout_s``)."""
        if self._connected:
            raise CameraError(f"camera {self._describe()} is already connected")
        if self._thread is not None and self._thread.is_alive():
            raise CameraError(f"camera {self._describe()}: the capture thread of an earlier connection "
                              "has not exited (stuck in the driver); restart the process")
        self._check_openable()
        self._frames.reset()
        self._back = None
        self._reconnects = self._read_failures = self._open_failures = 0
        self._last_error = "no attempt yet"
        self._stop.clear()
        self._first_frame_or_exit.clear()
        self._thread = threading.Thread(target=self._run, name=f"camera:{self.config.source}", daemon=True)
        self._thread.start()
        self._first_frame_or_exit.wait(self.config.open_timeout_s)
        if self._frames.count == 0:
            self._stop_thread()
            raise CameraError(
                f"camera {self._describe()} delivered no frame within {self.config.open_timeout_s:g} s "
                f"(camera.open_timeout_s); last error: {self._last_error}; {_HINTS[self._kind]}")
        self._connected = True
        shape = self.frame_shape
        logger.info("camera %s connected: %s frames, backend %s", self._describe(),
                    "x".join(str(s) for s in shape) if shape else "?", self._backend_name())

    @property
    def is_connected(self) -> bool:
        """True between a successful ``connect()`` and ``disconnect()``, also while reconnecting."""
        return self._connected

    @property
    def is_streaming(self) -> bool:
        """True while the capture thread has a live stream (False while it reconnects)."""
        return self._connected and self._streaming

    def disconnect(self) -> None:
        """Stop the capture thread and release the device. The last frame stays readable (stale)."""
        if self._thread is None:
            return
        self._stop_thread()
        self._connected = False
        logger.info("camera %s disconnected after %d frames (%d reconnects, %d read failures)",
                    self._describe(), self._frames.count, self._reconnects, self._read_failures)

    def __enter__(self) -> Camera:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    # reading (any thread; never touches the device): read_into, read_latest, frame_age_s, wait_newer,
    # frame_shape, frame_count come from LatestFrameReader
    @property
    def reconnects(self) -> int:
        """Times the stream came back (delivered a frame) after a loss."""
        return self._reconnects

    @property
    def read_failures(self) -> int:
        """Reads that failed or timed out on an open stream."""
        return self._read_failures

    @property
    def open_failures(self) -> int:
        """Attempts to open the source that failed (at start-up or while reconnecting)."""
        return self._open_failures

    # capture thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._capture_loop()
        except Exception:  # the thread must not die silently: log it, readers see frames go stale
            self._last_error = "capture thread crashed (see the log)"
            logger.exception("camera %s: capture thread crashed; frames will go stale", self._describe())
        finally:
            self._streaming = False
            self._first_frame_or_exit.set()

    def _capture_loop(self) -> None:
        first_s, longest_s = self.config.reconnect_backoff_s
        backoff_s = first_s
        had_stream = False
        while not self._stop.is_set():
            cap = self._open()
            if cap is None:
                self._open_failures += 1
                if had_stream:
                    self._warn("camera %s: reconnect failed (%s); next try in %.2f s",
                               self._describe(), self._last_error, backoff_s)
            else:
                try:
                    outcome, delivered = self._pump(cap, is_reconnect=had_stream)
                finally:
                    cap.release()
                    self._streaming = False
                if outcome is _Outcome.STOPPED:
                    return
                if outcome is _Outcome.END_OF_FILE:
                    logger.info("camera %s: end of video file; the last frame now goes stale "
                                "(set camera.loop to replay)", self._describe())
                    return
                if delivered:
                    backoff_s = first_s  # the stream worked: start the backoff over
                    had_stream = True
                self._warn("camera %s: stream lost (%s); reconnecting in %.2f s",
                           self._describe(), self._last_error, backoff_s)
            if self._stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2.0, longest_s)

    def _open(self) -> cv2.VideoCapture | None:
        source = self.config.source
        target: str | int = int(source) if self._kind is SourceKind.DEVICE_INDEX else str(source)
        try:
            if self._api == cv2.CAP_FFMPEG:
                # FFmpeg takes its timeouts only at open; the read timeout is what turns a frozen
                # stream into a failed read instead of a capture thread blocked forever.
                params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.config.open_timeout_s * 1000),
                          cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.config.stale_after_s * 1000)]
                cap = cv2.VideoCapture(target, self._api, params)
            else:
                cap = cv2.VideoCapture(target, self._api)
        except cv2.error as exc:
            self._last_error = f"OpenCV raised while opening: {exc}"
            return None
        if not cap.isOpened():
            cap.release()
            self._last_error = f"OpenCV ({self._backend_name()}) could not open {target!r}"
            return None
        self._configure(cap)
        return cap

    def _configure(self, cap: cv2.VideoCapture) -> None:
        # One buffered frame at most: a deeper driver queue hands out frames that are already old.
        settings = [(cv2.CAP_PROP_BUFFERSIZE, 1, "BUFFERSIZE")]
        if self._kind in (SourceKind.DEVICE_INDEX, SourceKind.V4L2_DEVICE):
            if self.config.width_px is not None:
                settings += [(cv2.CAP_PROP_FRAME_WIDTH, self.config.width_px, "FRAME_WIDTH"),
                             (cv2.CAP_PROP_FRAME_HEIGHT, self.config.height_px, "FRAME_HEIGHT")]
            if self.config.fps is not None:
                settings.append((cv2.CAP_PROP_FPS, self.config.fps, "FPS"))
        if self._api != cv2.CAP_FFMPEG:
            settings.append((cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.config.stale_after_s * 1000),
                             "READ_TIMEOUT_MSEC"))
        for prop, value, name in settings:
            if not cap.set(prop, value):
                logger.debug("camera %s: backend %s does not take CAP_PROP_%s=%s", self._describe(),
                             self._backend_name(), name, value)

    def _pump(self, cap: cv2.VideoCapture, is_reconnect: bool) -> tuple[_Outcome, int]:
        """Grab frames until stopped or lost; return the outcome and how many frames were delivered."""
        is_file = self._kind is SourceKind.VIDEO_FILE
        period_s = self._file_period_s(cap) if is_file else 0.0
        deadline_s = time.monotonic()
        delivered = 0
        while not self._stop.is_set():
            if is_file:
                # Real-time pacing on absolute deadlines; after an overrun, skip ahead instead of bursting.
                now = time.monotonic()
                if deadline_s > now and self._stop.wait(deadline_s - now):
                    break
                deadline_s += period_s
                now = time.monotonic()
                if deadline_s < now:
                    deadline_s = now + period_s
            ok = cap.grab()
            if not ok and is_file:
                if not self.config.loop:
                    return _Outcome.END_OF_FILE, delivered
                ok = cap.set(cv2.CAP_PROP_POS_FRAMES, 0) and cap.grab()
            stamp_s = time.monotonic()  # the frame exists from here on; decoding is not its age
            if not ok:
                self._read_failures += 1
                self._last_error = (f"read failed (stream ended, or no frame within "
                                    f"camera.stale_after_s = {self.config.stale_after_s:g} s)")
                return _Outcome.LOST, delivered
            try:
                ok, image = cap.retrieve(self._back)
            except cv2.error as exc:
                ok, image = False, None
                logger.debug("camera %s: retrieve raised %s", self._describe(), exc)
            if not ok or image is None:
                self._read_failures += 1
                self._last_error = "a grabbed frame could not be decoded"
                return _Outcome.LOST, delivered
            self._publish(image, stamp_s)
            delivered += 1
            if delivered == 1:
                self._on_stream_up(image, is_reconnect)
        return _Outcome.STOPPED, delivered

    def _publish(self, image: np.ndarray, stamp_s: float) -> None:
        # retrieve() writes into the back buffer in place; it returns a new array only for the first
        # frame or when the source changes resolution.
        self._back = self._frames.publish(image, stamp_s)
        self._streaming = True
        self._first_frame_or_exit.set()

    def _on_stream_up(self, image: np.ndarray, is_reconnect: bool) -> None:
        if is_reconnect:
            self._reconnects += 1
            logger.info("camera %s: stream is back (reconnect #%d)", self._describe(), self._reconnects)
        wanted = (self.config.height_px, self.config.width_px)
        if wanted[0] is not None and image.shape[:2] != wanted:
            self._warn("camera %s delivers %dx%d frames, %dx%d was requested (camera.width_px/height_px)",
                       self._describe(), image.shape[1], image.shape[0], wanted[1], wanted[0])

    def _file_period_s(self, cap: cv2.VideoCapture) -> float:
        fps = self.config.fps or cap.get(cv2.CAP_PROP_FPS)
        if not fps or not math.isfinite(fps) or fps <= 0:
            logger.warning("camera %s: the video file states no frame rate; pacing at %g fps "
                           "(set camera.fps)", self._describe(), _FALLBACK_FILE_FPS)
            fps = _FALLBACK_FILE_FPS
        return 1.0 / fps

    # helpers -------------------------------------------------------------------------------------------
    def _stop_thread(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        # A capture blocked in the driver returns within its open or read timeout (FFmpeg honours both).
        join_timeout_s = self.config.open_timeout_s + self.config.stale_after_s + 1.0
        thread.join(timeout=join_timeout_s)
        if thread.is_alive():
            logger.warning("camera %s: capture thread did not stop within %.1f s (blocked in the driver); "
                           "it is a daemon thread and ends with the process", self._describe(), join_timeout_s)
        else:
            self._thread = None

    def _check_openable(self) -> None:
        if self._kind is SourceKind.VIDEO_FILE and not os.path.isfile(str(self.config.source)):
            raise CameraError(f"camera source {self.config.source!r} is not a file, a device, a URL "
                              f"({', '.join(_URL_SCHEMES)}) or a GStreamer pipeline; check camera.source")
        if self._api == cv2.CAP_GSTREAMER and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise CameraError(f"camera source {self.config.source!r} needs GStreamer, and this OpenCV build "
                              "has none (pip's opencv-python wheels lack it); on a Jetson use JetPack's "
                              "OpenCV (python3-opencv) from a venv made with --system-site-packages")

    @staticmethod
    def _api_for(backend: str, kind: SourceKind) -> int:
        api = _BACKENDS[backend]
        if api is not None:
            return api
        if kind is SourceKind.GSTREAMER:
            return cv2.CAP_GSTREAMER
        if kind in (SourceKind.URL, SourceKind.VIDEO_FILE):
            return cv2.CAP_FFMPEG
        return cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY

    def _backend_name(self) -> str:
        return "ANY" if self._api == cv2.CAP_ANY else cv2.videoio_registry.getBackendName(self._api)

    def _describe(self) -> str:
        return f"{self.config.source!r} ({self._kind.value})"
