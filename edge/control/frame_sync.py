"""Frame-synchronous ticks (`loop.frame_sync`): the tick starts when the camera's next frame arrives inside a
window before its deadline, so the frame a tick infers on is at most one camera period old.

A 10 fps camera and a 10 Hz tick that are not in phase leave the frame on average half a period old, up to
a whole one, at every tick (61 ms measured in the demo). With frame sync the rate keeper
(edge/control/ratekeeper.py, `sync_to`) sleeps until the window opens, then waits on the camera's
latest-frame buffer (edge/io/latest_frame.py, `wait_newer`) until a new frame or the deadline: the tick
starts on the frame, and the deadlines stay on the 10 Hz grid (a tick that started early simply has more
time). No frame in the window: the tick starts on its deadline, as without frame sync.

    frame_sync_window(enabled, camera_fps, rate_hz, window_s)   the window (None: off), `auto` resolved
    FrameSync(camera)                                           the rate keeper's wake for one camera
"""

from __future__ import annotations

import logging

from edge.errors import ConfigError

logger = logging.getLogger(__name__)

WINDOW_FRACTION = 0.9  # of the control period at most: a tick always keeps a tenth of it before the window


def frame_sync_window(enabled: bool | None, camera_fps: float | None, rate_hz: float,
                      window_s: float | None = None) -> float | None:
    """The window before each deadline in which a new frame starts the tick, or None for no frame sync.

    `enabled` None (auto): on when the camera's rate is known and at least the control rate. The window is
    `window_s` (under one control period), else one camera period, capped at 0.9 of the control period."""
    period_s = 1.0 / rate_hz
    if enabled is None:
        enabled = camera_fps is not None and camera_fps >= rate_hz
    if not enabled:
        return None
    if window_s is not None:
        if not 0 < window_s < period_s:
            raise ConfigError(f"loop.frame_sync_window_s must be in (0, {period_s:g}) s (under one control "
                              f"period), got {window_s!r}")
        return float(window_s)
    window = 1.0 / camera_fps if camera_fps else period_s / 2
    return float(min(window, WINDOW_FRACTION * period_s))


class FrameSync:
    """`wake(timeout_s)` for RateKeeper.sync_to: True when a frame newer than the last one seen arrived."""

    def __init__(self, camera) -> None:
        if not hasattr(camera, "wait_newer"):
            raise ConfigError(f"loop.frame_sync needs a camera that signals new frames; {type(camera).__name__} "
                              "does not: set loop.frame_sync: false")
        self.camera = camera
        self._seen = 0

    def __call__(self, timeout_s: float) -> bool:
        count = self.camera.wait_newer(self._seen, timeout_s)
        new = count > self._seen
        self._seen = count
        return new
