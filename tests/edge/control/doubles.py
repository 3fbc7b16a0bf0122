"""Test doubles for the control loop: a fake clock, cameras, a motor link and policy pipelines of any
shape (H, A, cameras, proprio sources, language or none) written to the pipeline's contract
(edge/inference/pipeline.py: `infer(frames, proprio, language) -> PolicyOutput`)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from edge.control.loop import ControlLoop
from edge.control.safety import SafetyConfig, SafetyLayer
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.errors import InputError
from edge.inference.spec import PolicySpec
from edge.io.protocol import StatusFlags, Telemetry
from tests.waiting import HANG_GUARD_S

PERIOD = 0.1


class FakeClock:
    def __init__(self, start: float = 100.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeCamera:
    """Frames stamped at the clock's time when `fresh`, else the last stamp is kept (a frozen camera)."""

    def __init__(self, clock, shape=(48, 64, 3), value: int = 100):
        self.clock, self.frame_shape, self.value = clock, shape, value
        self.fresh = True
        self.stamp: float | None = None
        self.count = 0

    def read_into(self, out):
        if self.fresh:
            self.stamp = self.clock()
            self.count += 1
        if self.stamp is None:
            return None
        out[...] = self.value
        return self.stamp, self.count


class FakeLink:
    """Telemetry at the clock's time from `velocities`/`positions`; every command kept."""

    def __init__(self, clock, channels: int, positions=None):
        self.clock = clock
        self.config = SimpleNamespace(channels=channels)
        self.velocities = (0.0,) * channels
        self.positions = tuple(positions) if positions is not None else (0.0,) * channels
        self.sent: list[np.ndarray] = []
        self.telemetry_on = True
        self._seq = 0

    def latest_telemetry(self):
        if not self.telemetry_on:
            return None, float("-inf")
        self._seq += 1
        return Telemetry(seq=self._seq, controller_time_ms=1000 + self._seq, velocities=tuple(self.velocities),
                         positions=tuple(self.positions), status=StatusFlags.MOTORS_ENABLED,
                         last_command_seq=self._seq), self.clock()

    def send_targets(self, command):
        self.sent.append(np.array(command, np.float32))
        return SimpleNamespace(delivered=True)

    def emergency_stop(self):
        return SimpleNamespace(delivered=True, seq=0)

    def clear_emergency_stop(self):
        return SimpleNamespace(delivered=True, seq=0)

    def is_confirmed(self, sent):
        return True


def spec(horizon=8, action=2, cameras=("front",), language=False, proprio=("velocities[0]", "velocities[1]"),
         kinds="velocity") -> PolicySpec:
    return PolicySpec.from_dict({
        "name": "double",
        "cameras": [{"name": n, "height": 32, "width": 32} for n in cameras],
        "language": {"tokenizer": "words.json", "max_tokens": 8} if language else None,
        "proprio": {"names": [f"p{i}" for i in range(len(proprio))], "sources": list(proprio)},
        "action": {"names": [f"a{i}" for i in range(action)], "horizon": horizon,
                   "kinds": [kinds] * action if isinstance(kinds, str) else list(kinds),
                   "low": [-1.0] * action, "high": [1.0] * action, "max_slew_per_s": [10.0] * action},
        "dropout_rate": 0.1,
    })


class ChunkPipeline:
    """A chunk policy double: step k of every chunk is `base + 0.01 * k` on each channel (readable from the
    command), base growing by 0.1 per call. With `hold` set, infer waits until `release()`: the test
    decides how many periods an inference takes. `fail` raises it from infer once (then clears)."""

    def __init__(self, policy_spec: PolicySpec, *, hold: bool = False, score: float = 0.01):
        self.bundle = SimpleNamespace(spec=policy_spec)
        self.horizon, self.action_dim = policy_spec.action.horizon, policy_spec.action.dim
        self.cameras = policy_spec.cameras
        self.needs_language = policy_spec.language is not None
        self.samples = 4
        self.score_steps = self.horizon
        self.score = score
        self.calls: list[dict] = []
        self.hold = hold
        self.fail: BaseException | None = None
        self._released = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.tokenizer = SimpleNamespace(encode=lambda text: [1])

    def embedding(self, text):
        return np.ones((1, 4), np.float32)

    @staticmethod
    def step_value(call: int, k: int) -> float:
        return 0.1 * call + 0.01 * k

    def release(self) -> None:
        self._released.release()

    def infer(self, frames, proprio, language):
        frames = [frames] if isinstance(frames, np.ndarray) else list(frames)
        if len(frames) != len(self.cameras):
            raise InputError(f"{len(frames)} frames for {len(self.cameras)} cameras")
        self.calls.append({"frames": [f.copy() for f in frames], "proprio": np.array(proprio),
                           "language": language, "score_steps": self.score_steps})
        try:
            if self.hold:
                assert self._released.acquire(timeout=HANG_GUARD_S), "the test never released the inference"
            if self.fail is not None:
                error, self.fail = self.fail, None
                raise error
            call = len(self.calls)
            steps = np.array([self.step_value(call, k) for k in range(self.horizon)], np.float32)
            actions = np.repeat(steps[:, None], self.action_dim, axis=1)
            spread = np.full_like(actions, 0.001)
            return SimpleNamespace(actions=actions, action=actions[0], spread=spread, score=self.score,
                                   samples=actions[None], score_per_step=np.full(self.horizon, self.score),
                                   times=SimpleNamespace(resize_ms=0.1, vision_ms=1.0, head_ms=1.0, reduce_ms=0.1,
                                                         h2d_ms=0.0, d2h_ms=0.0))
        finally:
            self.done.release()

    def wait_done(self, calls: int = 1) -> None:
        for _ in range(calls):
            assert self.done.acquire(timeout=HANG_GUARD_S), "the worker never ran the inference"


def make_loop(pipeline, cameras, link, clock, *, slew=10.0, decel=10.0, threshold=1.0, **options) -> ControlLoop:
    policy = pipeline.bundle.spec
    dim = policy.action.dim
    safety = SafetyLayer(SafetyConfig(action_low=policy.action.low, action_high=policy.action.high,
                                      max_slew_per_s=(slew,) * dim, decel_per_s=(decel,) * dim, period_s=PERIOD,
                                      kinds=policy.action.kinds))
    gate = UncertaintyGate(GateConfig(threshold=threshold, hard_ceiling=2 * threshold, enter_ticks=1, exit_ticks=1))
    return ControlLoop(pipeline, cameras, link, safety, gate, PERIOD, stale_after_s=3 * PERIOD, clock=clock,
                       sleep=lambda s: clock.advance(s), **options)


def wait_until(predicate, what: str) -> None:
    import time

    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)
