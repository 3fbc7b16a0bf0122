"""Part 2: the full tick in closed loop: the real ControlLoop at 10 Hz against the simulator process
(a real pty and an MJPEG camera), per load and scheduling condition, the conditions taking turns."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np

from benchmarks.configs import PipelineSpec, robot_config
from benchmarks.cpu_load import CpuBurner, load_state
from benchmarks.scheduling import closed_loop_conditions, fifo_refusal, thread_scheduling
from benchmarks.segments import segment_plan, segment_summary, steal_ms, steal_split
from benchmarks.settings import LOADS, PERIOD_S, RATE_HZ, BenchSettings
from benchmarks.tick_analysis import summarize_run, tick_table
from edge.control.loop import ControlLoop
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.io.camera import Camera
from edge.io.motor_link import SerialMotorLink
from edge.service import wiring
from edge.service.config import RobotConfig
from simulator.process import GroundTruthClient, SimulatorPaths

logger = logging.getLogger(__name__)
SIMULATOR_CAMERA_FPS = 10.0  # the simulator's MJPEG camera (python -m simulator --camera-fps, default 10)


class SampleCyclingLoop(ControlLoop):
    """The real ControlLoop, with T cycling over ``samples_cycle`` tick by tick, so every T sees the same
    stretch of machine time. Stage times, T and the start offset are the loop's own tick records."""

    def __init__(self, *args: Any, samples_cycle: tuple[int, ...], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.samples_cycle = samples_cycle

    def take_over(self) -> None:
        """Start a segment after another condition's loop drove the robot meanwhile: a planned hand-over,
        not a stall of this loop, so no stall warning; the safety layer slews from standstill."""
        self._last_tick_s = None
        self.safety.reset()

    def tick(self) -> np.void:
        self.pipeline.set_mc_samples(self.samples_cycle[self.recorder.count % len(self.samples_cycle)])
        return super().tick()

    def tick_table(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """Ticks ``first`` .. ``last`` (all so far by default) as the benchmark reports them."""
        count = self.recorder.count
        if count > len(self.recorder.records):
            raise RuntimeError(f"the loop recorded {count} ticks in a ring of {len(self.recorder.records)}: "
                               "loop.record_ticks must cover the whole run")
        return tick_table(self.recorder.records[first:count if last is None else min(last, count)])


def closed_loop_config(bundle: Bundle, spec: PipelineSpec, robot: SimulatorPaths, ticks: int,
                       samples: int) -> RobotConfig:
    """The robot.yaml of the closed loop: the simulator's camera and serial port, the deployed loop,
    safety and gate settings, and a ring buffer that keeps every tick of a condition."""
    sections: dict[str, Any] = {"loop": {"rate_hz": RATE_HZ, "record_ticks": max(ticks, 10),
                                         "summary_every_s": 3600.0}}
    threshold = bundle.uncertainty_threshold(spec.target)
    if not (math.isfinite(threshold) and threshold > 0):
        # A bundle whose gate saw no successful episode has no threshold, and the service refuses it;
        # the benchmark's timing does not depend on it.
        logger.warning("bundle has no usable uncertainty threshold for %s (%r); the gate runs with 1.0",
                       spec.target, threshold)
        sections["uncertainty"] = {"threshold": 1.0, "hard_ceiling": 1.0}
    return robot_config(bundle, spec.policy(samples), camera_url=robot.camera_url, serial=robot.serial,
                        camera_fps=SIMULATOR_CAMERA_FPS, **sections)


def run_closed_loop(bundle: Bundle, pipeline: PolicyPipeline, spec: PipelineSpec, robot: SimulatorPaths,
                    truth: GroundTruthClient, settings: BenchSettings, burner: CpuBurner | None) -> dict:
    """The real ControlLoop at 10 Hz against the simulator, per load and scheduling condition, the
    conditions interleaved in segments (``segment_plan``). The loops are built by the runtime's own
    wiring (edge.service.wiring), around the already activated ``pipeline`` of ``spec``."""
    instruction = truth.ground_truth()["instruction"]
    pipeline.cache.encode_now(instruction)  # ready before the first tick: the loop must not sit in HOLD
    ticks = max(1, int(round(settings.jitter_seconds * RATE_HZ)))
    config = closed_loop_config(bundle, spec, robot, ticks, min(settings.samples))
    camera = Camera(config.camera)
    link = SerialMotorLink(config.motor)
    fifo_refused = fifo_refusal(settings.fifo_priority)
    if fifo_refused is not None:
        logger.warning("closed loop at normal priority only: %s", fifo_refused)
    loads = LOADS if burner is not None else LOADS[:1]
    conditions = {key: (load, fifo) for key, load, fifo in
                  closed_loop_conditions(loads, fifo_refused, settings.fifo_priority)}
    runs = {}
    with camera, link:
        # Warm-up outside the measurement, as the service does before its first tick.
        for samples in settings.samples:
            pipeline.set_mc_samples(samples)
            frame = np.zeros(camera.frame_shape or (240, 320, 3), np.uint8)
            pipeline.infer(frame, np.zeros(int(bundle.action["dim"]), np.float32), pipeline.cache.encode_now(instruction))
        loops: dict[str, SampleCyclingLoop] = {}
        for key in conditions:
            loops[key] = wiring.build_loop(pipeline, camera, link, bundle, config, loop_class=SampleCyclingLoop,
                                           samples_cycle=settings.samples)
            loops[key].set_instruction(instruction)
        totals = {key: {"seconds": 0.0, "overruns": 0, "missed_deadlines": 0, "steal_ms": 0.0, "segments": []}
                  for key in conditions}
        scheduling = {}
        origin = time.monotonic()
        for key, count in segment_plan(list(conditions), ticks, int(round(settings.segment_seconds * RATE_HZ))):
            load, fifo = conditions[key]
            loop = loops[key]
            loop.take_over()
            steal_before, first = steal_ms(), loop.recorder.count
            with load_state(burner, load == "loaded"), thread_scheduling(fifo) as scheduling[key]:
                started = time.monotonic()
                loop.run(threading.Event(), max_ticks=count)
                totals[key]["seconds"] += time.monotonic() - started
            steal_after = steal_ms()
            totals[key]["overruns"] += loop.keeper.overruns  # the rate keeper restarts with every run()
            totals[key]["missed_deadlines"] += loop.keeper.missed_deadlines
            stolen = None if steal_before is None or steal_after is None else steal_after - steal_before
            totals[key]["segments"].append(segment_summary(loop.tick_table(first), stolen))
            if stolen is None:
                totals[key]["steal_ms"] = None
            elif totals[key]["steal_ms"] is not None:
                totals[key]["steal_ms"] += stolen
        loops[next(iter(loops))].stop_motors()
        for key, loop in loops.items():
            total = totals[key]
            runs[key] = summarize_run(loop.tick_table(), loop.samples_cycle, total["seconds"],
                                      overruns=total["overruns"], missed_deadlines=total["missed_deadlines"],
                                      origin_s=origin)
            runs[key].update(load=conditions[key][0], scheduling=scheduling[key], segments=total["segments"],
                             steal_ms=total["steal_ms"], steal_split=steal_split(total["segments"]))
            logger.info("closed loop (%s, %s): %s", key, scheduling[key], loop.summary_line())
        trips = dict(getattr(link, "round_trip_quantiles_s", None) or {})
    return {"command_to_telemetry_ms": {"p50": trips[0.5] * 1e3, "p99": trips[0.99] * 1e3} if trips else None,
            "frame_sync_window_s": next(iter(loops.values())).keeper.sync_window_s,
            "target": spec.target, "instruction": instruction, "samples_cycle": list(settings.samples),
            "period_s": PERIOD_S, "segment_s": settings.segment_seconds, "runs": runs, "fifo_refused": fifo_refused}

