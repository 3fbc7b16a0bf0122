"""The one place that turns a policy bundle and a robot config into the runtime's parts.

`vla-edge run`, `vla-edge doctor`, the latency benchmark and the tests all build the system through
these functions, so what doctor checks is what run builds (docs/architecture.md, "Parts"):

    load_bundle(config)                   the bundle, readable by this user and verified (doctor, run)
    check_startup(bundle, config)         the config against the bundle: target, T, channels (doctor, run)
    check_policy(bundle, config)          target and T fit the bundle (every pipeline, benchmark too)
    engine_fit(bundle, target, ...)       each TensorRT engine fits this GPU     (doctor; the backend
                                                                                 checks the same key)
    backend_factory(bundle, config)       backends for the configured target
    resolve_policy(bundle, config)        policy.target/threads: auto made concrete for this machine
    build_pipeline(bundle, config)        the policy pipeline (not yet activated)
    safety_config(bundle, config)         the safety layer's limits: bundle's action spec + config
    motor_config(bundle, config)          the motor link's config with the bundle's command kinds
    gate_config(bundle, config)           the uncertainty gate: bundle's threshold unless overridden
    failure_monitor(bundle, config)       the spread gate plus the bundle's monitor signals (spread alone
                                          for a bundle without a monitor section)
    build_cameras(bundle, config)         one camera object per spec camera (not connected)
    build_loop(pipeline, camera, link, bundle, config)   the control loop with its gate and safety,
                                                        executing chunks for a chunk policy
    ros2_roles(config)                    the ROS 2 bridge of the ros2: section (None without one)
    make_cameras(bundle, config, roles)   the cameras: a ROS 2 image topic or one OpenCV camera per spec camera
    make_link(config, roles, bundle)      the motor link: ROS 2 command topics or the serial link
    command_width(config)                 how many targets one command carries on that link

Nothing here opens a device: the caller connects the camera and the motor link (run does, doctor
only checks them), so every check above happens before any device is armed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from edge.control.frame_sync import FrameSync, frame_sync_window, fresh_before_window
from edge.control.loop import ControlLoop
from edge.control.monitor import FailureMonitor, load_models
from edge.control.safety import SafetyConfig, SafetyLayer
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.errors import BundleError, ConfigError
from edge.inference.backends.base import InferenceBackend
from edge.inference.bundle import Bundle
from edge.inference.engine_key import EngineKey, key_path
from edge.inference.pipeline import BackendFactory, PolicyPipeline, onnxruntime_factory
from edge.inference.tuning import TuneChoice
from edge.io.camera import Camera
from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
from edge.service import startup, tune
from edge.service.config import RobotConfig
from edge.service.ros2_roles import Ros2Roles

logger = logging.getLogger(__name__)


def rebuild_command(bundle_dir, bundle: Bundle | None = None) -> str:
    """The command that rebuilds `bundle_dir`; with the bundle, it names the --policy it was built from."""
    return startup.rebuild_command(bundle_dir, None if bundle is None else bundle.manifest)


def engines_command(bundle_dir) -> str:
    """Engines for this device from the bundle's graphs: on the robot, without torch or a full rebuild."""
    return f"build-engines --engines-only {bundle_dir}"


def check_policy(bundle: Bundle, config: RobotConfig) -> None:
    """The configured target and T against the bundle, as far as building the pipeline needs; raises
    BundleError for a bundle this runtime cannot run yet (several cameras, chunks, no language) and
    ConfigError naming the key to change (edge/service/startup.py, pipeline_problems)."""
    bundle.check_runnable()
    startup.raise_if_fatal(startup.pipeline_problems(bundle, config))


def check_startup(bundle: Bundle, config: RobotConfig) -> list[startup.StartupProblem]:
    """Everything of the config against the bundle that driving the robot needs (doctor and run, before
    any device is opened): BundleError for a bundle this runtime cannot run yet, ConfigError listing
    every fatal problem; returns the warnings."""
    bundle.check_runnable()
    problems = startup.policy_problems(bundle, config) + startup.ros2_problems(config)
    startup.raise_if_fatal(problems)
    return problems


def load_bundle(config: RobotConfig) -> Bundle:
    """The config's bundle, readable by this user (a BundleError naming the file and the chmod that fixes
    it, not a PermissionError) and verified."""
    startup.check_bundle_access(config.bundle)
    return Bundle.load(config.bundle)


# -- backends ---------------------------------------------------------------------------------------------


def engine_key(bundle: Bundle, graph: str, variant: str) -> EngineKey:
    """The key the bundle's manifest records for the engine of one graph variant (BundleError if none)."""
    entry = {(e.graph, e.variant): e for e in bundle.engines}.get((graph, variant))
    if entry is None:
        raise BundleError(f"bundle {bundle.root} has no TensorRT engine for the {variant} {graph} graph; build "
                          f"engines on this device with: {engines_command(bundle.root)}")
    # The GPU fields are read from the manifest's raw table: keys from before them read as "unknown".
    raw = next((e for e in bundle.manifest.get("engines", [])
                if isinstance(e, dict) and (e.get("graph"), e.get("variant")) == (graph, variant)), {})
    gpu = {name: raw[name] for name in ("gpu_name", "multiprocessors") if name in raw}
    return EngineKey.from_dict({"source_sha256": entry.source_sha256, "tensorrt_version": entry.tensorrt_version,
                                "compute_capability": entry.compute_capability, "precision": entry.precision, **gpu})


@dataclass(frozen=True)
class EngineFit:
    """Whether one engine of the target can run here; `problem` is None when it can."""

    graph: str
    variant: str
    path: str | None
    problem: str | None
    precision: str | None = None


def engine_fit(bundle: Bundle, target: str, tensorrt_version: str, compute_capability: str, *,
               gpu_name: str | None = None, multiprocessors: str | None = None) -> list[EngineFit]:
    """Each engine of `target` against this TensorRT version and GPU: present, its key file agreeing with
    the manifest, built from the graph the bundle ships, by this TensorRT for this compute capability (and,
    where given, this GPU's name and multiprocessor count)."""
    gpu = {name: value for name, value in (("gpu_name", gpu_name), ("multiprocessors", multiprocessors))
           if value is not None}
    fits = []
    engines = {(e.graph, e.variant): e for e in bundle.engines}
    for graph, variant in sorted(bundle.target_variants(target).items()):
        entry = engines.get((graph, variant))
        if entry is None:
            fits.append(EngineFit(graph, variant, None, f"the bundle has no TensorRT engine for the {variant} "
                                  f"{graph} graph (target {target})"))
            continue
        engine_path = bundle.root / entry.path
        if not engine_path.is_file():
            fits.append(EngineFit(graph, variant, entry.path, f"{engine_path} is missing"))
            continue
        try:
            built = engine_key(bundle, graph, variant)
            sidecar = key_path(engine_path)
            if sidecar.is_file():
                on_disk = EngineKey.load(sidecar)
                if on_disk != built:
                    raise BundleError(f"key file {sidecar.name} disagrees with the manifest: "
                                      + "; ".join(on_disk.mismatch(built)))
        except BundleError as exc:
            fits.append(EngineFit(graph, variant, entry.path, str(exc)))
            continue
        source = bundle.graphs[graph].files.get(variant) if graph in bundle.graphs else None
        source_sha256 = bundle.manifest["files"].get(source, built.source_sha256) if source else built.source_sha256
        required = replace(built, source_sha256=source_sha256, tensorrt_version=tensorrt_version,
                           compute_capability=compute_capability, **gpu)
        problems = built.mismatch(required)
        fits.append(EngineFit(graph, variant, entry.path,
                              f"{entry.path} does not fit: {'; '.join(problems)} (engines run only on the TensorRT "
                              f"version and GPU that built them)" if problems else None, entry.precision))
    return fits


def backend_factory(bundle: Bundle, config: RobotConfig, *, trt=None, cudart=None) -> BackendFactory:
    """Backends for the configured target; `trt`/`cudart` replace the TensorRT and CUDA modules (tests)."""
    policy = config.policy
    if policy.backend == "onnxruntime":
        return onnxruntime_factory(bundle, device=policy.device, threads=policy.threads)
    from edge.inference.backends.tensorrt import TensorRTBackend

    def make(graph: str, variant: str, inputs, outputs, max_batch: int) -> InferenceBackend:
        key = engine_key(bundle, graph, variant)
        entry = {(e.graph, e.variant): e for e in bundle.engines}[(graph, variant)]
        return TensorRTBackend(bundle.path(entry.path), key, inputs, outputs, max_batch, trt=trt, cudart=cudart)

    return make


def resolve_policy(bundle: Bundle, config: RobotConfig, *, trt=None, cudart=None) -> tuple[RobotConfig, TuneChoice]:
    """The config with `policy.target: auto` / `policy.threads: auto` replaced by the choice for this machine
    (cached by `vla-edge tune`, else measured within policy.tune_budget_s), and that choice
    (edge/service/tune.py). Explicit values come back unchanged."""
    return tune.resolve_policy(bundle, config, lambda c: backend_factory(bundle, c, trt=trt, cudart=cudart))


def build_pipeline(bundle: Bundle, config: RobotConfig, *, trt=None, cudart=None,
                   choice: TuneChoice | None = None) -> PolicyPipeline:
    """The policy pipeline of the configured target and T (call `activate()` before the first tick); auto
    values are resolved first (`resolve_policy`) unless the caller did and passes its `choice`."""
    if config.policy.needs_tuning or choice is None:
        config, choice = resolve_policy(bundle, config, trt=trt, cudart=cudart)
    check_policy(bundle, config)
    policy = config.policy
    pipeline = PolicyPipeline(bundle, target=policy.target, mc_samples=policy.mc_samples, mask_seed=policy.mask_seed,
                              backend_factory=backend_factory(bundle, config, trt=trt, cudart=cudart))
    pipeline.tuning = {"line": choice.line(), **choice.to_dict()}
    return pipeline


# -- control ----------------------------------------------------------------------------------------------


def safety_config(bundle: Bundle, config: RobotConfig) -> SafetyConfig:
    """The bundle's action limits and slew limits, with the config's overrides (safety.*)."""
    action = bundle.action
    dim = int(action["dim"])
    slew = config.safety.max_slew_per_s
    slew_per_dim = tuple([slew] * dim) if slew is not None else tuple(float(v) for v in action["max_slew_per_s"])
    return SafetyConfig(
        action_low=tuple(float(v) for v in action["low"]),
        action_high=tuple(float(v) for v in action["high"]),
        max_slew_per_s=slew_per_dim,
        decel_per_s=tuple(min(config.safety.decel_per_s, s) for s in slew_per_dim),
        period_s=config.loop.period_s,
        stale_after_periods=config.safety.stale_after_periods,
        fallback_behaviour=config.safety.fallback_behaviour,
        damping=config.safety.damping,
        kinds=tuple(bundle.spec.action.kinds),
        input_loss_stop=config.safety.input_loss_stop,
        telemetry_stale_after_s=config.motor.telemetry_stale_after_s if config.motor is not None else None,
    )


def gate_config(bundle: Bundle, config: RobotConfig) -> GateConfig:
    """The bundle's calibrated threshold and ceiling for the target, unless the config sets them."""
    target = config.policy.target
    if target == "auto":
        raise ConfigError("the uncertainty gate needs the target that runs: policy.target is auto, so resolve it "
                          "first (resolve_policy, or build_loop with the built pipeline)")
    # The threshold calibrated at this T where the bundle has one (schema v2's by_samples), else the
    # target's; a T without its own threshold is a start-up warning (edge/service/startup.py).
    by_samples = (bundle.manifest["uncertainty"].get("by_samples") or {}).get(target) or {}
    calibrated = by_samples.get(str(config.policy.mc_samples))
    threshold = config.uncertainty.threshold or (float(calibrated) if calibrated is not None
                                                 else bundle.uncertainty_threshold(target))
    ceiling = config.uncertainty.hard_ceiling
    if ceiling is None:
        ceiling = float(bundle.manifest["uncertainty"].get("hard_ceiling", {}).get(target, 3.0 * threshold))
    if not math.isfinite(ceiling):
        ceiling = threshold
    return GateConfig(threshold=threshold, hard_ceiling=max(ceiling, threshold),
                      enter_ticks=config.uncertainty.enter_ticks, exit_ticks=config.uncertainty.exit_ticks)


def failure_monitor(bundle: Bundle, config: RobotConfig) -> FailureMonitor:
    """The uncertainty gate of `gate_config` with the bundle's feature-novelty, action-consistency and
    instruction-novelty models for the target (edge/control/monitor.py); the spread alone for an older
    bundle without a `monitor` section."""
    action = bundle.spec.action
    action_range = float(max(h - lo for h, lo in zip(action.high, action.low)))
    models = load_models(bundle, config.policy.target, disable=config.monitor.disable)
    return FailureMonitor(UncertaintyGate(gate_config(bundle, config)), models, action.dim, action_range)


def motor_config(bundle: Bundle, config: RobotConfig) -> MotorLinkConfig:
    """The config's motor link, each channel of the kind the policy commands (spec.action.kinds)."""
    return replace(config.motor, kinds=tuple(bundle.spec.action.kinds))


def build_cameras(bundle: Bundle, config: RobotConfig) -> dict:
    """One camera object (edge.io.camera.Camera, not connected) per spec camera, by spec name and in spec
    order; ConfigError naming a spec camera the config does not give (edge/service/startup.py)."""
    startup.raise_if_fatal(startup.camera_problems(bundle, config))
    return {name: Camera(cam) for name, cam in config.camera_configs([c.name for c in bundle.spec.cameras]).items()}


def build_loop(pipeline: PolicyPipeline, camera, link, bundle: Bundle, config: RobotConfig, *,
               on_deadline_met: Callable[[], None] | None = None, loop_class: type[ControlLoop] = ControlLoop,
               **loop_options) -> ControlLoop:
    """The control loop of the config, with the bundle's safety layer and failure monitor.

    `camera` is one camera object or one per spec camera (`build_cameras`). `loop_options` go to the loop
    unchanged (clock, sleep, frame_shape ...: tests and the benchmark); `loop_class` lets the benchmark
    drive a subclass that adds its own per-tick bookkeeping.
    """
    loop_cfg = config.loop
    if config.policy.target != pipeline.target:  # an auto target: the gate's threshold is the chosen one's
        config = replace(config, policy=replace(config.policy, target=pipeline.target))
    loop = loop_class(
        pipeline, camera, link, SafetyLayer(safety_config(bundle, config)), failure_monitor(bundle, config),
        loop_cfg.period_s, stale_after_s=config.safety.stale_after_periods * loop_cfg.period_s,
        record_ticks=loop_cfg.record_ticks, summary_every_s=loop_cfg.summary_every_s,
        on_deadline_met=on_deadline_met, chunk_config=config.chunks, **loop_options,
    )
    sync_frames(loop, config)
    return loop


MEASURED_RATE_MARGIN = 0.95  # a measured rate this close to the control rate counts as at least it


def camera_fps(config: RobotConfig, camera=None) -> float | None:
    """The rate of the first camera: camera.fps where the config states it, else the rate its frames have
    been arriving at (a connected camera's `measured_fps`, after start-up's warm-up), else None."""
    if config.camera is not None and config.camera.fps is not None:
        return float(config.camera.fps)
    measured = getattr(camera, "measured_fps", None)
    return measured() if callable(measured) else None


def sync_frames(loop: ControlLoop, config: RobotConfig) -> float | None:
    """loop.frame_sync: the loop's ticks start on the first camera's new frames inside a window before each
    deadline (edge/control/frame_sync.py); returns the window (None: off). Auto (null) turns it on when the
    camera's rate (camera.fps, else measured on its frames) is at least the control rate and the camera
    signals new frames."""
    loop_cfg = config.loop
    enabled = getattr(loop_cfg, "frame_sync", False)
    fps = camera_fps(config, loop.camera)
    stated = config.camera is not None and config.camera.fps is not None
    if enabled is None and fps is not None and not stated:
        enabled = fps >= MEASURED_RATE_MARGIN * loop_cfg.rate_hz  # a 10 fps camera measures 9.9 or 10.1
        logger.info("camera rate measured on its frames: %.1f fps (camera.fps not set): frame sync %s", fps,
                    "on" if enabled else "off")
    window = frame_sync_window(enabled, fps, loop_cfg.rate_hz, getattr(loop_cfg, "frame_sync_window_s", None))
    if window is None or (enabled is None and not hasattr(loop.camera, "wait_newer")):
        return None
    loop.keeper.sync_to(FrameSync(loop.camera, fresh_before_window(fps, window), window), window)
    logger.info("frame-synchronous ticks: a new frame starts the tick up to %.1f ms before its deadline",
                window * 1e3)
    return window


# -- devices: the OpenCV camera and serial link, or their ROS 2 topics ---------------------------------------


def ros2_roles(config: RobotConfig) -> Ros2Roles | None:
    """The ROS 2 bridge of the config's ros2: section, not yet connected; None when there is none."""
    return None if config.ros2 is None else Ros2Roles(config.ros2)


def make_cameras(bundle: Bundle, config: RobotConfig, roles: Ros2Roles | None = None) -> dict:
    """The configured cameras by spec name, not yet connected: the ROS 2 image topic where ros2.camera is
    set (a one-camera policy), else one OpenCV camera per spec camera (`build_cameras`)."""
    if roles is not None and roles.camera is not None:
        return {bundle.spec.cameras[0].name: roles.camera}
    return build_cameras(bundle, config)


def make_link(config: RobotConfig, roles: Ros2Roles | None = None, bundle: Bundle | None = None):
    """The configured motor link, not yet connected: Ros2MotorLink where ros2.command is set, else the
    serial link of the motor section, each channel of the kind the bundle's action names (`motor_config`)."""
    if roles is not None and roles.link is not None:
        return roles.link
    return SerialMotorLink(config.motor if bundle is None else motor_config(bundle, config))


def command_width(config: RobotConfig) -> int:
    """Targets per command on the configured link (motor.channels, or the ROS 2 command's targets)."""
    if config.motor is not None:
        return config.motor.channels
    return config.ros2.command.n_targets
