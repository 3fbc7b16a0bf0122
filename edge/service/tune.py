"""`policy.target: auto` / `policy.threads: auto` resolved for one bundle on this machine, and `vla-edge tune`.

    resolve_policy(bundle, config, make_factory)   the config with a concrete target and thread count and
                                                   the TuneChoice behind it: explicit values as given; else
                                                   the cached choice of this fingerprint; else measured
                                                   within policy.tune_budget_s (edge/inference/tuning.py)
    tune_and_cache(bundle, config, make_factory, budget_s)   `vla-edge tune`: measure longer, cache it
    cache_path(config)                             policy.tune_cache, or tune.json in the state directory

The candidates are the bundle's targets this backend runs (the build writes only targets that passed its
accuracy gate) times the thread counts worth trying on ONNX Runtime's CPU provider (1, 2, 4 ... the
cores); the FP32 target is always among them, and the choice is never slower than it as measured.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edge.errors import BundleError, ConfigError, EdgeError
from edge.inference import tuning
from edge.inference.bundle import Bundle
from edge.inference.pipeline import AUTO, BackendFactory, PolicyPipeline
from edge.service.config import RobotConfig, expand_directories
from edge.service.startup import CPU_TARGETS, TENSORRT_TARGETS

logger = logging.getLogger(__name__)

TUNE_BUDGET_S = 20.0  # `vla-edge tune`: ten times the start-up budget
STARTUP_ROUNDS = 100  # at start-up, stop after this many rounds even within the budget (a small policy)
TUNE_ROUNDS = 1000
MakeFactory = Callable[[RobotConfig], BackendFactory]


def cache_path(config: RobotConfig) -> Path:
    """policy.tune_cache, or tune.json in the service's state directory (${STATE_DIRECTORY})."""
    raw = config.policy.tune_cache or "${STATE_DIRECTORY}/tune.json"
    return Path(expand_directories("policy.tune_cache", raw))


def candidate_targets(bundle: Bundle, config: RobotConfig) -> tuple[str, ...]:
    """The bundle's targets the configured backend runs well: CPU layouts on ONNX Runtime's CPU provider,
    the TensorRT layouts on TensorRT, every target on ONNX Runtime's CUDA provider."""
    policy = config.policy
    targets = tuple(bundle.manifest["targets"])
    if policy.target != AUTO:
        return (policy.target,)
    if policy.backend == "tensorrt":
        usable = TENSORRT_TARGETS
    elif policy.device == "cpu":
        usable = CPU_TARGETS
    else:
        usable = targets
    found = tuple(t for t in targets if t in usable)
    if not found:
        raise BundleError(f"bundle {bundle.root} has no target for {policy.backend} on {policy.device} (it has "
                          f"{sorted(targets)}): set policy.target to one of them, or rebuild with that target")
    return found


def candidate_threads(config: RobotConfig) -> tuple[int, ...]:
    policy = config.policy
    if policy.threads != AUTO:
        return (int(policy.threads),)
    if policy.backend != "onnxruntime" or policy.device != "cpu":
        return (0,)  # GPU providers: the CPU threads only feed the device
    return tuning.thread_counts()


def machine_fingerprint(bundle: Bundle, config: RobotConfig) -> tuple[dict[str, str], str]:
    policy = config.policy
    settings = {"backend": policy.backend, "device": policy.device, "mc_samples": policy.mc_samples,
                "target": policy.target, "threads": policy.threads}
    print_ = tuning.fingerprint(Path(bundle.root) / "manifest.json", settings)
    return print_, tuning.fingerprint_key(print_)


def with_choice(config: RobotConfig, choice: tuning.TuneChoice) -> RobotConfig:
    return replace(config, policy=replace(config.policy, target=choice.target, threads=choice.threads))


def measure_choice(bundle: Bundle, config: RobotConfig, make_factory: MakeFactory, budget_s: float, *,
                   max_rounds: int = STARTUP_ROUNDS, timer: Callable[[], float] = time.perf_counter,
                   key: str | None = None) -> tuning.TuneChoice:
    """Build and activate one pipeline per candidate, time them interleaved, close them all, choose."""
    targets, threads = candidate_targets(bundle, config), candidate_threads(config)
    baseline_name = tuning.baseline_target(bundle.manifest["targets"])
    policy = config.policy
    pipelines: dict[tuning.Candidate, PolicyPipeline] = {}
    try:
        for candidate in tuning.candidates(targets, threads):
            resolved = with_choice(config, tuning.TuneChoice(candidate.target, candidate.threads, "measured"))
            pipeline = PolicyPipeline(bundle, target=candidate.target, mc_samples=policy.mc_samples,
                                      mask_seed=policy.mask_seed, backend_factory=make_factory(resolved))
            try:
                pipeline.activate()
            except EdgeError as exc:  # a variant this machine cannot load is no candidate; FP32 must load
                pipeline.close()
                if candidate.target == baseline_name or len(targets) == 1:
                    raise
                logger.warning("tune: %s cannot run here, not a candidate: %s", candidate.label(), exc)
                continue
            pipelines[candidate] = pipeline
        runners = {c: tuning.pipeline_runner(p) for c, p in pipelines.items()}
        baseline = next((c for c in runners if c.target == baseline_name and c.threads == min(threads)), None)
        if baseline is None:
            baseline = next((c for c in runners if c.target == baseline_name), None)
        return tuning.tune(runners, baseline, budget_s, timer=timer, fingerprint=key, max_rounds=max_rounds)
    finally:
        for pipeline in pipelines.values():
            pipeline.close()


def resolve_policy(bundle: Bundle, config: RobotConfig, make_factory: MakeFactory, *,
                   timer: Callable[[], float] = time.perf_counter) -> tuple[RobotConfig, tuning.TuneChoice]:
    """The config with policy.target and policy.threads concrete, and how they were chosen (logged)."""
    policy = config.policy
    if not policy.needs_tuning:
        choice = tuning.TuneChoice(policy.target, int(policy.threads), "configured")
        return config, choice
    only = tuning.candidates(candidate_targets(bundle, config), candidate_threads(config))
    if len(only) == 1:  # e.g. threads: auto on a GPU backend with an explicit target: nothing to choose
        choice = tuning.TuneChoice(only[0].target, only[0].threads, "only candidate")
        logger.info("policy choice: %s", choice.line())
        return with_choice(config, choice), choice
    print_, key = machine_fingerprint(bundle, config)
    choice = tuning.TuneCache(cache_path(config)).get(key)
    if choice is not None and not _fits(bundle, config, choice):
        logger.warning("tune cache entry %s names %s, which this bundle/config does not offer: measuring",
                       key, choice.line())
        choice = None
    if choice is None:
        choice = measure_choice(bundle, config, make_factory, policy.tune_budget_s, timer=timer, key=key)
    logger.info("policy choice: %s", choice.line())
    return with_choice(config, choice), choice


def _fits(bundle: Bundle, config: RobotConfig, choice: tuning.TuneChoice) -> bool:
    try:
        return choice.target in candidate_targets(bundle, config) and choice.threads in candidate_threads(config)
    except BundleError:
        return False


def tune_and_cache(bundle: Bundle, config: RobotConfig, make_factory: MakeFactory, budget_s: float = TUNE_BUDGET_S,
                   *, timer: Callable[[], float] = time.perf_counter) -> tuning.TuneChoice:
    """`vla-edge tune`: measure the auto choices with a longer budget and cache them by fingerprint."""
    if not config.policy.needs_tuning:
        raise ConfigError("policy.target and policy.threads are both set explicitly: nothing to tune; set either "
                          "to auto (the default) to have it measured")
    print_, key = machine_fingerprint(bundle, config)
    choice = measure_choice(bundle, config, make_factory, budget_s, max_rounds=TUNE_ROUNDS, timer=timer, key=key)
    tuning.TuneCache(cache_path(config)).put(key, print_, choice)
    logger.info("cached in %s under %s: %s", cache_path(config), key, choice.line())
    return choice


def cached_choice(bundle: Bundle, config: RobotConfig) -> tuple[str, tuning.TuneChoice | None]:
    """Doctor's view: the fingerprint key and the cached choice for it (None: run measures at start-up)."""
    _, key = machine_fingerprint(bundle, config)
    choice = tuning.TuneCache(cache_path(config)).get(key)
    return key, choice if choice is not None and _fits(bundle, config, choice) else None


def add_tune_command(commands) -> None:
    tune = commands.add_parser("tune", help="measure the fastest target and thread count on this machine and "
                                            "cache the choice for `vla-edge run` (policy.target/threads: auto)")
    tune.add_argument("--config", required=True, help="robot configuration file (YAML)")
    tune.add_argument("--budget-s", type=float, default=TUNE_BUDGET_S, help="measuring time (default %(default)s)")
    tune.set_defaults(handler=_tune_main)


def _tune_main(args: argparse.Namespace) -> int:
    from edge.service import wiring
    from edge.service.config import load_config

    if not 0.1 <= args.budget_s <= 3600:
        raise ConfigError(f"--budget-s must be in [0.1, 3600] s, got {args.budget_s}")
    config = load_config(args.config)
    bundle = wiring.load_bundle(config)
    choice = tune_and_cache(bundle, config, lambda c: wiring.backend_factory(bundle, c), args.budget_s)
    for m in sorted(choice.measurements, key=lambda m: m.p99_ms):
        print(f"{m.candidate.label():28s} p50 {m.p50_ms:8.2f} ms  p99 {m.p99_ms:8.2f} ms  ({m.runs} runs)")
    print(f"chosen: {choice.line()}; cached in {cache_path(config)}")
    return 0
