"""The 10 Hz control loop: tick -> observe -> infer -> gate -> guard -> send -> wait.

Every tick sends a command: the policy's (clamped, slew-limited) action when every camera's frame is
fresh, the instruction's embedding is ready (a language-free policy needs none) and the uncertainty gate
is calm; otherwise a controlled stop. A tick never waits on a camera, the motor link, the language
encoder or, for a chunk policy (H > 1), the inference worker: its chunks are executed by the scheduler
against the measured delay (edge/control/chunk_execution.py, docs/chunks.md); H = 1 runs inference
inside the tick.

Per-tick records (timestamps, named stage timings, score, mode, command) go into a preallocated ring
buffer; at the end of every tick the loop publishes one frozen `LoopStatus` snapshot, which is all that
other threads read (`status()`, edge/control/status.py). A summary line is logged periodically;
`on_deadline_met` is called only for ticks that met their deadline (the systemd watchdog ping).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge.control.chunk_execution import ChunkExecution
from edge.control.chunks import ChunkConfig
from edge.control.controller_watch import ControllerWatch
from edge.control.observation import CameraInputs, PolicyShape, fill_proprio
from edge.control.operator_commands import HOLD_AFTER_ESTOP, STOPPED_HOLD, OperatorCommands
from edge.control.ratekeeper import RateKeeper
from edge.control.realtime import collect_in_slack
from edge.control.safety import SafetyLayer, reason_names
from edge.control.status import (
    CameraHealth,
    LastTick,
    LinkHealth,
    LoopStatus,
    Mode,
    StageTimer,
    TickRecorder,
    Timing,
    Window,
    tick_dtype,
)
from edge.control.uncertainty_gate import UncertaintyGate
from edge.control.watchdog_trips import WatchdogTrips
from edge.errors import EdgeError
from edge.io.protocol import WATCHDOG_TIMEOUT_S, StatusFlags
from edge.ratelimit import RateLimitedWarnings
from edge.validation import check_range

logger = logging.getLogger(__name__)

__all__ = ["HOLD_AFTER_ESTOP", "STOPPED_HOLD", "ControlLoop", "LoopConfig", "Mode", "TickRecorder", "tick_dtype"]
JITTER_PERCENTILES = (50.0, 90.0, 99.0, 100.0)


@dataclass(frozen=True)
class LoopConfig:
    """The ``loop:`` section of the robot config."""

    rate_hz: float = 10.0  # control rate
    summary_every_s: float = 60.0  # one summary line this often
    record_ticks: int = 1200  # per-tick records kept in the ring buffer
    warmup_ticks: int = 5  # inference passes before the first command (fills caches, JIT, pages)

    def __post_init__(self) -> None:
        check_range("loop.rate_hz", self.rate_hz, 1.0, 200.0, unit="Hz")
        check_range("loop.summary_every_s", self.summary_every_s, 1.0, 3600.0, unit="s")
        check_range("loop.record_ticks", self.record_ticks, 10, 1_000_000, integer=True)
        check_range("loop.warmup_ticks", self.warmup_ticks, 0, 1000, integer=True)

    @property
    def period_s(self) -> float:
        return 1.0 / self.rate_hz


class ControlLoop(OperatorCommands):
    def __init__(
        self,
        pipeline,
        camera,
        link,
        safety: SafetyLayer,
        gate: UncertaintyGate,
        period_s: float,
        *,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        record_ticks: int = 1200,
        summary_every_s: float = 60.0,
        frame_shape: tuple[int, int, int] | None = None,
        on_deadline_met: Callable[[], None] | None = None,
        gc_min_slack_s: float = 0.02,
        window_refresh_ticks: int = 10,
        chunk_config: ChunkConfig | None = None,
    ):
        """`camera`: one camera object for a one-camera policy, or one per spec camera (a sequence in
        spec order or a mapping by spec name); each needs `read_into(out) -> (capture_s, count) | None`."""
        self.pipeline = pipeline
        self.shape = shape = PolicyShape.of(pipeline)
        self._warn = RateLimitedWarnings(logger)
        self.cameras = CameraInputs.of(camera, shape.cameras, frame_shape, self._warn)
        self.camera = self.cameras.devices[0]
        self.link = link
        self.safety = safety
        self.gate = gate
        self.period_s = period_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.sleep = sleep
        self.keeper = RateKeeper(period_s, clock=clock, sleep=sleep)
        self.summary_every_s = summary_every_s
        self.on_deadline_met = on_deadline_met
        self.gc_min_slack_s = gc_min_slack_s
        action_dim = shape.action_dim
        self.recorder = TickRecorder(record_ticks, action_dim)
        self._zeros = np.zeros(action_dim, np.float32)
        self._proprio = np.zeros(shape.proprio_dim, np.float32)
        self.chunks = (ChunkExecution(pipeline, shape, period_s, [f.shape for f in self.cameras.frames],
                                      chunk_config or ChunkConfig(), clock=clock) if shape.horizon > 1 else None)
        self._chunk_fallback = False  # the gate's decision on the newest chunk
        self._chunk_score = np.nan  # and its score
        self._chunk_action = np.zeros(action_dim, np.float32)  # the chunk step executed at the last tick
        self._instruction: str | None = None
        self._instruction_lock = threading.Lock()
        self._hold_reason: str | None = None  # set from an e-stop until resume() or a new instruction
        self.watch = ControllerWatch(getattr(getattr(link, "config", None), "channels", action_dim))
        self._controller_fault: str | None = None  # what the controller reports now (FAULT, rejections)
        self.trips = WatchdogTrips()  # whether a watchdog trip has a cause the host knows
        self._seen_telemetry = None  # the last sample the watch took (one per new sample)
        self._telemetry_ok = False
        self._estop_sent = None  # the last EmergencyStop frame (SentCommand), repeated until confirmed
        self._estop_since_s = 0.0
        self._estop_confirmed = False
        self._last_summary_s = clock()
        self._last_mode = Mode.HOLD
        self._last_tick_s: float | None = None
        self.counters = {"ticks": 0, "nominal": 0, "fallback": 0, "hold": 0, "estop": 0, "inference_errors": 0,
                         "undelivered": 0, "transitions": 0, "controller_faults": 0, "watchdog_trips": 0,
                         "telemetry_rejected": 0, "estop_resends": 0, "stale_camera": 0, "chunk_empty": 0,
                         "unsent_no_position": 0}
        self.last_output = None
        self.timer = StageTimer(clock)
        # The window's quantiles cost about a millisecond: refreshed every N ticks, in slack time (run()).
        self.window_refresh_ticks = max(1, int(window_refresh_ticks))
        self._window = Window()
        self._jitter_s: dict[float, float] = {}
        self._window_ticks = 0  # the tick count at the window's last refresh
        self._status_lock = threading.Lock()  # orders the loop's publish and other threads' quick updates
        self._status = self._snapshot(None)

    # -- the one snapshot other threads read ----------------------------------------------------------
    def status(self) -> LoopStatus:
        """The snapshot published at the end of the last completed tick (safe from any thread)."""
        return self._status

    def _snapshot(self, row: np.void | None) -> LoopStatus:
        estop = bool(self.safety.estopped)
        tick = None
        if row is not None:
            action, spread = self._policy_view(row)
            tick = LastTick.from_record(row, Mode(int(row["mode"])).name.lower(), action, spread)
        mode = "estop" if estop else (tick.mode if tick is not None else "starting")
        keeper = self.keeper
        timing = Timing(period_s=keeper.period_s, overruns=int(keeper.overruns),
                        missed_deadlines=int(keeper.missed_deadlines), max_lag_s=float(keeper.max_lag_s),
                        jitter_s=self._jitter_s)
        link = LinkHealth.of(self.link) if hasattr(self.link, "stats") else None
        cameras = {name: CameraHealth.of(device) for name, device in zip(self.cameras.names, self.cameras.devices)
                   if hasattr(device, "frame_age_s")}
        camera = cameras.get(self.cameras.names[0])
        gate = self.gate.config
        watch = self.watch
        controller = {"flags": watch.flag_names, "counters": dict(watch.counters), "fault": self._controller_fault,
                      "estop_confirmed": self._estop_confirmed if estop else None}
        return LoopStatus(mode=mode, estop=estop, instruction=self._instruction, tick=tick,
                          counters=dict(self.counters), threshold=float(gate.threshold),
                          hard_ceiling=float(gate.hard_ceiling), timing=timing, window=self._window,
                          link=link, camera=camera, hold_reason=self._hold_reason, controller=controller,
                          cameras=cameras, stale_cameras=self.cameras.stale,
                          chunks=None if self.chunks is None else self.chunks.stats(),
                          language=self.shape.needs_language, monitor=self.gate.signals(),
                          tuning=getattr(self.pipeline, "tuning", None))

    def _policy_view(self, row: np.void) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The policy's action and spread behind this tick's command (None when the policy did not run)."""
        if self.chunks is not None:
            step = self.chunks.scheduler.step
            if step is None or Mode(int(row["mode"])) not in (Mode.NOMINAL, Mode.FALLBACK):
                return None, None
            return self._chunk_action, self.chunks.spread[step]
        output = self.last_output if int(row["samples"]) > 0 else None
        if output is None:
            return None, None
        spread = np.asarray(output.spread)
        return output.action, (spread[0] if spread.ndim == 2 else spread)  # [H, A] with H = 1, or [A]

    def _publish(self, row: np.void) -> None:
        status = self._snapshot(row)
        with self._status_lock:
            self._status = status

    def _refresh_window(self) -> None:
        self._window = Window.of(self.recorder.latest())
        self._jitter_s = self.keeper.jitter_percentiles(list(JITTER_PERCENTILES))
        self._window_ticks = self.counters["ticks"]

    def _refresh_window_in_slack(self) -> None:
        """The latency window's quantiles (about a millisecond) every `window_refresh_ticks` ticks, in the
        slack before the next deadline, never inside a tick; a loop without slack still refreshes it
        ten times less often, so status and metrics do not freeze."""
        since = self.counters["ticks"] - self._window_ticks
        if since < self.window_refresh_ticks:
            return
        if self.keeper.remaining_s() < self.gc_min_slack_s and since < 10 * self.window_refresh_ticks:
            return
        self._refresh_window()
        self._amend_status(window=self._window,
                           timing=dataclasses.replace(self._status.timing, jitter_s=self._jitter_s))

    def _amend_status(self, **changes) -> None:
        """An e-stop or an instruction from another thread shows at once, not only after the next tick."""
        with self._status_lock:
            self._status = dataclasses.replace(self._status, **changes)

    # -- one tick -----------------------------------------------------------------------------------
    def _observe(self, now: float) -> float | None:
        """Every camera's newest frame into its buffer, the newest telemetry through the watch, proprio
        from it by the spec's sources; returns the telemetry's time (None: none, or not to be believed)."""
        self.cameras.read()
        telemetry, telemetry_time = self.link.latest_telemetry()
        if telemetry is not None and telemetry is not self._seen_telemetry:
            self._seen_telemetry = telemetry
            self._watch(telemetry)
            if self._telemetry_ok and self.shape.has_positions:
                self.safety.observe_positions(telemetry.positions)
        if telemetry is not None and self._telemetry_ok:
            if not fill_proprio(self.shape.proprio, self._proprio, telemetry.velocities, telemetry.positions):
                self._warn("telemetry lacks a channel the policy's proprio reads (%s): controlled stop",
                           ", ".join(f"{f}[{i}]" for f, i in self.shape.proprio.sources))
                telemetry_time = None
        else:
            telemetry_time = None  # none yet, or not to be believed: the safety layer stops the robot
        return telemetry_time

    def _watch(self, telemetry) -> None:
        """Read what the controller reports in a new telemetry sample (edge/control/controller_watch.py)."""
        watch = self.watch
        problem = watch.problem(telemetry)
        self._telemetry_ok = problem is None
        if problem is not None:
            self.counters["telemetry_rejected"] += 1
            self._warn("telemetry rejected (%s): treated as missing, controlled stop", problem)
            return
        if not hasattr(telemetry, "status"):
            # A telemetry source without the serial protocol's status flags and counters (a ROS 2
            # JointState): its channel counts and bounds are checked above; there is nothing more to read.
            return
        trips, restarts = watch.watchdog_trips, watch.restarts
        take = getattr(self.link, "take_status_flags", None)
        fault = watch.observe(telemetry, estopped=self.safety.estopped, seen=take() if take else None)
        if watch.watchdog_trips != trips:  # read, not inferred: the controller stopped the motors
            self.counters["watchdog_trips"] += 1
            self.safety.reset()  # the next motion ramps from zero; a trip the host did not cause also holds
            with self._instruction_lock:
                self._hold_reason = self._hold_reason or self.trips.trip(restarted=watch.restarts != restarts)
        self.trips.settle(bool(telemetry.status & StatusFlags.WATCHDOG_TRIPPED), self.link.is_confirmed)
        if fault is not None and self._controller_fault is None:
            self.counters["controller_faults"] += 1
            logger.error("%s: controlled stop (zero command); the robot then holds until `vla-edge resume` or a "
                         "new instruction", fault)
            self.safety.reset()
            with self._instruction_lock:
                self._hold_reason = f"controller fault: {fault}"
        elif fault is None and self._controller_fault is not None:
            logger.warning("the controller is healthy again (%s); holding until `vla-edge resume` or a new "
                           "instruction", ", ".join(watch.flag_names) or "no flags")
        self._controller_fault = fault
        if self.safety.estopped:
            latched = bool(telemetry.status & StatusFlags.ESTOP_LATCHED)
            sent = self._estop_sent
            self._estop_confirmed = latched and sent is not None and self.link.is_confirmed(sent)

    def tick(self) -> np.void:
        now = self.clock()
        if self._last_tick_s is not None and now - self._last_tick_s > WATCHDOG_TIMEOUT_S:
            # The process stalled long enough for the controller's watchdog to stop the motors: slew
            # from standstill, not from the command sent before the stall (which would restart them).
            self._warn("control loop stalled for %.2f s: motors were stopped by the controller's watchdog",
                       now - self._last_tick_s)
            self.safety.reset()
            self.trips.host_gap(f"control loop stalled for {now - self._last_tick_s:.2f} s")
        self._last_tick_s = now
        row = self.recorder.next()
        timer = self.timer
        timer.start(row)
        row["tick"] = self.counters["ticks"]
        row["start_s"] = now
        row["start_offset_ms"] = (now - (self.keeper.next_deadline_s - self.period_s)) * 1e3
        row["lag_ms"] = row["policy_ms"] = np.nan
        row["samples"] = 0
        with timer.section("observe"):
            telemetry_time = self._observe(now)
        frame_time = self.cameras.oldest_s  # the oldest camera's frame: a stale one stops the robot
        row["frame_time_s"] = frame_time if frame_time is not None else np.nan
        row["telemetry_time_s"] = telemetry_time if telemetry_time is not None else np.nan
        ready = self.clock()

        action = self._zeros
        fallback = True
        mode = Mode.HOLD
        score = np.nan
        embedding = self._embedding()
        instructed = embedding is not None or not self.shape.needs_language
        fresh = self.cameras.check_fresh(now, self.stale_after_s)
        running = False
        if self.safety.estopped:
            mode = Mode.ESTOP
            self._repeat_estop(now)
        elif self._hold_reason is not None:
            mode = Mode.HOLD  # after an e-stop clear or a stop: zero until resume (or a new instruction)
        elif instructed and fresh:
            running = True
            mode, action, fallback, score = self._run_policy(now, row, embedding)
        elif instructed:
            mode = Mode.FALLBACK
            self.counters["stale_camera"] += 1
            self._warn("no fresh frame from camera(s) %s: controlled stop", self.cameras.age_text(now))
        if not running and self.chunks is not None:
            self.chunks.stop()
        with timer.section("safety"):
            result = self.safety.apply(action, now_s=now, frame_time_s=frame_time,
                                       telemetry_time_s=telemetry_time, fallback=fallback)
        if mode == Mode.NOMINAL and result.fallback:
            mode = Mode.FALLBACK  # stale telemetry or a NaN action: the safety layer stopped the robot
        command = result.command
        stalled_s = self.clock() - now
        if stalled_s > WATCHDOG_TIMEOUT_S:
            # The process stalled inside this tick (e.g. stopped or starved after computing the command):
            # the command was computed from inputs that are now stale and the controller's watchdog has
            # stopped the motors, so send a stop rather than restart them with it.
            self._warn("tick stalled for %.2f s before sending: sending a stop instead of its stale command",
                       stalled_s)
            self.safety.reset()
            self.trips.host_gap(f"tick stalled for {stalled_s:.2f} s before sending")
            command = self.safety.last_command  # zero velocity; position channels hold
            mode = Mode.FALLBACK
        with timer.section("send"):
            sent = self._send(command)
        self.trips.sent(sent)
        done = self.clock()
        row["tick_ms"] = (done - ready) * 1e3
        row["score"] = score
        row["mode"] = mode
        row["reasons"] = int(result.reasons)
        row["command"] = command
        row["delivered"] = bool(getattr(sent, "delivered", True))
        if not row["delivered"]:
            self.counters["undelivered"] += 1
            self._warn("motor link down: command not delivered (controller watchdog stops the motors)")
        self.counters["ticks"] += 1
        self.counters[mode.name.lower()] += 1
        if mode != self._last_mode:
            self.counters["transitions"] += 1
            logger.info("mode %s -> %s (score %.4f, reasons %s)", self._last_mode.name, mode.name,
                        score, "|".join(reason_names(int(result.reasons))) or "none")
            self._last_mode = mode
        self._publish(row)
        return row

    def _send(self, command: np.ndarray):
        """One command to the link; none while a position channel's position is unknown (any target would
        be a motion command: the controller's watchdog keeps the motors stopped meanwhile)."""
        if not self.safety.positions_known:
            self.counters["unsent_no_position"] += 1
            self._warn("no measured position yet for the position channel(s): no command sent")
            return None
        return self.link.send_targets(command)

    def _run_policy(self, now: float, row: np.void, embedding) -> tuple[Mode, np.ndarray, bool, float]:
        """This tick's proposal from the policy: (mode, action, fallback, score). H = 1 runs inference
        here; a chunk policy takes the scheduler's action for now (None: stop, never extrapolate)."""
        if self.chunks is None:
            try:
                out = self.pipeline.infer(self.cameras.policy_frames, self._proprio, embedding)
            except EdgeError as exc:
                self.counters["inference_errors"] += 1
                self._warn("inference failed, controlled stop: %s", exc)
                return Mode.FALLBACK, self._zeros, True, np.nan
            self.last_output = out
            with self.timer.section("gate"):
                decision = self.gate.update(out.score, out)
            self._record_policy(row, out.times, self.pipeline.samples)
            return (Mode.FALLBACK if decision.fallback else Mode.NOMINAL), out.action, decision.fallback, out.score
        step = self.chunks.step(now, self.cameras, self._proprio, embedding)
        if step.error is not None:
            self.counters["inference_errors"] += 1
            self._warn("%s: controlled stop", step.error)
            return Mode.FALLBACK, self._zeros, True, np.nan
        if step.arrived is not None:
            self.last_output = step.arrived
            self._chunk_score = step.arrived.score
            with self.timer.section("gate"):
                self._chunk_fallback = self.gate.update(self._chunk_score, step.arrived).fallback
            if step.arrived.times is not None:
                self._record_policy(row, step.arrived.times, step.arrived.samples)
        if step.action is None:
            self.counters["chunk_empty"] += 1
            self._warn("no chunk has a step for now (the next one is late): controlled stop, no extrapolation")
            return Mode.FALLBACK, self._zeros, True, np.nan
        np.copyto(self._chunk_action, step.action)
        fallback = self._chunk_fallback  # the score and decision of the chunk being executed
        return (Mode.FALLBACK if fallback else Mode.NOMINAL), step.action, fallback, self._chunk_score

    def _record_policy(self, row: np.void, t, samples: int) -> None:
        """The pipeline's own stage times (it times them inside infer) into the tick's record."""
        row["samples"] = samples
        row["resize_ms"], row["vision_ms"], row["head_ms"], row["reduce_ms"] = (
            t.resize_ms, t.vision_ms, t.head_ms, t.reduce_ms)
        row["h2d_ms"], row["d2h_ms"] = t.h2d_ms, t.d2h_ms
        row["policy_ms"] = t.resize_ms + t.vision_ms + t.head_ms + t.reduce_ms

    def _embedding(self) -> np.ndarray | None:
        text = self._instruction
        if text is None:
            return None
        try:
            return self._grounded(text, self.pipeline.embedding(text))
        except EdgeError as exc:
            self._warn("instruction %r refused (%s); holding until a new one arrives", text[:60], exc)
            with self._instruction_lock:
                if self._instruction == text:
                    self._instruction = None
            return None

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event, max_ticks: int | None = None) -> None:
        self.keeper.restart()
        ticks = 0
        while not stop.is_set() and (max_ticks is None or ticks < max_ticks):
            row = self.tick()
            ticks += 1
            self._refresh_window_in_slack()
            collect_in_slack(self.keeper.remaining_s(), self.gc_min_slack_s)
            overran = self.keeper.wait()
            row["lag_ms"] = self.keeper.lag_s * 1e3
            if not overran and self.on_deadline_met is not None:
                self.on_deadline_met()
            if self.clock() - self._last_summary_s >= self.summary_every_s:
                logger.info("%s", self.summary_line())
                self._last_summary_s = self.clock()
        # Stopped: the last snapshot covers every recorded tick and the keeper's final account.
        self._refresh_window()
        timing = dataclasses.replace(self._status.timing, overruns=int(self.keeper.overruns),
                                     missed_deadlines=int(self.keeper.missed_deadlines),
                                     max_lag_s=float(self.keeper.max_lag_s), jitter_s=self._jitter_s)
        self._amend_status(window=self._window, timing=timing)

    def stop_motors(self, repeats: int = 3) -> None:
        """Commanded stop at shutdown: zero velocity (position channels hold), a few times in case a frame
        is lost on the line."""
        self.safety.reset()
        for _ in range(repeats):
            self._send(self.safety.last_command)

    def start_worker(self) -> None:
        """Start the inference worker of a chunk policy now (else on the first tick that runs the policy).
        The service calls it before its real-time set-up: a thread inherits its creator's scheduling
        policy and affinity, and the worker must keep normal priority, below the tick."""
        if self.chunks is not None:
            self.chunks.start()

    def close(self) -> None:
        """End the inference worker of a chunk policy (after `run` returned)."""
        if self.chunks is not None:
            self.chunks.close()

    def summary_line(self, window: int | None = None) -> str:
        records = self.recorder.latest(window)
        if len(records) == 0:
            return "no ticks yet"
        tick_ms = records["tick_ms"]
        nominal = records["mode"] == Mode.NOMINAL
        p50, p99 = np.nanpercentile(tick_ms, [50, 99]) if np.isfinite(tick_ms).any() else (np.nan, np.nan)
        return (f"ticks {self.counters['ticks']} | nominal {nominal.mean():.0%} of last {len(records)} | "
                f"tick p50 {p50:.1f} ms p99 {p99:.1f} ms | overruns {self.keeper.overruns} | "
                f"fallback ticks {self.counters['fallback']} | hold {self.counters['hold']} | "
                f"undelivered {self.counters['undelivered']}")
