"""What the control loop publishes once per tick: the per-tick record and one frozen status snapshot.

Readers on other threads (the control socket, the metrics endpoint, sd_notify's STATUS= line,
`vla-edge status`) read only `ControlLoop.status()`, the snapshot the loop published at the end of its
last completed tick. They never look at the loop's counters, ring buffer, gate or devices, so they
cannot disagree about "the last tick" or catch a record half written (docs/architecture.md,
"One control tick").
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Mode(enum.IntEnum):
    NOMINAL = 0
    FALLBACK = 1  # uncertainty gate or stale/failed inputs: controlled stop (or damped)
    HOLD = 2  # no instruction, or its embedding is not ready yet
    ESTOP = 3


# The named sections of one tick, in the order they happen; each is a `<name>_ms` field of the record.
# observe: camera frame + telemetry; resize .. reduce: inside PolicyPipeline.infer (h2d/d2h are the
# backends' copies, 0 on CPU; vision and head include them); gate: uncertainty gate; safety: safety
# layer; send: the serial write.
TICK_STAGES = ("observe", "resize", "h2d", "vision", "head", "d2h", "reduce", "gate", "safety", "send")
# Window statistics of these fields are published with the snapshot (policy: resize .. reduce; tick:
# frame ready -> command bytes handed to the link; glass_to_wire: the frame's capture time -> the command's
# bytes handed to the link, derived from the record: start - frame time + observe + tick).
WINDOW_FIELDS = ("tick", "policy", "glass_to_wire", *TICK_STAGES)
WINDOW_QUANTILES = (0.5, 0.9, 0.99, 1.0)


def tick_dtype(action_dim: int) -> np.dtype:
    return np.dtype([
        ("tick", np.int64),
        ("start_s", np.float64),
        ("start_offset_ms", np.float32),  # tick start minus its scheduled deadline (jitter)
        ("frame_time_s", np.float64),
        ("telemetry_time_s", np.float64),
        ("samples", np.int32),  # T of this tick's inference (0 when the policy did not run)
        *[(f"{stage}_ms", np.float32) for stage in TICK_STAGES],
        ("policy_ms", np.float32),  # resize + vision + head + reduce
        ("tick_ms", np.float32),  # frame ready -> command bytes handed to the link
        ("lag_ms", np.float32),
        ("score", np.float32),
        ("mode", np.int8),
        ("reasons", np.int32),
        ("command", np.float32, (action_dim,)),
        ("delivered", np.bool_),
    ])


class TickRecorder:
    """Fixed-size ring buffer of tick records; no allocation per tick."""

    def __init__(self, capacity: int, action_dim: int = 2):
        self.records = np.zeros(capacity, dtype=tick_dtype(action_dim))
        self.count = 0

    def next(self) -> np.void:
        row = self.records[self.count % len(self.records)]
        self.count += 1
        return row

    def latest(self, n: int | None = None) -> np.ndarray:
        """The last n records in time order (a copy)."""
        size = min(self.count, len(self.records))
        n = size if n is None else min(n, size)
        end = self.count % len(self.records)
        idx = (np.arange(end - n, end)) % len(self.records)
        return self.records[idx].copy()


class StageTimer:
    """Named sections of one tick on the loop's clock, written into the tick's record (LeRobot's loop
    timer): ``with timer.section("observe"): ...`` sets ``row["observe_ms"]``. The section objects are
    made once, so timing a tick allocates nothing."""

    def __init__(self, clock: Callable[[], float], stages: tuple[str, ...] = TICK_STAGES):
        self.clock = clock
        self.row: np.void | None = None
        self._sections = {name: _Section(self, f"{name}_ms") for name in stages}

    def start(self, row: np.void) -> None:
        self.row = row
        for name in self._sections:
            row[f"{name}_ms"] = np.nan

    def section(self, name: str) -> _Section:
        return self._sections[name]


class _Section:
    __slots__ = ("_timer", "_field", "_started")

    def __init__(self, timer: StageTimer, field_name: str):
        self._timer = timer
        self._field = field_name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = self._timer.clock()

    def __exit__(self, *exc_info: object) -> None:
        self._timer.row[self._field] = (self._timer.clock() - self._started) * 1e3


@dataclass(frozen=True)
class LastTick:
    """The last completed tick: its index, outcome, command and stage times (ms; NaN: did not run)."""

    index: int
    start_s: float
    mode: str
    score: float
    reasons: int
    command: tuple[float, ...]
    delivered: bool
    samples: int
    stages_ms: Mapping[str, float]
    policy_ms: float
    tick_ms: float
    # The policy's mean action and spread per channel (None: the policy did not run this tick).
    action: tuple[float, ...] | None = None
    spread: tuple[float, ...] | None = None

    @classmethod
    def from_record(cls, row: np.void, mode: str, action: np.ndarray | None, spread: np.ndarray | None) -> LastTick:
        return cls(index=int(row["tick"]), start_s=float(row["start_s"]), mode=mode, score=float(row["score"]),
                   reasons=int(row["reasons"]), command=tuple(float(v) for v in row["command"]),
                   delivered=bool(row["delivered"]), samples=int(row["samples"]),
                   stages_ms={s: float(row[f"{s}_ms"]) for s in TICK_STAGES}, policy_ms=float(row["policy_ms"]),
                   tick_ms=float(row["tick_ms"]),
                   action=None if action is None else tuple(float(v) for v in action),
                   spread=None if spread is None else tuple(float(v) for v in spread))


@dataclass(frozen=True)
class Timing:
    """The rate keeper's account: overruns, skipped deadlines, lag and tick-start jitter."""

    period_s: float
    overruns: int = 0
    missed_deadlines: int = 0
    max_lag_s: float = 0.0
    jitter_s: Mapping[float, float] = field(default_factory=dict)  # percentile (0-100) -> seconds


@dataclass(frozen=True)
class Window:
    """Quantiles (0-1 -> ms) of the recorded ticks' stage times, refreshed every `refresh_ticks` ticks."""

    ticks: int = 0
    quantiles_ms: Mapping[str, Mapping[float, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, records: np.ndarray) -> Window:
        quantiles = {}
        for name in WINDOW_FIELDS:
            values = _field_ms(records, name) if len(records) else np.empty(0)
            values = values[np.isfinite(values)]
            points = np.quantile(values, WINDOW_QUANTILES) if len(values) else [math.nan] * len(WINDOW_QUANTILES)
            quantiles[name] = dict(zip(WINDOW_QUANTILES, (float(v) for v in points)))
        return cls(ticks=len(records), quantiles_ms=quantiles)


def _field_ms(records: np.ndarray, name: str) -> np.ndarray:
    if name == "glass_to_wire":  # the command left `observe_ms + tick_ms` after the tick started
        return ((records["start_s"] - records["frame_time_s"]) * 1e3 + records["observe_ms"].astype(np.float64)
                + records["tick_ms"].astype(np.float64))
    return records[f"{name}_ms"].astype(np.float64)


@dataclass(frozen=True)
class LinkHealth:
    connected: bool
    telemetry_age_s: float
    round_trip_s: float | None
    stats: Mapping[str, int]  # the link's counters (frames, errors, reconnects ...) and bad_frames
    # Command -> the telemetry echoing it, quantile (0.5, 0.99) -> seconds over the last round trips.
    round_trip_quantiles_s: Mapping[float, float] = field(default_factory=dict)

    @classmethod
    def of(cls, link: Any) -> LinkHealth:
        link_stats = link.stats
        stats = dataclasses.asdict(link_stats)
        stats["bad_frames"] = link_stats.bad_frames
        round_trip = getattr(link, "last_round_trip_s", None)
        return cls(connected=bool(link.is_connected), telemetry_age_s=float(link.telemetry_age_s()),
                   round_trip_s=None if round_trip is None else float(round_trip), stats=stats,
                   round_trip_quantiles_s=dict(getattr(link, "round_trip_quantiles_s", None) or {}))


@dataclass(frozen=True)
class CameraHealth:
    connected: bool
    streaming: bool
    frame_age_s: float
    frames: int
    reconnects: int
    read_failures: int
    open_failures: int

    @classmethod
    def of(cls, camera: Any) -> CameraHealth:
        return cls(connected=bool(camera.is_connected), streaming=bool(getattr(camera, "is_streaming", False)),
                   frame_age_s=float(camera.frame_age_s()), frames=int(getattr(camera, "frame_count", 0)),
                   reconnects=int(getattr(camera, "reconnects", 0)),
                   read_failures=int(getattr(camera, "read_failures", 0)),
                   open_failures=int(getattr(camera, "open_failures", 0)))


@dataclass(frozen=True)
class LoopStatus:
    """One frozen snapshot of the loop, published at the end of every tick (and once at construction).

    `mode` is the last completed tick's mode, "estop" while the e-stop is latched, "starting" before
    the first tick.
    """

    mode: str
    estop: bool
    instruction: str | None
    tick: LastTick | None
    counters: Mapping[str, int]
    threshold: float
    hard_ceiling: float
    timing: Timing
    window: Window
    link: LinkHealth | None
    camera: CameraHealth | None
    hold_reason: str | None = None  # why the robot holds although it has an instruction (e-stop cleared)
    # What the controller reports (edge/control/controller_watch.py): flags, its counters, a fault, and
    # whether it confirmed our e-stop (None when none is latched).
    controller: Mapping[str, Any] | None = None
    # Every camera by spec name (`camera` is the first), and those whose frame is missing or too old.
    cameras: Mapping[str, CameraHealth] = field(default_factory=dict)
    stale_cameras: tuple[str, ...] = ()
    # A chunk policy's execution (edge/control/chunks.py): replans, entry index vs measured delay, stops
    # on an empty chunk queue, the worker's queue (None for a one-step policy).
    chunks: Any = None
    language: bool = True  # the policy takes an instruction
    # The failure monitor (edge/control/monitor.py): which signals tripped, and per signal its last score,
    # threshold, whether its alarm is on and how often it tripped. None when nothing reports them.
    monitor: Mapping[str, Any] | None = None
    # How policy.target and threads were chosen (edge/service/tune.py: configured, cached or measured).
    tuning: Mapping[str, Any] | None = None

    @property
    def ticks(self) -> int:
        return int(self.counters.get("ticks", 0))

    def line(self) -> str:
        """One line for `systemctl status` (sd_notify STATUS=)."""
        text = self.instruction
        chunks = self.chunks
        return (f"{self.mode} | {self.ticks} ticks, {self.timing.overruns} overruns, "
                f"{self.counters.get('fallback', 0)} fallback | instruction: "
                + ((repr(text[:60]) if text else "none (holding)") if self.language else "none needed")
                + (f" | stale camera(s): {', '.join(self.stale_cameras)}" if self.stale_cameras else "")
                + (f" | chunks: {chunks.replans} replans, entry {chunks.entry_index}, {chunks.empty_stops} "
                   "empty stops" if chunks is not None else "")
                + (f" | holding: {self.hold_reason}" if self.hold_reason else "")
                + (f" | tripped: {', '.join(self.monitor['tripped'])}" if self.monitor and self.monitor.get("tripped")
                   else ""))
