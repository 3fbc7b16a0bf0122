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


def fresh_before_window(camera_fps: float | None, window_s: float) -> float:
    """How old a frame that arrived before the window opened may be and still start the tick at once: where
    the camera period is longer than the window, the next frame may not come inside it (then a frame of
    up to period - window is as fresh as any the window would bring); otherwise 0 (wait for the next one)."""
    if not camera_fps or camera_fps <= 0:
        return 0.0
    return max(0.0, 1.0 / camera_fps - window_s)


class FrameSync:
    """`wake(timeout_s)` for RateKeeper.sync_to: True when a frame newer than the last one seen arrives in
    the window. A frame that came before the window opened (during the last tick, or while the keeper
    slept) starts the tick at once only if it came at most `fresh_s` before the opening: taking any unseen frame at the
    window's opening locked the ticks to start just before each frame arrived, on the frame of the period
    before (bench: frame age p50 86.6 ms with a 90 ms window and a 10 fps camera)."""

    def __init__(self, camera, fresh_s: float = 0.0, window_s: float = 0.0) -> None:
        if not hasattr(camera, "wait_newer"):
            raise ConfigError(f"loop.frame_sync needs a camera that signals new frames; {type(camera).__name__} "
                              "does not: set loop.frame_sync: false")
        self.camera = camera
        self.fresh_s = float(fresh_s)
        self.window_s = float(window_s)
        self._seen = 0

    def __call__(self, timeout_s: float) -> bool:
        """`timeout_s`: until the deadline; the window opened window_s - timeout_s ago (the last tick may
        have run past the opening)."""
        count = self.camera.wait_newer(self._seen, 0.0)  # no wait: the frame counter now
        if count > self._seen:
            self._seen = count
            age = getattr(self.camera, "frame_age_s", None)
            since_opening = max(0.0, self.window_s - timeout_s)
            if age is not None and age() <= self.fresh_s + since_opening:
                return True  # it arrived inside the window, or within fresh_s before it opened
        count = self.camera.wait_newer(self._seen, timeout_s)
        new = count > self._seen
        self._seen = count
        return new
