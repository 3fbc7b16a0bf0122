"""The whole run: activate the configurations, run them side by side, then the closed loop and the
start-up measurement on one simulator process; write latency.json, latency.md and the plots."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.closed_loop import run_closed_loop
from benchmarks.configs import Config, PipelineSpec, language_step, pipeline_specs, robot_config, runtime_step
from benchmarks.cpu_load import CpuBurner
from benchmarks.defaults import default_vs_best
from benchmarks.environment import environment
from benchmarks.interleaved import run_interleaved
from benchmarks.monitor_cost import monitor_cost
from benchmarks.plots import write_plots
from benchmarks.ratios import compute_ratios
from benchmarks.report import format_fast_default, format_markdown
from benchmarks.settings import SCHEMA, BenchSettings
from benchmarks.startup import measure_runtime_process, measure_start_to_first_command
from benchmarks.stats import finite_json
from benchmarks.torch_eager import torch_configs
from benchmarks.transport import run_transports
from edge.control.realtime import freeze_gc_after_warmup
from edge.errors import ConfigError, EdgeError
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.service import wiring
from simulator.process import GroundTruthClient, SimulatorConfig, SimulatorProcess

logger = logging.getLogger(__name__)


def _inputs(seed: int):
    """A frame, proprio and instruction as the simulator's camera and world produce them."""
    from reference_world.world import TabletopWorld, WorldConfig

    return TabletopWorld(WorldConfig()).reset(seed)


def choose_closed_loop_config(specs: list[PipelineSpec], wanted: str | None) -> PipelineSpec | None:
    by_key = {s.key: s for s in specs}
    if wanted is not None:
        if wanted not in by_key:
            raise ConfigError(f"--closed-loop-config {wanted!r} is not available here; available: {sorted(by_key)}")
        return by_key[wanted]
    for key in ("trt-int8", "trt-fp16", "ort-int8-cpu", "ort-fp32", "ort-int8-trt-layout"):
        if key in by_key:
            return by_key[key]
    return specs[0] if specs else None


def _runtime_configs(bundle: Bundle, specs: list[PipelineSpec], settings: BenchSettings, observation,
                     unavailable: dict[str, str], stack: contextlib.ExitStack) -> tuple[dict, list[Config]]:
    """Activate one pipeline per runtime configuration; its iterations at each T, and its language encoder."""
    proprio = np.asarray(observation.proprio, np.float32)
    pipelines: dict[str, PolicyPipeline] = {}
    configs: list[Config] = []
    for spec in specs:
        config = robot_config(bundle, spec.policy(min(settings.samples), threads=settings.threads,
                                                  mask_seed=settings.seed))
        pipeline = wiring.build_pipeline(bundle, config)
        try:
            pipeline.activate()
        except EdgeError as exc:
            unavailable[spec.key] = f"activation failed: {exc}"
            pipeline.close()
            continue
        stack.callback(pipeline.close)
        pipelines[spec.key] = pipeline
        embedding = pipeline.cache.encode_now(observation.instruction)
        configs += [Config(spec.key, t, "runtime", settings.iterations,
                           runtime_step(pipeline, t, observation.frame, proprio, embedding))
                    for t in settings.samples]
        configs.append(Config(f"{spec.key} language", 1, "language", settings.iterations,
                              language_step(pipeline, observation.instruction)))
    return pipelines, configs


def _against_simulator(bundle: Bundle, bundle_dir: Path, out_dir: Path, settings: BenchSettings,
                       pipelines: dict[str, PolicyPipeline], spec: PipelineSpec, burner: CpuBurner | None) -> tuple:
    """The closed loop, then `vla-edge run` until its first command, on one simulator process."""
    closed, first = None, None
    with SimulatorProcess(SimulatorConfig(seed=settings.seed), out_dir / "simulator.log") as simulator, \
            GroundTruthClient(simulator.paths.ground_truth) as truth:
        if settings.closed_loop:
            gc_frozen = freeze_gc_after_warmup()  # as the service does once it has warmed up
            try:
                closed = run_closed_loop(bundle, pipelines[spec.key], spec, simulator.paths, truth, settings,
                                         burner)
            finally:
                gc.unfreeze()
                gc.enable()
            closed.update({"config": spec.key, "gc_frozen_objects": gc_frozen})
        if settings.startup:
            for pipeline in pipelines.values():
                pipeline.close()  # leave the CPU and memory to the service under test
            first = measure_start_to_first_command(bundle_dir, spec, int(bundle.dropout["default_samples"]),
                                                   simulator.paths, truth, out_dir)
    return closed, first


def run_benchmark(bundle_dir: Path, out_dir: Path, settings: BenchSettings) -> dict:
    bundle = Bundle.load(bundle_dir)
    max_samples = int(bundle.dropout["max_samples"])
    bad = [t for t in settings.samples if not 1 <= t <= max_samples]
    if bad:
        raise ConfigError(f"--samples {bad} outside 1..{max_samples} (the bundle's max_samples)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    unavailable: dict[str, str] = {}
    notes: dict[str, Any] = {}
    report: dict[str, Any] = {"schema": SCHEMA, "created_unix": time.time(), "settings": asdict(settings),
                              "environment": environment(bundle), "closed_loop": None}
    specs = pipeline_specs(bundle, settings, unavailable)
    if not specs:
        raise ConfigError(f"no runtime configuration can run here: {unavailable}")
    observation = _inputs(settings.seed)
    if not settings.load:
        unavailable["cpu load"] = "skipped (--no-load)"
    startup: dict[str, Any] = {}
    phases: dict[str, float] = {}
    report["phase_seconds"] = phases
    with contextlib.ExitStack() as stack:
        burner = stack.enter_context(CpuBurner(settings.load_bound_s)) if settings.load else None
        pipelines, configs = _runtime_configs(bundle, specs, settings, observation, unavailable, stack)
        configs += torch_configs(bundle, settings, observation, unavailable, notes)
        logger.info("side by side: %d configurations, %s", len(configs),
                    "unloaded and loaded" if burner else "unloaded only")
        phases["activation"] = time.monotonic() - started
        report["side_by_side"] = run_interleaved(configs, settings, burner)
        phases["side_by_side"] = report["side_by_side"]["seconds"]
        report["notes"] = notes
        first = next(iter(pipelines), None)
        if first is not None:  # the monitor's own cost, on the first runtime configuration's real output
            spec_first = next(s for s in specs if s.key == first)
            config = robot_config(bundle, spec_first.policy(min(settings.samples), threads=settings.threads,
                                                            mask_seed=settings.seed))
            report["monitor_cost"] = {"config": first, **monitor_cost(bundle, config, pipelines[first], observation)}
        report["default_vs_best"] = None
        if settings.default_budget_s > 0:
            mark = time.monotonic()
            report["default_vs_best"] = default_vs_best(bundle, out_dir, int(bundle.dropout["default_samples"]),
                                                        settings.default_budget_s)
            phases["default_vs_best"] = time.monotonic() - mark
        else:
            unavailable["default vs best"] = "skipped (--no-defaults)"
        spec = choose_closed_loop_config([s for s in specs if s.key in pipelines], settings.closed_loop_config)
        report["runtime_key"] = spec.key if spec is not None else None
        if spec is None:
            unavailable["closed loop"] = "no runtime configuration could be activated"
        elif settings.closed_loop or settings.startup:
            mark = time.monotonic()
            report["closed_loop"], startup["first_command"] = _against_simulator(
                bundle, bundle_dir, out_dir, settings, pipelines, spec, burner)
            phases["closed_loop_and_first_command"] = time.monotonic() - mark
        if not settings.closed_loop:
            unavailable["closed loop"] = "skipped (--no-closed-loop)"
        if burner is not None:
            report["load"] = {"kind": "one busy-looping process, SIGSTOP'd outside the loaded phases",
                              "cpu_seconds": burner.cpu_seconds(), "loaded_wall_s": burner.loaded_wall_s}
    if settings.startup and spec is not None:
        mark = time.monotonic()
        startup["runtime_process"] = measure_runtime_process(bundle_dir, spec, int(bundle.dropout["default_samples"]))
        phases["runtime_process"] = time.monotonic() - mark
        first = startup.get("first_command")
        if first is None or first.get("start_to_first_command_s") is None:
            startup["first_command"] = {
                **(first or {}),
                "method": "fallback: subprocess spawn -> PolicyPipeline activation -> first inference "
                          "(vla-edge run did not deliver a command)",
                "start_to_first_command_s": startup["runtime_process"]["spawn_to_first_infer_s"],
            }
    elif not settings.startup:
        unavailable["start-up and memory"] = "skipped (--no-startup)"
    report["transports"] = None
    if settings.transport:
        mark = time.monotonic()
        report["transports"] = run_transports(max(50, 3 * settings.iterations))
        phases["transports"] = time.monotonic() - mark
        if "unavailable" in report["transports"].get("dds", {}):
            unavailable["ROS 2 transport"] = report["transports"]["dds"]["unavailable"]
    else:
        unavailable["transports"] = "skipped (--no-transport)"
    report["startup"] = startup
    report["unavailable"] = unavailable
    report["ratios"] = compute_ratios(report, settings)
    report["benchmark_imported_torch"] = "torch" in sys.modules
    report["seconds"] = time.monotonic() - started
    report["environment"]["load_average_at_end"] = list(os.getloadavg())
    logger.info("phases (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return _write_outputs(finite_json(report), out_dir)


def _write_outputs(report: dict, out_dir: Path) -> dict:
    (out_dir / "latency.md").write_text(format_markdown(report) + "\n" + format_fast_default(report))
    report["plots"] = [str(p) for p in write_plots(report, out_dir)]
    (out_dir / "latency.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return report

