"""Inference on its own thread for chunk policies, so that the command tick never waits on it.

The tick `post`s a request every `replan_every` ticks: the frames, proprio and language embedding are
copied into buffers allocated here once, with the frames' capture time. The queue holds one request:
a newer one replaces a request the worker has not taken yet (counted in `replaced`), so the worker
always computes from the newest inputs and the queue can never grow. The worker swaps the request
buffers with its own under a lock (no copy), runs `pipeline.infer`, and copies the chunk, its spread
and score into a result slot that the tick collects with `take` (a short lock, never a wait).

An inference error is counted and reported to the tick by `take` (the loop then commands a controlled
stop and forgets its chunks); the worker goes on with the next request. An unexpected exception ends
the worker (it is logged with its traceback): `alive` turns False and the loop stops the robot on every
tick after, rather than run on with no policy.

Thread-safe between one tick thread (post, take, stats) and the worker thread; `close` joins it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import EdgeError, InputError

logger = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    """One chunk, as the tick collects it (the buffers are the worker's result slot: copy to keep)."""

    actions: np.ndarray  # float32 [H, A]
    spread: np.ndarray  # float32 [H, A]
    score: float
    capture_s: float  # when the frames it was computed from were captured
    finished_s: float  # when inference finished (worker clock)
    samples: int
    times: object = None  # the pipeline's StageTimes of this inference (a copy)
    error: str | None = None  # set instead of a chunk when inference failed
    features: np.ndarray | None = None  # the vision features it was computed from (the failure monitor's)


@dataclass
class _Inputs:
    frames: list[np.ndarray]
    proprio: np.ndarray
    language: np.ndarray | None = None
    capture_s: float = 0.0
    generation: int = 0  # the worker's generation when posted: a discard makes older requests moot


class PolicyWorker:
    """One inference thread with a one-deep request slot (see the module docstring)."""

    def __init__(self, pipeline, frame_shapes: Sequence[tuple[int, ...]], proprio_dim: int, horizon: int,
                 action_dim: int, *, clock, score_steps=None, name: str = "policy-worker"):
        self.pipeline = pipeline
        self.clock = clock
        # score_steps(): how many leading steps of the next chunk the score should cover (the part that
        # will be executed); set on the pipeline before each inference where it has that attribute.
        self._score_steps = score_steps
        self._requests = [_Inputs([np.zeros(s, np.uint8) for s in frame_shapes], np.zeros(proprio_dim, np.float32))
                          for _ in range(2)]
        self._pending: _Inputs | None = None  # the queued request (one of the two sets)
        self._working = self._requests[1]  # the set the worker reads; the tick writes the other
        self._result = ChunkResult(np.zeros((horizon, action_dim), np.float32),
                                   np.zeros((horizon, action_dim), np.float32), 0.0, 0.0, 0.0, 0)
        # What `take` hands the tick: a copy made under the lock, so a result the worker writes meanwhile
        # never changes a chunk the tick is reading.
        self._collected = ChunkResult(np.zeros((horizon, action_dim), np.float32),
                                      np.zeros((horizon, action_dim), np.float32), 0.0, 0.0, 0.0, 0)
        self._result_ready = False
        self._generation = 0
        self._errors_reported = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._busy = False
        self.requests = 0
        self.replaced = 0
        self.completed = 0
        self.errors = 0
        self.last_error: str | None = None
        self.died: str | None = None
        self._thread: threading.Thread | None = None
        self._name = name

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> PolicyWorker:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def __enter__(self) -> PolicyWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.died is None

    # -- the tick's side --------------------------------------------------------------------------------
    def post(self, frames: Sequence[np.ndarray], proprio: np.ndarray, language: np.ndarray | None,
             capture_s: float) -> None:
        """Queue a request (copies the inputs); replaces one the worker has not taken yet. Never waits
        on inference: the lock is held only by other copies and swaps."""
        with self._wake:
            # The queued request is overwritten in place (the worker has not taken it); else the buffer set
            # the worker is not reading.
            target = self._pending if self._pending is not None else self._other(self._working)
            if len(frames) != len(target.frames):
                raise InputError(f"{len(frames)} frames for a policy of {len(target.frames)} cameras")
            for i, frame in enumerate(frames):
                if target.frames[i].shape != frame.shape:
                    # A camera came back at another resolution: a new buffer, once, not every tick.
                    target.frames[i] = np.empty_like(frame)
                np.copyto(target.frames[i], frame)
            np.copyto(target.proprio, proprio)
            target.language = language  # the cache's embedding: never written after it is made
            target.capture_s = float(capture_s)
            target.generation = self._generation
            if self._pending is not None:
                self.replaced += 1
            self._pending = target
            self.requests += 1
            self._wake.notify()

    def _other(self, inputs: _Inputs) -> _Inputs:
        a, b = self._requests
        return b if inputs is a else a

    def take(self) -> ChunkResult | None:
        """The chunk finished since the last call (a copy whose buffers stay valid until the next `take`),
        a result with `error` set when inference failed, or None."""
        with self._lock:
            out = self._collected
            if self.errors > self._errors_reported:
                self._errors_reported = self.errors
                self._result_ready = False
                out.error, out.score = self.last_error, float("nan")
                return out
            if not self._result_ready:
                return None
            self._result_ready = False
            result = self._result
            np.copyto(out.actions, result.actions)
            np.copyto(out.spread, result.spread)
            out.score, out.capture_s, out.finished_s = result.score, result.capture_s, result.finished_s
            out.samples, out.times, out.error = result.samples, result.times, None
            out.features = _copy_into(out.features, result.features)
            return out

    @property
    def queue_depth(self) -> int:
        return 0 if self._pending is None else 1

    @property
    def in_flight(self) -> bool:
        return self._busy

    def discard(self) -> None:
        """Drop a queued request, an uncollected result and the one being computed (the loop stopped:
        none of them is about the moment the robot moves again)."""
        with self._lock:
            self._pending = None
            self._result_ready = False
            self._generation += 1

    def stats(self) -> dict:
        return {"queue_depth": self.queue_depth, "in_flight": self.in_flight, "replaced_requests": self.replaced,
                "worker_errors": self.errors}

    # -- the worker's side ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while self._pending is None and not self._stop:
                        self._wake.wait()
                    if self._stop:
                        return
                    # The request's buffers become the worker's; the tick writes the other set from now.
                    self._working, self._pending = self._pending, None
                    self._busy = True
                self._infer(self._working)
        except Exception as exc:  # noqa: BLE001 - reported to the loop, which stops the robot
            self.died = f"{type(exc).__name__}: {exc}"
            logger.exception("the policy worker died; the loop commands a controlled stop from now on")
        finally:
            self._busy = False

    def _infer(self, inputs: _Inputs) -> None:
        pipeline = self.pipeline
        frames = inputs.frames[0] if len(inputs.frames) == 1 else inputs.frames
        try:
            if self._score_steps is not None and hasattr(pipeline, "score_steps"):
                pipeline.score_steps = int(self._score_steps())
            out = pipeline.infer(frames, inputs.proprio, inputs.language)
        except EdgeError as exc:
            with self._lock:
                self.errors += 1
                self.last_error = str(exc)
                self._busy = False
            logger.warning("inference failed on the policy worker: %s", exc)
            return
        finished = self.clock()
        actions = np.asarray(out.actions) if hasattr(out, "actions") else np.asarray(out.action)[None]
        spread = np.asarray(out.spread)
        times = getattr(out, "times", None)
        with self._lock:
            if inputs.generation != self._generation:
                self._busy = False  # posted before a discard: dropped
                return
            result = self._result
            np.copyto(result.actions, actions.reshape(result.actions.shape))
            np.copyto(result.spread, spread.reshape(result.spread.shape))
            result.score = float(out.score)
            result.capture_s = inputs.capture_s
            result.finished_s = finished
            result.samples = int(getattr(pipeline, "samples", 0))
            result.times = None if times is None else type(times)(**vars(times))
            result.features = _copy_into(result.features, getattr(out, "features", None))
            self._result_ready = True
            self.completed += 1
            self._busy = False


def _copy_into(buffer: np.ndarray | None, source: np.ndarray | None) -> np.ndarray | None:
    """`source` copied into `buffer`, allocated on the first copy only (its shape is the bundle's)."""
    if source is None:
        return None
    if buffer is None or buffer.shape != source.shape:
        buffer = np.empty(source.shape, np.float32)
    np.copyto(buffer, source)
    return buffer
