"""The start-up validation that `vla-edge doctor` and `vla-edge run` share: what doctor calls ready, runs.

Run before any device is opened or armed, in this order (edge/service/wiring.py uses it; run exits 78,
EX_CONFIG, on any fatal problem; doctor prints each one as a FAIL line with its key and its fix):

    config         loaded and validated section by section (edge/service/config.py): unknown and
                   duplicate keys, ranges, types (`instruction.socket: 123`, `realtime.freeze_gc: 'no'`)
    bundle files   every file and directory of the bundle readable by this (the service) user
    bundle         verified by edge.inference.bundle (schema, hashes)
    combination    the config against the bundle: `policy_problems` below (target, T, channels,
                   target vs backend, the ROS 2 command's targets, proprio vs telemetry)
    ros2           the ros2: section on this machine: `ros2_problems` (binding, interface, topics, domain)
    controller     once the motor link is open, before the first command: the controller's
                   Capabilities against the bundle's action spec (`controller_problems`)

A problem is fatal (doctor FAIL, run refuses to start) or a warning (doctor WARN, run logs it and
starts): a warning is a configuration that runs correctly but not as well as it could.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.errors import BundleError, ConfigError
from edge.inference.bundle import rebuild_hint
from edge.service.checks import _user_name

# Targets whose graphs are laid out for TensorRT (symmetric Q/DQ INT8, FP16): ONNX Runtime runs them,
# but on its CPU provider about twice as slowly as the CPU target's graphs (issue 13, finding 12).
TENSORRT_TARGETS = ("tensorrt", "fp16")
CPU_TARGETS = ("cpu", "cpu-qoperator", "cpu-reduce-range", "cpu-fp32")
# The T the threshold was calibrated at, as the build writes it today into uncertainty.method
# ("... T=16)"); a structured `uncertainty.mc_samples` is read first where a bundle has one.
_CALIBRATED_T = re.compile(r"\bT=(\d+)\b")


@dataclass(frozen=True)
class StartupProblem:
    """One thing wrong with the config, the bundle or the two together."""

    key: str  # the config key (``policy.mc_samples``) or the bundle file it is about
    message: str  # what was found
    fix: str  # what to do
    fatal: bool = True  # False: a warning; the robot runs, less well

    def text(self) -> str:
        return f"{self.message}; {self.fix}"


def rebuild_command(bundle_dir, manifest: dict | None = None) -> str:
    """The command that rebuilds `bundle_dir`, naming the --policy it was built from when the manifest says."""
    return rebuild_hint(manifest).replace("<bundle dir>", str(bundle_dir))


# -- bundle files -------------------------------------------------------------------------------------------


def bundle_access_problems(bundle_dir: str | Path) -> list[StartupProblem]:
    """Every directory of the bundle searchable and listable, every file readable, by this process's user.

    doctor runs as the service's own user (the unit's User=, ExecStartPre=), so what it finds here is
    what `run` would meet; a bundle built or copied by another user with files 0600 is the usual cause.
    """
    root = Path(bundle_dir)
    if not root.exists():
        return []  # the bundle loader says that it is missing, with the command that builds one
    unreadable: list[Path] = []
    user = _user_name()

    def cannot_list(exc: OSError) -> None:
        unreadable.append(Path(exc.filename))

    for directory, subdirs, files in os.walk(root, onerror=cannot_list):
        here = Path(directory)
        if not os.access(here, os.R_OK | os.X_OK):
            unreadable.append(here)
            subdirs[:] = []
            continue
        unreadable += [here / name for name in sorted(files) if not os.access(here / name, os.R_OK)]
    problems = []
    for path in dict.fromkeys(unreadable):  # once each, in walk order
        try:
            st = os.stat(path)
            found = f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid}"
        except OSError as exc:
            found = exc.strerror or str(exc)
        kind = "directory" if path.is_dir() else "file"
        problems.append(StartupProblem(
            str(path), f"bundle {kind} {path} is not readable by user {user!r} ({found})",
            f"make the bundle readable by the service user: sudo chmod -R a+rX {root} (or sudo chgrp -R "
            f"{user} {root} && sudo chmod -R g+rX {root})"))
    return problems


def check_bundle_access(bundle_dir: str | Path) -> None:
    """BundleError naming the first unreadable file and the fix (and how many more there are)."""
    problems = bundle_access_problems(bundle_dir)
    if problems:
        more = f" ({len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise BundleError(f"{problems[0].message}{more}; {problems[0].fix}")


# -- the config against the bundle --------------------------------------------------------------------------


def calibrated_samples(manifest: dict, target: str) -> tuple[int, ...]:
    """The T values the bundle calibrated an uncertainty threshold at for `target` (schema v2's
    `uncertainty.by_samples`), else the one T an older record names; () when it says nothing."""
    section = manifest.get("uncertainty") or {}
    by_samples = (section.get("by_samples") or {}).get(target)
    if isinstance(by_samples, dict) and by_samples:
        return tuple(sorted(int(t) for t in by_samples))
    recorded = section.get("mc_samples")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return (recorded,)
    match = _CALIBRATED_T.search(str(section.get("method", "")))
    return (int(match.group(1)),) if match else ()


def calibrated_mc_samples(manifest: dict, target: str = "cpu") -> int | None:
    """The T the threshold of `target` was calibrated at, where the bundle records exactly one."""
    found = calibrated_samples(manifest, target)
    return found[0] if len(found) == 1 else None


def pipeline_problems(bundle, config) -> list[StartupProblem]:
    """What building the pipeline needs (`bundle` an edge.inference.bundle.Bundle, `config` a RobotConfig):
    the target exists, T fits the engines' profile; and a warning for TensorRT's graphs on the CPU.
    The benchmark builds pipelines with these checks only (it may time T=1 and drives no motor)."""
    policy = config.policy
    problems = []
    targets = sorted(bundle.manifest["targets"])
    if policy.target not in targets and policy.target != "auto":  # auto: edge/service/tune.py chooses
        problems.append(StartupProblem(
            "policy.target", f"policy.target: the bundle has no target {policy.target!r} (it has {targets})",
            f"set policy.target to one of them, or rebuild with the options that make it: "
            f"{rebuild_command(config.bundle, bundle.manifest)}"))
    max_samples = int(bundle.dropout["max_samples"])
    if policy.mc_samples > max_samples:
        problems.append(StartupProblem(
            "policy.mc_samples", f"policy.mc_samples {policy.mc_samples} exceeds the bundle's max_samples "
            f"{max_samples} (the engine profile's largest batch)",
            f"set policy.mc_samples <= {max_samples}, or rebuild with a larger maximum"))
    if (policy.backend == "onnxruntime" and policy.target in TENSORRT_TARGETS and policy.device == "cpu"
            and policy.target in targets):
        cpu = [t for t in CPU_TARGETS if t in targets]
        problems.append(StartupProblem(
            "policy.target", f"policy.target {policy.target!r} is laid out for TensorRT, but policy.backend is "
            f"onnxruntime on the CPU: it runs, about twice as slowly as a CPU target",
            (f"set policy.target: {cpu[0]}" if cpu else "rebuild with a CPU target")
            + " on this machine, or policy.backend: tensorrt on a Jetson", fatal=False))
    return problems


def robot_problems(bundle, config) -> list[StartupProblem]:
    """What driving the robot needs on top: the gate can see (T >= 2, the calibrated T), and the motor
    link carries the policy's action (motor.channels = the action's dimension)."""
    policy = config.policy
    problems = []
    # target auto (not yet measured, as doctor sees it): the T of any target it may choose; run checks again
    # with the chosen target.
    targets = tuple(bundle.manifest["targets"]) if policy.target == "auto" else (policy.target,)
    calibrated_set = tuple(sorted({t for target in targets for t in calibrated_samples(bundle.manifest, target)}))
    calibrated = "T=" + "/".join(map(str, calibrated_set)) if calibrated_set else None
    if policy.mc_samples < 2:
        problems.append(StartupProblem(
            "policy.mc_samples", f"policy.mc_samples {policy.mc_samples} leaves the uncertainty gate blind: the "
            f"spread of a single dropout sample is always 0, so the robot would never fall back",
            f"set policy.mc_samples to at least 2 (the bundle's threshold was calibrated at "
            f"{calibrated or 'its build default'})"))
    dim = int(bundle.action["dim"])
    problems += _ros2_command_problems(bundle, config, dim)
    if config.motor is not None and config.motor.channels != dim:
        names = ", ".join(map(str, bundle.action.get("names") or ())) or "unnamed"
        problems.append(StartupProblem(
            "motor.channels", f"motor.channels is {config.motor.channels} but the policy's action has {dim} "
            f"dimension(s) ({names})",
            f"set motor.channels: {dim} (one velocity target per action dimension), or use a bundle whose "
            f"policy drives {config.motor.channels} channel(s)"))
    within_profile = 2 <= policy.mc_samples <= int(bundle.dropout["max_samples"])  # else refused already
    if (calibrated_set and within_profile and policy.mc_samples not in calibrated_set
            and config.uncertainty.threshold is None):
        problems.append(StartupProblem(
            "policy.mc_samples", f"policy.mc_samples is {policy.mc_samples} but the bundle's uncertainty "
            f"threshold was calibrated at {calibrated}: the spread of fewer samples is noisier, of more "
            f"smoother, so the gate falls back more or less often than calibrated",
            f"set policy.mc_samples: {calibrated_set[0]}, or calibrate a threshold at this T and set "
            f"uncertainty.threshold", fatal=False))
    return problems


def _ros2_command_problems(bundle, config, dim: int) -> list[StartupProblem]:
    """The ROS 2 command carries the policy's action: one target per action dimension."""
    command = config.ros2.command if config.ros2 is not None else None
    if command is None or command.n_targets == dim:
        return []
    names = ", ".join(map(str, bundle.action.get("names") or ())) or "unnamed"
    if command.kind == "twist":
        return [StartupProblem(
            "ros2.command.kind", f"ros2.command is a Twist (2 targets: linear x, angular z) but the policy's "
            f"action has {dim} dimension(s) ({names})",
            f"set ros2.command.kind: joint_trajectory with {dim} joint_names, or use a bundle whose policy "
            "commands a differential drive (2 targets)")]
    return [StartupProblem(
        "ros2.command.joint_names", f"ros2.command.joint_names has {command.n_targets} joint(s) but the "
        f"policy's action has {dim} dimension(s) ({names})",
        f"list {dim} joint names in ros2.command.joint_names, in the order of the policy's action")]


def ros2_problems(config, environ: Mapping[str, str] | None = None) -> list[StartupProblem]:
    """What the ros2: section needs on this machine (doctor's "ros2" lines; run refuses a fatal one):
    the DDS binding loads, the interface address belongs to this machine, no two roles share a topic,
    and (a warning) ROS_DOMAIN_ID, where set, is the configured domain."""
    section = config.ros2
    if section is None:
        return []
    problems = []
    try:
        importlib.import_module("cyclonedds.domain")  # loads the C library too, not only the package
    except (ImportError, OSError) as exc:
        problems.append(StartupProblem(
            "ros2", f"the ROS 2 bridge's DDS binding does not load ({exc})",
            "pip install 'vla-edge[ros2]'; on a Jetson build it against the Cyclone DDS C library and set "
            "CYCLONEDDS_HOME (docs/ros2.md, On a Jetson)"))
    address = section.interface_address
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((address, 0))  # only an address of this machine binds; nothing is sent
    except OSError as exc:
        problems.append(StartupProblem(
            "ros2.interface_address", f"ros2.interface_address {address} is not an address of this machine "
            f"({exc.strerror or exc})",
            "set it to the IPv4 address of the network interface the robot's ROS 2 graph is on (`ip -4 addr`), "
            "or 127.0.0.1 for a graph on this host only"))
    finally:
        probe.close()
    topics: dict[str, str] = {}
    for role in section.roles:
        topic = "/" + getattr(section, role).topic.lstrip("/")
        if topic in topics:
            problems.append(StartupProblem(
                f"ros2.{role}.topic", f"ros2.{role}.topic and ros2.{topics[topic]}.topic are both {topic}: one "
                "DDS topic cannot carry two roles' types", f"give ros2.{role} a topic of its own"))
        topics.setdefault(topic, role)
    env_domain = (os.environ if environ is None else environ).get("ROS_DOMAIN_ID")
    if env_domain is not None and env_domain.strip() != str(section.domain_id):
        problems.append(StartupProblem(
            "ros2.domain_id", f"ros2.domain_id is {section.domain_id} but ROS_DOMAIN_ID is {env_domain!r} in this "
            "environment: the service and ROS 2 nodes started from it would not see each other",
            f"set ros2.domain_id: {env_domain.strip()} (the graph's ROS_DOMAIN_ID), or start the nodes with "
            f"ROS_DOMAIN_ID={section.domain_id}", fatal=False))
    return problems


def camera_problems(bundle, config) -> list[StartupProblem]:
    """Each of the policy's cameras has a camera config (`cameras.<name>`, or the one `camera:` for a
    one-camera policy); a configured camera the policy does not take is a warning (it is never opened)."""
    names = [c.name for c in bundle.spec.cameras]
    problems = []
    configured = config.camera_configs(names)
    for name in names:
        if name in configured:
            continue
        if config.cameras:
            message = f"cameras has no entry {name!r}: the policy takes the cameras {', '.join(names)}"
        else:
            message = (f"the policy takes {len(names)} cameras ({', '.join(names)}) but `camera:` gives one")
        problems.append(StartupProblem(
            f"cameras.{name}", message,
            f"give each camera under cameras:, e.g. cameras: {{{name}: {{source: /dev/video0}}}}"))
    for name in config.cameras:
        if name not in names:
            problems.append(StartupProblem(
                f"cameras.{name}", f"cameras.{name} is not a camera of the policy (it takes {', '.join(names)})",
                "remove it, or rename it to the spec camera it is", fatal=False))
    return problems


def chunk_problems(bundle, config) -> list[StartupProblem]:
    """policy.replan_every within 1..H (a chunk of H steps cannot be replanned less often than it lasts);
    a warning for chunk settings that a one-step policy ignores."""
    horizon = int(bundle.spec.action.horizon)
    chunks = config.chunks
    problems = []
    if horizon == 1:
        for key, value in (("replan_every", chunks.replan_every), ("temporal_ensemble", chunks.temporal_ensemble)):
            if value is not None:
                problems.append(StartupProblem(
                    f"policy.{key}", f"policy.{key} is set but the policy returns one action per inference "
                    f"(horizon 1): it has no effect", f"remove policy.{key}", fatal=False))
        return problems
    replan = chunks.replan_ticks(horizon)
    if not 1 <= replan <= horizon:
        problems.append(StartupProblem(
            "policy.replan_every", f"policy.replan_every {replan} is out of 1..{horizon}: the policy's chunks are "
            f"{horizon} steps long, so the robot would stop between chunks",
            f"set policy.replan_every to at most {horizon} (default {max(1, horizon // 4)}: a quarter of the "
            f"horizon)"))
    return problems


def language_problems(bundle, config) -> list[StartupProblem]:
    """An initial instruction for a policy that takes none (its spec has no language)."""
    if bundle.spec.language is None and config.instruction.initial:
        return [StartupProblem(
            "instruction.initial", f"instruction.initial is set but the policy {bundle.spec.name!r} takes no "
            "instruction (its bundle has no language input); it runs without one",
            "remove instruction.initial")]
    return []


def proprio_problems(bundle, config) -> list[StartupProblem]:
    """A proprio source the telemetry can never fill: its channel index lies beyond the controller's
    channels (`motor.channels`; a ROS 2 JointState is read for the action's dimension, edge/control/
    controller_watch.py refuses any other count), so every tick would be a controlled stop."""
    proprio = bundle.spec.proprio
    if config.motor is not None:
        channels, key, what = config.motor.channels, "motor.channels", f"motor.channels is {config.motor.channels}"
    elif config.ros2 is not None and config.ros2.telemetry is not None:
        channels = int(bundle.action["dim"])
        key, what = "ros2.telemetry", f"the ROS 2 JointState (ros2.telemetry) carries {channels} joint(s)"
    else:
        return []
    beyond = [f"{field}[{index}]" for field, index in proprio.sources if index >= channels]
    if not beyond:
        return []
    return [StartupProblem(
        key, f"the policy's proprio reads {', '.join(beyond)} but {what} (channels 0..{channels - 1}): the "
        f"telemetry can never give it, so the robot would stop every tick",
        f"rebuild the bundle with proprio sources within channels 0..{channels - 1} "
        f"({rebuild_command(config.bundle, bundle.manifest)}), or use a controller whose telemetry has them")]


def policy_problems(bundle, config) -> list[StartupProblem]:
    """Every problem of the config against the bundle: what doctor reports and run refuses or logs."""
    return (pipeline_problems(bundle, config) + robot_problems(bundle, config) + camera_problems(bundle, config)
            + chunk_problems(bundle, config) + language_problems(bundle, config) + proprio_problems(bundle, config))


def fatal(problems: list[StartupProblem]) -> list[StartupProblem]:
    return [p for p in problems if p.fatal]


def raise_if_fatal(problems: list[StartupProblem]) -> None:
    """One ConfigError listing every fatal problem, each with its key and its fix."""
    errors = fatal(problems)
    if errors:
        raise ConfigError(" | ".join(p.text() for p in errors))


# -- the controller against the bundle (docs/serial-protocol.md, section 6a, rule 14) ------------------------

CAPABILITIES_TIMEOUT_S = 2.0  # GetCapabilities is repeated every 100 ms; a controller answers within one


def capabilities_problems(capabilities, action) -> list[StartupProblem]:
    """Where the controller's Capabilities (edge.io.protocol) cannot carry the bundle's action spec
    (edge.inference.spec.ActionSpec): channel count, the kind of each channel, position limits."""
    key = "motor controller capabilities"
    flash = "flash firmware that matches the robot the bundle was built for, or use a bundle for this robot"
    if capabilities.channel_count != action.dim:
        return [StartupProblem(key, f"the motor controller has {capabilities.channel_count} channel(s), the "
                               f"policy's action has {action.dim} ({', '.join(action.names)})", flash)]
    problems = []
    for index, (name, kind, channel) in enumerate(zip(action.names, action.kinds, capabilities.channels)):
        if not channel.supports(kind):
            problems.append(StartupProblem(
                key, f"channel {index} ({name}): the policy commands a {kind}, the controller supports only "
                f"{' and '.join(channel.kinds)} on it", flash))
        elif kind == "position":
            low, high = action.low[index], action.high[index]
            if low < channel.position_min or high > channel.position_max:
                problems.append(StartupProblem(
                    key, f"channel {index} ({name}): the policy's position range [{low:g}, {high:g}] is not "
                    f"within the controller's limits [{channel.position_min:g}, {channel.position_max:g}]",
                    "narrow the policy's action low/high to the controller's limits and rebuild the bundle, "
                    "or set the controller's limits (firmware) to the joint's real range"))
    return problems


def controller_problems(link, action, timeout_s: float = CAPABILITIES_TIMEOUT_S) -> list[StartupProblem]:
    """The controller's Capabilities against the bundle once the link (a connected SerialMotorLink) has
    them; a problem too when they do not arrive within `timeout_s` (a v1 controller never sends any)."""
    key = "motor controller capabilities"
    capabilities = link.wait_for_capabilities(timeout_s)
    if capabilities is None:
        reason = link.command_problem() or "the controller did not answer GetCapabilities"
        return [StartupProblem(
            key, f"motor link {link.config.port}: no capabilities within {timeout_s:g} s: {reason}",
            "check that the controller runs firmware implementing serial protocol v2 (docs/serial-protocol.md) "
            "and that motor.port is the controller")]
    return capabilities_problems(capabilities, action)
