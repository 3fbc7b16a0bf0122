"""The loop's side of a chunk policy (H > 1): requests to the inference worker every `replan_every`
ticks, chunks from it into the scheduler, and the action the scheduler has for now (docs/chunks.md).

Per running tick, in order: collect a finished chunk (or the worker's error), post a new request when
`replan_every` ticks have passed since the last one (at once after a stop), then ask the scheduler for
the action of this tick. The tick never waits: posting copies the inputs, collecting takes a short lock.
Whenever the loop does not run the policy (hold, e-stop, stale input) it calls `stop`: the chunks and
any queued request are dropped, as none of them is about the moment the robot moves again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.control.chunks import ChunkConfig, ChunkScheduler, ChunkStats
from edge.control.observation import CameraInputs, PolicyShape
from edge.control.policy_worker import ChunkResult, PolicyWorker
from edge.errors import ConfigError


@dataclass
class ChunkStep:
    """What one running tick got: the action for now (None: no chunk has a step, stop), a chunk that
    arrived this tick, and an inference error or a dead worker (the loop stops the robot)."""

    action: np.ndarray | None
    arrived: ChunkResult | None = None
    error: str | None = None


class ChunkExecution:
    def __init__(self, pipeline, shape: PolicyShape, period_s: float, frame_shapes, config: ChunkConfig, *,
                 clock):
        horizon = shape.horizon
        self.replan_every = config.replan_ticks(horizon)
        if not 1 <= self.replan_every <= horizon:
            raise ConfigError(f"policy.replan_every must be in 1..{horizon} (the policy's horizon: it cannot "
                              f"replan less often than a chunk lasts), got {self.replan_every}")
        self.scheduler = ChunkScheduler(horizon, shape.action_dim, period_s, replan_every=self.replan_every,
                                        temporal_ensemble=config.temporal_ensemble)
        self.worker = PolicyWorker(pipeline, frame_shapes, shape.proprio_dim, horizon, shape.action_dim,
                                   clock=clock, score_steps=self.score_steps)
        self.spread = np.zeros((horizon, shape.action_dim), np.float32)  # the newest chunk's spread
        self._since_post: int | None = None  # ticks since the last request; None: none since a stop

    def score_steps(self) -> int:
        """The leading steps of the next chunk that its uncertainty score covers: through the end of the
        part that will be executed (entered near the last measured entry index, for replan_every steps)."""
        entry = self.scheduler.entry_index or 0
        return min(self.scheduler.horizon, entry + self.replan_every)

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.close()

    def step(self, now: float, cameras: CameraInputs, proprio: np.ndarray, language) -> ChunkStep:
        if not self.worker.started:
            self.worker.start()  # on the first running tick: a loop that never runs the policy owns no thread
        arrived = self.worker.take()
        error = None
        if arrived is not None and arrived.error is not None:
            error, arrived = f"inference failed: {arrived.error}", None
            self.scheduler.clear()
        elif arrived is not None:
            self.scheduler.accept(arrived.actions, arrived.capture_s, now)
            np.copyto(self.spread, arrived.spread)
        if not self.worker.alive:
            error = f"the policy worker is not running ({self.worker.died or 'not started'})"
            self.scheduler.clear()
        elif self._since_post is None or self._since_post >= self.replan_every:
            self.worker.post(cameras.frames, proprio, language, cameras.oldest_s)
            self._since_post = 0
        if self._since_post is not None:
            self._since_post += 1
        if error is not None:
            return ChunkStep(None, None, error)
        return ChunkStep(self.scheduler.action(now), arrived)

    def stop(self) -> None:
        self.scheduler.clear()
        self.worker.discard()
        self._since_post = None

    def stats(self) -> ChunkStats:
        return self.scheduler.stats(**self.worker.stats())
