"""The newest frame of a camera and its capture time, handed from one producer thread to any reader.

Both cameras (OpenCV, edge/io/camera.py; a ROS 2 image topic, edge/io/ros2/sources.py) keep their
frames here, so "latest frame" means the same on either: a reader copies the newest frame into its own
preallocated buffer under a short lock and never waits for a new one.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from edge.errors import InputError

RATE_FRAMES = 16  # capture times kept for the measured frame rate
MIN_RATE_FRAMES = 4  # fewer frames than this: no rate yet


class LatestFrame:
    """Front/back double buffer: the producer publishes a full frame, readers copy the front one."""

    def __init__(self, source: str) -> None:
        self.source = source  # named in errors: "the camera", "the topic /image"
        self._lock = threading.Lock()  # guards _front, _stamp_s, _count
        self._published = threading.Condition(self._lock)  # notified on every publish (frame-sync ticks)
        self._front: np.ndarray | None = None
        self._stamp_s = -math.inf
        self._count = 0
        self._stamps = np.full(RATE_FRAMES, -math.inf)  # the last capture times, a ring (the measured rate)

    def reset(self) -> None:
        with self._lock:
            self._front, self._stamp_s, self._count = None, -math.inf, 0
            self._stamps[:] = -math.inf

    def publish(self, image: np.ndarray, stamp_s: float) -> np.ndarray | None:
        """Make `image` the newest frame (captured at `stamp_s` on time.monotonic()); returns the previous
        front buffer, which no reader holds any more, for the producer to fill next (or None)."""
        with self._lock:
            previous, self._front = self._front, image
            self._stamp_s = stamp_s
            self._stamps[self._count % RATE_FRAMES] = stamp_s
            self._count += 1
            self._published.notify_all()
        return previous

    def wait_newer(self, count: int, timeout_s: float) -> int:
        """Block until a frame newer than the `count`-th is published or `timeout_s` passes; returns the
        frame counter then (> count: a new frame). Never holds the lock while waiting."""
        with self._published:
            if self._count <= count and timeout_s > 0:
                self._published.wait_for(lambda: self._count > count, timeout=timeout_s)
            return self._count

    def read_into(self, out: np.ndarray) -> tuple[float, int] | None:
        """Copy the latest frame into ``out``; return (capture time on time.monotonic(), frame counter).

        None before the first frame. ``out`` must have ``shape`` and dtype uint8.
        """
        with self._lock:
            front = self._front
            if front is None:
                return None
            if out.shape != front.shape or out.dtype != front.dtype:
                raise InputError(f"read_into: buffer has shape {out.shape} dtype {out.dtype}, {self.source} "
                                 f"delivers {front.shape} {front.dtype}; allocate it from frame_shape")
            np.copyto(out, front)
            return self._stamp_s, self._count

    def read_latest(self) -> tuple[np.ndarray | None, float, int]:
        """A copy of the latest frame, its capture time and counter; (None, -inf, 0) before the first."""
        with self._lock:
            if self._front is None:
                return None, -math.inf, 0
            return self._front.copy(), self._stamp_s, self._count

    def age_s(self, now: float) -> float:
        """Seconds since the latest frame was captured; inf if none yet."""
        with self._lock:
            return now - self._stamp_s

    def rate_hz(self) -> float | None:
        """Frames per second over the last RATE_FRAMES capture times; None with fewer than MIN_RATE_FRAMES
        frames since the last reset (the stream's own rate, whatever the device was asked for)."""
        with self._lock:
            n = min(self._count, RATE_FRAMES)
            if n < MIN_RATE_FRAMES:
                return None
            newest = self._stamps[(self._count - 1) % RATE_FRAMES]
            oldest = self._stamps[(self._count - n) % RATE_FRAMES]
        span = newest - oldest
        return (n - 1) / span if span > 0 and math.isfinite(span) else None

    @property
    def shape(self) -> tuple[int, ...] | None:
        with self._lock:
            return None if self._front is None else self._front.shape

    @property
    def count(self) -> int:
        return self._count


class LatestFrameReader:
    """The reading side every camera shares (OpenCV, ROS 2 image topic): any thread, never the device.
    A camera keeps its frames in ``self._frames``, a LatestFrame."""

    _frames: LatestFrame

    def read_into(self, out: np.ndarray) -> tuple[float, int] | None:
        """Copy the latest frame into ``out`` (``frame_shape``, uint8); (its capture time on
        time.monotonic(), frame counter); None before the first frame."""
        return self._frames.read_into(out)

    def read_latest(self) -> tuple[np.ndarray | None, float, int]:
        """A copy of the latest frame, its capture time and counter; (None, -inf, 0) before the first."""
        return self._frames.read_latest()

    def frame_age_s(self, now: float | None = None) -> float:
        """Seconds since the latest frame was captured (``now`` on time.monotonic()); inf if none yet."""
        return self._frames.age_s(time.monotonic() if now is None else now)

    def wait_newer(self, count: int, timeout_s: float) -> int:
        """Wait up to `timeout_s` for a frame after the `count`-th; the frame counter then (frame-sync ticks)."""
        return self._frames.wait_newer(count, timeout_s)

    @property
    def frame_shape(self) -> tuple[int, ...] | None:
        return self._frames.shape

    @property
    def frame_count(self) -> int:
        return self._frames.count

    def measured_fps(self) -> float | None:
        """The rate frames actually arrive at (the last 16 capture times); None until 4 have."""
        return self._frames.rate_hz()
