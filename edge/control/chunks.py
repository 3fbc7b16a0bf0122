"""Executing action chunks against measured latency (docs/chunks.md).

A chunk policy (horizon H > 1) returns H actions per inference, computed from frames captured at
`capture_s`. Step k of a chunk is meant for time ``capture_s + k * period_s``; at tick time t the
scheduler executes step

    k = round((t - capture_s) / period_s)

(halves round up; a negative delay, a frame stamped after the tick, gives 0), so a chunk that took two
periods to compute is entered at step 2, not at step 0: the robot does not replay the actions it should
have taken while the policy was thinking (the idea of real-time chunking, without its guided denoising). Steps before k are skipped; a chunk whose k has reached H is spent.

With temporal ensembling (ACT) every live chunk that has a step for t votes, weighted
``w_i = exp(-m * i)`` with i = 0 for the oldest chunk (ACT's convention: a small m gives old and new
chunks nearly equal weight, a large m favours the oldest). Without it the newest chunk wins.

When no live chunk has a step for t, `action` returns None and the loop commands a controlled stop:
the scheduler never extrapolates past the end of a chunk.

Pure: no thread, no clock of its own; every time comes in as an argument. All buffers are allocated in
the constructor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.errors import InputError
from edge.validation import check_range

# Entries of the entry-index account kept per index (an index above this is counted in the last bin).
MAX_ENTRY_BINS = 64


@dataclass(frozen=True)
class ChunkConfig:
    """Chunk execution, read from the ``policy:`` section of the robot config (keys of the same names)."""

    replan_every: int | None = None  # ticks between inference requests; None: max(1, H // 4)
    temporal_ensemble: float | None = None  # ACT's weight coefficient m (e.g. 0.01); None: newest chunk wins

    def __post_init__(self) -> None:
        check_range("policy.replan_every", self.replan_every, 1, 1024, integer=True, nullable=True, unit="ticks")
        check_range("policy.temporal_ensemble", self.temporal_ensemble, 0.0, 10.0, nullable=True,
                    hint="ACT's m in w_i = exp(-m * i); null turns ensembling off")

    def replan_ticks(self, horizon: int) -> int:
        """Ticks between inference requests for a policy of horizon `horizon`."""
        return self.replan_every if self.replan_every is not None else max(1, horizon // 4)


def ensemble_weights(count: int, m: float) -> np.ndarray:
    """ACT's temporal-ensembling weights for `count` chunks, oldest first: exp(-m * i), normalised."""
    weights = np.exp(-float(m) * np.arange(count, dtype=np.float64))
    return weights / weights.sum()


@dataclass(frozen=True)
class ChunkStats:
    """The scheduler's account, published in the loop's status snapshot."""

    horizon: int
    replan_every: int
    replans: int = 0  # chunks accepted
    replans_per_s: float = 0.0  # chunks accepted per second, since the first
    step: int | None = None  # the step of the newest chunk executed at the last tick (None: none)
    entry_index: int | None = None  # the step the newest chunk was entered at
    entry_delay_s: float | None = None  # its measured delay: first tick it ran minus its frames' capture
    entries: Mapping[int, int] = field(default_factory=dict)  # entry index -> chunks entered there
    mean_delay_s: Mapping[int, float] = field(default_factory=dict)  # entry index -> their mean delay
    empty_stops: int = 0  # times the chunks ran out and the loop stopped (a run of empty ticks counts once)
    empty_ticks: int = 0  # ticks without a chunk step (stop commanded)
    late_chunks: int = 0  # chunks already spent when they arrived (inference longer than the horizon)
    live_chunks: int = 0  # chunks with steps left at the last tick
    ensembled: int = 0  # chunks that voted at the last tick (1 without ensembling)
    queue_depth: int = 0  # inference requests waiting for the worker (0 or 1)
    in_flight: bool = False  # the worker is computing a chunk
    replaced_requests: int = 0  # requests replaced by a newer one before the worker took them
    worker_errors: int = 0


class ChunkScheduler:
    """Which action of which chunk the loop executes at each tick (see the module docstring)."""

    def __init__(self, horizon: int, action_dim: int, period_s: float, *, replan_every: int = 1,
                 temporal_ensemble: float | None = None):
        if horizon < 1 or action_dim < 1:
            raise InputError(f"a chunk needs horizon >= 1 and action_dim >= 1, got {horizon} and {action_dim}")
        if not 1 <= replan_every <= horizon:
            raise InputError(f"policy.replan_every must be in 1..{horizon} (the policy's horizon), got {replan_every}")
        if not period_s > 0:
            raise InputError(f"the control period must be > 0 s, got {period_s}")
        self.horizon = int(horizon)
        self.action_dim = int(action_dim)
        self.period_s = float(period_s)
        self.replan_every = int(replan_every)
        self.temporal_ensemble = temporal_ensemble
        # A chunk lives H periods and one arrives at most every tick: H + 1 slots hold every live one.
        slots = self.horizon + 1
        self._chunks = np.zeros((slots, self.horizon, self.action_dim), np.float32)
        self._capture_s = np.full(slots, -math.inf)
        self._entered = np.zeros(slots, bool)
        self._live: list[int] = []  # slots of live chunks, oldest first
        self._spare: list[int] = list(range(slots))  # free slots
        self._action = np.zeros(self.action_dim, np.float32)
        self._sum = np.zeros(self.action_dim, np.float64)
        self._entries = np.zeros(MAX_ENTRY_BINS, np.int64)
        self._delay_sum = np.zeros(MAX_ENTRY_BINS, np.float64)
        self.replans = 0
        self.empty_stops = 0
        self.empty_ticks = 0
        self.late_chunks = 0
        self.step: int | None = None
        self.entry_index: int | None = None
        self.entry_delay_s: float | None = None
        self.live_chunks = 0
        self.ensembled = 0
        self._first_accept_s: float | None = None
        self._last_accept_s: float | None = None
        self._empty = True  # the last tick had no step (so the first empty tick of a run is counted)

    # -- chunks in --------------------------------------------------------------------------------------
    def accept(self, actions: np.ndarray, capture_s: float, now_s: float) -> None:
        """Take a chunk [H, action_dim] computed from frames captured at `capture_s` (copied)."""
        actions = np.asarray(actions)
        if actions.shape != (self.horizon, self.action_dim):
            raise InputError(f"a chunk must have shape ({self.horizon}, {self.action_dim}), got {actions.shape}")
        capture_s = float(capture_s)
        if not math.isfinite(capture_s):
            raise InputError(f"a chunk's capture time must be finite, got {capture_s}")
        self.replans += 1
        if self._first_accept_s is None:
            self._first_accept_s = now_s
        self._last_accept_s = now_s
        if self._index(now_s, capture_s) >= self.horizon:
            self.late_chunks += 1  # nothing of it is for now or later: dropped, counted
            return
        if not self._spare:
            self._free(self._live.pop(0))  # every slot live: the oldest goes (cannot happen at one per tick)
        slot = self._spare.pop()
        np.copyto(self._chunks[slot], actions)
        self._capture_s[slot] = capture_s
        self._entered[slot] = False
        self._live.append(slot)

    def _free(self, slot: int) -> None:
        self._capture_s[slot] = -math.inf
        self._spare.append(slot)

    def clear(self) -> None:
        """Forget every chunk (after a stop, an e-stop or an inference error: none of them is about now)."""
        while self._live:
            self._free(self._live.pop())
        self.step = None
        self.live_chunks = 0

    # -- actions out ------------------------------------------------------------------------------------
    def _index(self, now_s: float, capture_s: float) -> int:
        return max(0, math.floor((now_s - capture_s) / self.period_s + 0.5))  # round half up

    def action(self, now_s: float) -> np.ndarray | None:
        """The action for tick time `now_s` (a view of a buffer reused every tick), or None: no chunk has
        a step for now, and the caller commands a controlled stop."""
        live = self._live
        for slot in tuple(live):
            if self._index(now_s, self._capture_s[slot]) >= self.horizon:
                live.remove(slot)  # spent
                self._free(slot)
        self.live_chunks = len(live)
        if not live:
            self.step = None
            self.ensembled = 0
            if not self._empty:
                self.empty_stops += 1
            self._empty = True
            self.empty_ticks += 1
            return None
        self._empty = False
        newest = live[-1]
        k = self._index(now_s, self._capture_s[newest])
        self.step = k
        if not self._entered[newest]:
            self._entered[newest] = True
            delay = float(now_s - self._capture_s[newest])
            self.entry_index, self.entry_delay_s = k, delay
            b = min(k, MAX_ENTRY_BINS - 1)
            self._entries[b] += 1
            self._delay_sum[b] += delay
        m = self.temporal_ensemble
        if m is None or len(live) == 1:
            self.ensembled = 1
            np.copyto(self._action, self._chunks[newest, k])
            return self._action
        # ACT's weights, i = 0 for the oldest live chunk; each votes with its own step for now.
        self._sum.fill(0.0)
        total = 0.0
        for i, slot in enumerate(live):
            weight = math.exp(-m * i)
            self._sum += weight * self._chunks[slot, self._index(now_s, self._capture_s[slot])]
            total += weight
        self.ensembled = len(live)
        np.divide(self._sum, total, out=self._sum)
        np.copyto(self._action, self._sum, casting="same_kind")
        return self._action

    # -- account ----------------------------------------------------------------------------------------
    def stats(self, **worker) -> ChunkStats:
        """The account as a frozen snapshot; `worker` adds the inference worker's fields (queue_depth ...)."""
        span = (self._last_accept_s - self._first_accept_s) if self._first_accept_s is not None else 0.0
        rate = (self.replans - 1) / span if span > 0 else 0.0
        bins = np.flatnonzero(self._entries)
        return ChunkStats(horizon=self.horizon, replan_every=self.replan_every, replans=self.replans,
                          replans_per_s=float(rate), step=self.step, entry_index=self.entry_index,
                          entry_delay_s=self.entry_delay_s,
                          entries={int(b): int(self._entries[b]) for b in bins},
                          mean_delay_s={int(b): float(self._delay_sum[b] / self._entries[b]) for b in bins},
                          empty_stops=self.empty_stops, empty_ticks=self.empty_ticks, late_chunks=self.late_chunks,
                          live_chunks=self.live_chunks, ensembled=self.ensembled, **worker)
