"""`make demo`: the whole system closed-loop on a CPU, through the same interfaces as on the robot.

    policy bundle -> simulated motor controller (a pty + an MJPEG camera, separate process)
                  -> `vla-edge run` (the real service, separate process) -> several episodes

With ``--ros2`` (`make demo-ros2`) the service takes its camera, commands and joint states from ROS 2 topics
instead: the simulated robot sits behind a small ROS 2 graph in this process (simulator/ros2_graph.py: a
camera node publishing sensor_msgs/Image, a base driver taking trajectory_msgs/JointTrajectory to the
controller's serial port and publishing sensor_msgs/JointState), over DDS on loopback with unicast peers;
the service's config has a ros2: section and no camera or motor section.

Episodes use training instructions, a held-out paraphrase and OOD scenes. Instructions go to the
service over its control socket (`vla-edge say`); the simulator's ground truth (pose, success, motors
stopped) is read for the report only. Writes per-episode results, fallback activity and tick latency
percentiles (demo.json + a table), a picture of each trajectory over its scene and a tick-latency
histogram (PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.service.control_protocol import send_request
from reference_world.episodes import EpisodeResult, draw_trajectories
from reference_world.instructions import heldout_instruction
from reference_world.world import WorldConfig
from simulator.process import (
    GroundTruthClient,
    SimulatorConfig,
    SimulatorPaths,
    SimulatorProcess,
    child_env,
    stop_process,
)

logger = logging.getLogger(__name__)

DEMO_SEED_BASE = 6_000_000  # away from training, evaluation, calibration and gate seeds
EPISODE_TIMEOUT_S = 15.0  # the world's time limit: 150 ticks at 10 Hz
EPISODES = (
    {"label": "training instruction", "target": "red block"},
    {"label": "training instruction", "target": "green triangle"},
    {"label": "training instruction", "target": "yellow star"},
    {"label": "held-out paraphrase", "target": "blue ball", "paraphrase": True},
    {"label": "held-out paraphrase", "target": "red block", "paraphrase": True},
    {"label": "OOD: novel colour", "target": "green triangle", "variant": "novel_colour"},
    {"label": "OOD: named object absent", "target": "blue ball", "variant": "absent_object"},
)


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def service_status(socket_path: Path) -> dict | None:
    try:
        reply = send_request(socket_path, {"cmd": "status"}, timeout_s=1.0)
    except Exception:  # noqa: BLE001 - the service may be starting or gone; the caller retries or reports
        return None
    return reply if reply.get("ok") else None


DEFAULT_BUNDLE = Path("artifacts/bundle")


def _manifest_policy(bundle: Path) -> dict | None:
    try:
        return json.loads((bundle / "manifest.json").read_text())["policy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bundle_is_current(policy: dict) -> bool:
    """A bundle of the default policy was built from the policy checkpoint that is here now."""
    from edge.inference.bundle import file_sha256
    from reference_policy.model import DEFAULT_CHECKPOINT_DIR

    current = {p.name: file_sha256(p) for p in sorted(DEFAULT_CHECKPOINT_DIR.iterdir()) if p.is_file()}
    return policy.get("checkpoint_sha256") == current


def parse_bundles(values: list[str]) -> dict[str, Path]:
    """["reference=artifacts/bundle", "act=artifacts/bundle-act"] -> {name: directory}, names unique."""
    bundles: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--bundles entry {value!r} must be NAME=DIRECTORY, e.g. act=artifacts/bundle-act")
        if name in bundles:
            raise ValueError(f"--bundles names {name!r} twice; give each bundle its own name")
        bundles[name] = Path(directory)
    return bundles


def ensure_bundle(bundle: Path, gate_seeds: int, build_missing: bool = True) -> None:
    """Use the bundle in `bundle`. One of the default (reference) policy is rebuilt when its checkpoint
    changed; one of any other policy is used as built. A missing bundle is built from the default policy
    when `build_missing`, else refused with the command that builds it."""
    from build_engines.policy import DEFAULT_POLICY

    policy = _manifest_policy(bundle)
    if policy is not None and (policy.get("factory") != DEFAULT_POLICY or _bundle_is_current(policy)):
        print(f"using the policy bundle in {bundle} ({policy.get('name')}, {policy.get('factory')})")
        return
    if policy is None and not build_missing:
        raise SystemExit(f"no policy bundle in {bundle}; build it first: build-engines --int8 --policy "
                         f"module:factory --out {bundle} (make bundle, make bundle-act)")
    print(f"building the policy bundle into {bundle} (first run, or the policy changed) ...", flush=True)
    from build_engines.cli import main as build_main

    code = build_main(["--int8", "--out", str(bundle), "--gate-seeds", str(gate_seeds), "--log-level", "WARNING",
                       "--force"])
    if code != 0:
        raise SystemExit(f"bundle build failed with exit code {code}")


def ros2_section(domain_id: int) -> dict:
    """The service's ros2: section for the simulated robot's ROS 2 graph (simulator/ros2_graph.py): frames
    and joint states in, wheel velocities out as a JointTrajectory, over loopback unicast discovery."""
    from simulator.ros2_graph import WHEEL_JOINTS, GraphTopics

    topics = GraphTopics()
    return {"domain_id": domain_id, "interface_address": "127.0.0.1", "peers": ["127.0.0.1"],
            "camera": {"topic": topics.image, "open_timeout_s": 20.0},
            "command": {"topic": topics.joint_trajectory, "kind": "joint_trajectory",
                        "joint_names": list(WHEEL_JOINTS), "max_abs": [1.0]},
            "telemetry": {"topic": topics.joint_states}, "estop": {}, "diagnostics": {}, "mode": {}}


def runtime_refusal(bundle: Path) -> str | None:
    """Why this runtime cannot run the bundle (None when it can), before any process starts."""
    from edge.errors import EdgeError
    from edge.inference.bundle import Bundle

    try:
        Bundle.load(bundle).check_runnable()
    except EdgeError as exc:
        return str(exc)
    return None


def write_config(path: Path, bundle: Path, serial: str, camera_url: str, socket_path: Path,
                 target: str = "cpu", ros2_domain: int | None = None) -> None:
    """The service's config: the simulator's pty and MJPEG stream, or (``ros2_domain``) ROS 2 topics."""
    import yaml

    devices = ({"camera": {"source": camera_url, "open_timeout_s": 10.0}, "motor": {"port": serial}}
               if ros2_domain is None else {"ros2": ros2_section(ros2_domain)})
    config = {
        "bundle": str(bundle.resolve()),
        **devices,
        # One ONNX Runtime thread: the simulator shares the 2 cores of a small machine, and two spinning
        # intra-op threads on a busy core stall each other (measured: 1.9-2.1x slower ticks under load).
        "policy": {"target": target, "backend": "onnxruntime", "mc_samples": 16, "threads": 1},
        "loop": {"rate_hz": 10.0, "summary_every_s": 30.0},
        "instruction": {"socket": str(socket_path.resolve())},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def run_episode(spec: dict, seed: int, sim: GroundTruthClient, socket_path: Path, rng) -> tuple[dict, EpisodeResult,
                                                                                               list[float]]:
    send_request(socket_path, {"cmd": "stop"})
    _wait_for(lambda: sim.ground_truth()["motors_stopped"], 5.0, "the robot to stop before the episode")
    sim.command("reset_episode", seed=seed, target=spec["target"], variant=spec.get("variant"))
    truth = sim.ground_truth()
    instruction = heldout_instruction(spec["target"], rng) if spec.get("paraphrase") else truth["instruction"]
    before = service_status(socket_path)["counters"]
    reply = send_request(socket_path, {"cmd": "say", "text": instruction})
    if not reply.get("ok"):
        raise RuntimeError(f"service refused the instruction: {reply}")
    started = time.monotonic()
    poses, ticks, in_fallback, round_trips = [truth["pose"]], {}, [False], []
    first_fallback_s = None
    status = None
    while time.monotonic() - started < EPISODE_TIMEOUT_S:
        truth = sim.ground_truth()
        status = service_status(socket_path) or status
        poses.append(truth["pose"])
        falling_back = bool(status) and status.get("mode") == "fallback"
        in_fallback.append(falling_back)
        if falling_back and first_fallback_s is None:
            first_fallback_s = time.monotonic() - started
        if status and status.get("tick"):
            ticks[status["tick"]["index"]] = status["tick"]["tick_ms"]
            if status["link"].get("round_trip_ms") is not None:
                round_trips.append(status["link"]["round_trip_ms"])
        if truth["success"]:
            break
        time.sleep(0.05)
    after = service_status(socket_path)["counters"]
    elapsed = time.monotonic() - started
    ran = max(1, after["ticks"] - before["ticks"])
    ended, stopped_in_fallback = episode_end(truth, status, first_fallback_s)
    row = {
        "episode": spec["label"], "seed": seed, "target": spec["target"], "variant": spec.get("variant"),
        "instruction": instruction, "success": bool(truth["success"]), "seconds": round(elapsed, 2),
        "final_distance_m": round(truth["distance_to_target_m"], 3),
        "ticks": ran, "fallback_share": (after["fallback"] - before["fallback"]) / ran,
        "hold_share": (after["hold"] - before["hold"]) / ran,
        "first_fallback_s": None if first_fallback_s is None else round(first_fallback_s, 2),
        "ended": ended, "stopped_in_fallback": stopped_in_fallback,
        "round_trip_ms_median": float(np.median(round_trips)) if round_trips else None,
    }
    result = EpisodeResult(seed=seed, instruction=instruction, target=spec["target"], variant=spec.get("variant"),
                           success=row["success"], steps=ran, final_distance_m=truth["distance_to_target_m"],
                           trajectory=np.asarray(poses, dtype=np.float64),
                           fallback=np.asarray(in_fallback, dtype=bool), outcome=ended,
                           stopped_in_fallback=stopped_in_fallback)
    return row, result, [v for v in ticks.values() if np.isfinite(v)]


def episode_end(truth: dict, status: dict | None, first_fallback_s: float | None) -> tuple[str, bool]:
    """How an episode ended, in words, from the simulator's ground truth and the service's last status, and
    whether the robot came to rest in fallback (motors stopped while the service falls back)."""
    if truth["success"]:
        return "reached the target", False
    mode = (status or {}).get("mode")
    stopped = bool(truth["motors_stopped"])
    if mode == "fallback" and stopped:
        tripped = ((status or {}).get("monitor") or {}).get("tripped") or []
        onset = "" if first_fallback_s is None else f", first fallback {first_fallback_s:.1f} s in"
        return f"stopped in fallback ({', '.join(tripped) or 'safety'}){onset}", True
    if mode == "hold" and (status or {}).get("hold_reason"):
        return f"held: {status['hold_reason'][:48]}", False
    return f"{'stopped' if stopped else 'still moving'} at the time limit, mode {mode or 'unknown'}", False


def latency_histogram(tick_ms: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(tick_ms, bins=40, color="#3b7dd8")
    p50, p99 = np.percentile(tick_ms, [50, 99])
    for value, label in ((p50, "p50"), (p99, "p99")):
        ax.axvline(value, color="k", linestyle="--", linewidth=1)
        ax.text(value, ax.get_ylim()[1] * 0.9, f" {label} {value:.1f} ms", fontsize=8)
    ax.set_xlabel("tick: frame ready -> command bytes handed to the serial link (ms)")
    ax.set_ylabel("ticks")
    ax.set_title(f"vla-edge tick latency, {len(tick_ms)} ticks at 10 Hz (CPU, INT8)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass
class Rig:
    """A running simulator process and `vla-edge run` process, wired as on a robot."""

    paths: SimulatorPaths  # the simulator's serial path, camera URL and ground-truth address
    socket_path: Path
    sim: GroundTruthClient
    startup_s: float  # service launch -> its control socket answers


@contextlib.contextmanager
def ros2_robot(paths: SimulatorPaths, domain_id: int) -> Iterator[None]:
    """The simulated robot's ROS 2 graph, in this process: its camera node reads the simulator's MJPEG
    stream and publishes Image; its base driver takes JointTrajectory (or Twist) to the simulator's pty
    and publishes JointState. The service then sees the robot only through ROS 2 topics."""
    from edge.io.camera import Camera, CameraConfig
    from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
    from edge.io.ros2.dds import Ros2Config, Ros2Node
    from simulator.ros2_graph import RobotGraph

    camera = Camera(CameraConfig(source=paths.camera_url, open_timeout_s=10.0))
    link = SerialMotorLink(MotorLinkConfig(port=paths.serial))
    camera.connect()
    try:
        link.connect()
        try:
            with Ros2Node(Ros2Config(domain_id=domain_id)) as node, RobotGraph(node, camera, link):
                yield
        finally:
            link.disconnect()
    finally:
        camera.disconnect()


@contextlib.contextmanager
def closed_loop_rig(bundle: Path, out: Path, name: str, seed: int, target: str = "cpu",
                    ros2_domain: int | None = None) -> Iterator[Rig]:
    """Start the simulator, write a config for it, start the real service; stop both (SIGTERM) on exit.
    With ``ros2_domain`` the simulated robot sits behind a ROS 2 graph on that DDS domain."""
    log_path = out / f"service{name}.log"
    with SimulatorProcess(SimulatorConfig(seed=seed), out / f"simulator{name}.log") as simulator, \
            GroundTruthClient(simulator.paths.ground_truth) as client, open(log_path, "w") as log, \
            (ros2_robot(simulator.paths, ros2_domain) if ros2_domain is not None else contextlib.nullcontext()):
        paths = simulator.paths
        socket_path = out / f"control{name}.sock"
        config_path = out / f"robot{name}.yaml"
        write_config(config_path, bundle, paths.serial, paths.camera_url, socket_path, target=target,
                     ros2_domain=ros2_domain)
        started = time.monotonic()
        service = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            _wait_for(lambda: service.poll() is not None or service_status(socket_path), 60.0, "the service to start")
            if service.poll() is not None:
                raise SystemExit(f"the service exited with code {service.returncode}; see {log_path}")
            yield Rig(paths, socket_path, client, time.monotonic() - started)
        finally:
            stop_process(service, "vla-edge run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help=f"the bundle to run (default {DEFAULT_BUNDLE})")
    parser.add_argument("--bundles", nargs="+", default=None, metavar="NAME=DIR",
                        help="run the demo for each of several bundles, e.g. reference=artifacts/bundle "
                             "act=artifacts/bundle-act (results under OUT/NAME)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    parser.add_argument("--gate-seeds", type=int, default=50, help="closed-loop gate episodes if a build is needed")
    parser.add_argument("--ros2", action="store_true",
                        help="camera, commands and joint states on ROS 2 topics (DDS on loopback) instead of the "
                             "MJPEG stream and the pty (make demo-ros2)")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="DDS domain for --ros2 (default: a random one in 1..200, apart from other runs)")
    args = parser.parse_args(argv)
    if args.bundle is not None and args.bundles is not None:
        parser.error("give --bundle or --bundles, not both")
    try:
        runs = ({name: (path, args.out / name) for name, path in parse_bundles(args.bundles).items()}
                if args.bundles else {"": (args.bundle or DEFAULT_BUNDLE, args.out)})
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for bundle, _ in runs.values():
        ensure_bundle(bundle, args.gate_seeds, build_missing=args.bundles is None)
    domain = None
    if args.ros2:
        domain = args.domain_id if args.domain_id is not None else int(np.random.default_rng().integers(1, 201))
    refused = 0
    for name, (bundle, out) in runs.items():
        if name:
            print(f"\n## {name}: {bundle}")
        refusal = runtime_refusal(bundle)
        if refusal is not None:
            print(f"not run: {refusal}")
            refused += 1
            continue
        run_demo(bundle, out, domain)
    return 1 if refused else 0



def run_demo(bundle: Path, out: Path, domain: int | None = None) -> None:
    """The demo's episodes with one bundle: pictures, demo.json and the logs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with closed_loop_rig(bundle, out, "", DEMO_SEED_BASE, ros2_domain=domain) as rig:
        if domain is None:
            print(f"service up {rig.startup_s:.1f} s after launch; camera {rig.paths.camera_url}, "
                  f"serial {rig.paths.serial}")
        else:
            print(f"service up {rig.startup_s:.1f} s after launch; camera, commands and joint states on ROS 2 "
                  f"topics, DDS domain {domain} on 127.0.0.1")
        socket_path = rig.socket_path
        rng = np.random.default_rng(DEMO_SEED_BASE)
        rows, all_ticks = [], []
        world_config = WorldConfig()
        print("\n| # | episode | instruction | success | s | final distance (m) | fallback ticks | ended |")
        print("|---|---|---|---|---|---|---|---|")
        for i, spec in enumerate(EPISODES):
            row, result, ticks = run_episode(spec, DEMO_SEED_BASE + i, rig.sim, socket_path, rng)
            picture = out / f"episode_{i}.png"
            draw_trajectories(world_config, [result], picture)
            row["picture"] = str(picture)
            rows.append(row)
            all_ticks.extend(ticks)
            print(f"| {i} | {row['episode']} | {row['instruction']} | {'yes' if row['success'] else 'no'} | "
                  f"{row['seconds']} | {row['final_distance_m']} | {row['fallback_share']:.0%} | {row['ended']} |",
                  flush=True)
        send_request(socket_path, {"cmd": "stop"})
        status = service_status(socket_path)
        p50, p90, p99 = np.percentile(all_ticks, [50, 90, 99]) if all_ticks else (np.nan,) * 3
        latency_histogram(all_ticks, out / "tick_latency.png")
        in_task = [r for r in rows if not r["episode"].startswith("OOD")]
        summary = {
            "episodes": rows,
            "success_in_distribution": f"{sum(r['success'] for r in in_task)}/{len(in_task)}",
            "tick_ms": {"p50": p50, "p90": p90, "p99": p99, "samples": len(all_ticks)},
            "service_status": status,
            "transport": "ros2" if domain is not None else "serial+mjpeg",
        }
        (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"\nsuccess {summary['success_in_distribution']} on in-distribution episodes; "
              f"tick latency p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms ({len(all_ticks)} ticks)")
        print(f"pictures, demo.json, service.log and simulator.log in {out}")


if __name__ == "__main__":
    raise SystemExit(main())
