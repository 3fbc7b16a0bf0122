"""Frame-synchronous ticks on a fake clock: RateKeeper.sync_to with a camera whose frames arrive at set
times (edge/control/frame_sync.py, edge/control/ratekeeper.py), and the latest-frame buffer's signal."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge.control.frame_sync import FrameSync, frame_sync_window, fresh_before_window
from edge.control.ratekeeper import RateKeeper
from edge.errors import ConfigError
from edge.io.latest_frame import LatestFrame
from edge.service.config import LoopSection


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class ScheduledCamera:
    """Frames at `first_s + k * period_s` on the fake clock; wait_newer advances the clock to the next one."""

    def __init__(self, clock: FakeClock, first_s: float, period_s: float):
        self.clock, self.first_s, self.period_s = clock, first_s, period_s

    def count_at(self, t: float) -> int:
        return 0 if t < self.first_s else int((t - self.first_s) / self.period_s + 1e-6) + 1

    def wait_newer(self, count: int, timeout_s: float) -> int:
        now = self.clock.now
        if self.count_at(now) > count:
            return self.count_at(now)
        arrival = self.first_s + count * self.period_s  # the (count+1)-th frame
        if arrival <= now + timeout_s:
            self.clock.now = arrival
        else:
            self.clock.now = now + timeout_s
        return self.count_at(self.clock.now)

    def frame_age_s(self) -> float:
        last = self.count_at(self.clock.now)
        return self.clock.now - (self.first_s + (last - 1) * self.period_s) if last else float("inf")


def run_ticks(keeper: RateKeeper, clock: FakeClock, camera: ScheduledCamera, ticks: int, work_s: float):
    starts, ages = [], []
    for _ in range(ticks):
        start = clock.now
        starts.append(start)
        last = camera.count_at(start)
        ages.append(start - (camera.first_s + (last - 1) * camera.period_s) if last else np.inf)
        clock.now += work_s
        keeper.wait()
    return np.array(starts), np.array(ages)


def test_ticks_start_on_the_frame_inside_the_window_and_keep_the_schedule():
    clock = FakeClock()
    keeper = RateKeeper(0.1, clock=clock, sleep=clock.sleep)
    camera = ScheduledCamera(clock, first_s=0.037, period_s=0.1)  # 10 fps, 37 ms out of phase
    keeper.sync_to(FrameSync(camera), frame_sync_window(None, 10.0, 10.0))
    starts, ages = run_ticks(keeper, clock, camera, 50, work_s=0.015)
    # From the second tick on each tick starts on a frame: age 0, never more than one camera period.
    assert np.all(ages[1:] < 1e-9)
    # The 10 Hz schedule holds: one tick per period, none skipped, no overrun.
    assert np.allclose(np.diff(starts[2:]), 0.1)
    assert keeper.overruns == 0 and keeper.synced_ticks >= 48
    # Each start is inside the window before its grid deadline (k * 0.1), never after it.
    offsets = starts[1:] - np.arange(1, 50) * 0.1
    assert np.all(offsets <= 1e-9) and np.all(offsets >= -0.09 - 1e-9)


@pytest.mark.parametrize("phase_s", [0.001, 0.005, 0.0105, 0.012, 0.02, 0.05, 0.089, 0.095, 0.099])
def test_whatever_the_cameras_phase_the_frame_is_at_most_the_gap_old(phase_s):
    # A 10 fps camera, a 10 Hz loop, the 90 ms window: frames arriving just after the window opens (0.0105,
    # 0.012) once made every tick start at the opening on the frame of the period before (~98 ms old).
    clock = FakeClock()
    keeper = RateKeeper(0.1, clock=clock, sleep=clock.sleep)
    camera = ScheduledCamera(clock, first_s=phase_s, period_s=0.1)
    window = frame_sync_window(None, 10.0, 10.0)
    keeper.sync_to(FrameSync(camera, fresh_before_window(10.0, window), window), window)
    starts, ages = run_ticks(keeper, clock, camera, 40, work_s=0.015)
    assert np.max(ages[2:]) <= 0.1 - window + 1e-9, ages  # the 10 ms gap between windows, at most
    assert np.allclose(np.diff(starts[3:]), 0.1, atol=0.011) and keeper.overruns == 0


def test_without_frame_sync_the_frame_is_older():
    clock = FakeClock()
    keeper = RateKeeper(0.1, clock=clock, sleep=clock.sleep)
    camera = ScheduledCamera(clock, first_s=0.037, period_s=0.1)
    _, ages = run_ticks(keeper, clock, camera, 50, work_s=0.015)
    assert np.median(ages[1:]) == pytest.approx(0.063)  # the demo's ~61 ms: out of phase


def test_no_frame_in_the_window_starts_on_the_deadline():
    clock = FakeClock()
    keeper = RateKeeper(0.1, clock=clock, sleep=clock.sleep)
    camera = ScheduledCamera(clock, first_s=1e9, period_s=0.1)  # frames never come
    keeper.sync_to(FrameSync(camera), 0.05)
    starts, _ = run_ticks(keeper, clock, camera, 5, work_s=0.01)
    assert np.allclose(starts, np.arange(5) * 0.1)
    assert keeper.synced_ticks == 0


def test_frame_sync_window_auto_and_explicit():
    assert frame_sync_window(None, 30.0, 10.0) == pytest.approx(1 / 30)  # one camera period
    assert frame_sync_window(None, 10.0, 10.0) == pytest.approx(0.09)  # capped under the control period
    assert frame_sync_window(None, 5.0, 10.0) is None  # the camera is slower than the ticks: off
    assert frame_sync_window(None, None, 10.0) is None  # rate unknown: off
    assert frame_sync_window(False, 30.0, 10.0) is None
    assert frame_sync_window(True, None, 10.0) == pytest.approx(0.05)
    assert frame_sync_window(True, 30.0, 10.0, 0.02) == pytest.approx(0.02)
    with pytest.raises(ConfigError, match="loop.frame_sync_window_s"):
        frame_sync_window(True, 30.0, 10.0, 0.2)


def test_loop_section_keys_are_validated():
    assert LoopSection().frame_sync is None
    with pytest.raises(ConfigError, match="loop.frame_sync "):
        LoopSection(frame_sync="yes")
    with pytest.raises(ConfigError, match="loop.frame_sync_window_s"):
        LoopSection(frame_sync_window_s=0.5)
    with pytest.raises(ConfigError, match="frame-sync window"):
        RateKeeper(0.1).sync_to(lambda t: True, 0.1)
    with pytest.raises(ConfigError, match="signals new frames"):
        FrameSync(object())


def test_latest_frame_signals_a_new_frame():
    frames = LatestFrame("the camera")
    assert frames.wait_newer(0, 0.0) == 0  # nothing yet, no wait
    image = np.zeros((2, 2, 3), np.uint8)
    frames.publish(image, 1.0)
    assert frames.wait_newer(0, 0.0) == 1  # already newer: returns at once
    publisher = threading.Timer(0.01, frames.publish, (image.copy(), 2.0))
    publisher.start()
    assert frames.wait_newer(1, 5.0) == 2  # woken by the publish, not by the timeout
    publisher.join()


def test_wiring_turns_frame_sync_on_from_the_config():
    from types import SimpleNamespace

    from edge.service import wiring
    from edge.service.config import config_from_dict

    def config(camera_fps, **loop):
        return config_from_dict({"bundle": "b", "camera": {"source": "http://127.0.0.1:9/v", "fps": camera_fps},
                                 "motor": {"port": "/dev/null"}, "loop": loop})

    def loop(camera):
        return SimpleNamespace(keeper=RateKeeper(0.1), camera=camera)

    camera = LatestFrame("the camera")  # anything with wait_newer
    on = loop(camera)
    assert wiring.sync_frames(on, config(30.0)) == pytest.approx(1 / 30)
    assert on.keeper.sync_window_s == pytest.approx(1 / 30)
    assert wiring.sync_frames(loop(camera), config(5.0)) is None  # slower camera: auto is off
    assert wiring.sync_frames(loop(camera), config(30.0, frame_sync=False)) is None
    assert wiring.sync_frames(loop(object()), config(30.0)) is None  # auto: a camera without the signal
    with pytest.raises(ConfigError, match="signals new frames"):
        wiring.sync_frames(loop(object()), config(30.0, frame_sync=True))


class MeasuredCamera:
    """A camera whose frames arrived at `fps` (capture times on a latest-frame buffer), camera.fps unset."""

    def __init__(self, fps: float, frames: int = 20):
        self.frames = LatestFrame("the camera")
        for k in range(frames):
            self.frames.publish(np.zeros((2, 2, 3), np.uint8), 100.0 + k / fps)

    def wait_newer(self, count: int, timeout_s: float) -> int:
        return self.frames.wait_newer(count, timeout_s)

    def measured_fps(self):
        return self.frames.rate_hz()


def test_the_frame_rate_is_measured_on_the_capture_times():
    frames = LatestFrame("the camera")
    for k in range(3):
        frames.publish(np.zeros((2, 2, 3), np.uint8), 5.0 + 0.1 * k)
    assert frames.rate_hz() is None  # three frames: too few to say
    for k in range(3, 30):  # 10 fps for 3 s, then 20 fps
        frames.publish(np.zeros((2, 2, 3), np.uint8), 5.0 + 0.1 * k)
    for k in range(1, 21):
        frames.publish(np.zeros((2, 2, 3), np.uint8), 5.0 + 2.9 + 0.05 * k)
    assert frames.rate_hz() == pytest.approx(20.0)  # the last 16 frames: the stream's rate now, not its history
    frames.reset()
    assert frames.rate_hz() is None


def test_auto_frame_sync_uses_the_measured_rate_when_camera_fps_is_not_set():
    from types import SimpleNamespace

    from edge.service import wiring
    from edge.service.config import config_from_dict

    unset = config_from_dict({"bundle": "b", "camera": {"source": "http://127.0.0.1:9/v"},
                              "motor": {"port": "/dev/null"}})

    def loop(camera):
        return SimpleNamespace(keeper=RateKeeper(0.1), camera=camera)

    assert wiring.sync_frames(loop(MeasuredCamera(30.0)), unset) == pytest.approx(1 / 30)
    assert wiring.sync_frames(loop(MeasuredCamera(9.8)), unset) == pytest.approx(0.09)  # a 10 fps camera's jitter
    assert wiring.sync_frames(loop(MeasuredCamera(6.0)), unset) is None  # slower than the ticks: off
    assert wiring.sync_frames(loop(MeasuredCamera(30.0, frames=2)), unset) is None  # no rate yet: off
    stated = config_from_dict({"bundle": "b", "camera": {"source": "http://127.0.0.1:9/v", "fps": 5.0},
                               "motor": {"port": "/dev/null"}})
    assert wiring.sync_frames(loop(MeasuredCamera(30.0)), stated) is None  # camera.fps, when set, decides
