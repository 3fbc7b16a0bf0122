"""Part 4: the robot's two transports side by side: ROS 2 over DDS and the serial link with the MJPEG camera.

Per transport, one-way, as the runtime meets them:

- frame: the camera side hands a frame over -> the runtime's camera holds it as a BGR array. DDS: a
  sensor_msgs/Image published by another process (benchmarks/dds_peer.py) until ``Ros2Camera`` holds it
  (the CDR decode and the rgb8 -> BGR conversion included), from the header's wall-clock stamp. Serial
  path: the simulator's MJPEG server takes a frame until OpenCV's ``Camera`` holds it (JPEG encode, HTTP
  on loopback, decode), from the time the server took it.
- command: the runtime's send call -> the robot's side has decoded it. DDS: ``Ros2CommandSink`` publishes
  a trajectory_msgs/JointTrajectory until the peer process takes it. Serial: ``SerialMotorLink`` writes a
  SetTargets frame into a pty until the other end has decoded it (as the controller's reader would).
- image encode / decode: sensor_msgs/Image CDR per frame (the bridge's bytes path), at the camera's size
  and at 640x480.

All on this host over loopback: the network hop between two machines is not in these numbers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks.settings import REPO_ROOT
from benchmarks.stats import summarize

logger = logging.getLogger(__name__)

FRAME_SHAPE = (240, 320)  # the reference camera's frames (reference_world.world.WorldConfig)
_WAIT_S = 30.0  # bounds each phase on a slow machine; no measurement depends on it


def _poll_new_frames(camera, count: int, age_of_newest) -> list[float]:
    """Until ``count`` new frames arrived (or the phase bound): for each, ``age_of_newest()`` in ms."""
    out: list[float] = []
    seen = camera.frame_count
    deadline = time.monotonic() + _WAIT_S
    while len(out) < count and time.monotonic() < deadline:
        if camera.frame_count != seen:
            seen = camera.frame_count
            age = age_of_newest()
            if age is not None:
                out.append(age * 1e3)
        else:
            time.sleep(0.0002)
    return out


def _codec_costs(iterations: int) -> dict:
    from edge.io.ros2 import msgs
    from edge.io.ros2.sources import decode_image

    costs = {}
    for height, width in (FRAME_SHAPE, (480, 640)):
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        message = msgs.Image(header=msgs.Header(frame_id="bench"), height=height, width=width, encoding="rgb8",
                             step=width * 3, data=pixels.tobytes())
        wire = message.serialize()
        timed: dict[str, list[float]] = {"encode": [], "decode": [], "to_bgr": []}
        for _ in range(iterations):
            t0 = time.perf_counter()
            message.serialize()
            t1 = time.perf_counter()
            decoded = msgs.Image.deserialize(wire)
            t2 = time.perf_counter()
            decode_image(decoded)
            t3 = time.perf_counter()
            for name, value in (("encode", t1 - t0), ("decode", t2 - t1), ("to_bgr", t3 - t2)):
                timed[name].append(value * 1e3)
        costs[f"{width}x{height}"] = {name: summarize(v) for name, v in timed.items()}
    return costs


def measure_dds(iterations: int, domain: int | None = None) -> dict:
    """Frames from a peer process into Ros2Camera, commands from Ros2CommandSink to the peer."""
    from edge.io.ros2.dds import Ros2Config, Ros2Node
    from edge.io.ros2.outputs import Ros2CommandConfig, Ros2CommandSink
    from edge.io.ros2.sources import Ros2Camera, Ros2CameraConfig

    domain = random.randint(1, 200) if domain is None else domain
    height, width = FRAME_SHAPE
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.dds_peer", "--domain", str(domain), "--frames",
                             str(iterations + 20), "--width", str(width), "--height", str(height)],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    frame_ms: list[float] = []
    sent = 0
    try:
        with Ros2Node(Ros2Config(domain_id=domain)) as node:
            sink = Ros2CommandSink(node, Ros2CommandConfig(topic="/bench/joint_trajectory", kind="joint_trajectory",
                                                           joint_names=("left", "right")))
            camera = Ros2Camera(node, Ros2CameraConfig(topic="/bench/image_raw", open_timeout_s=_WAIT_S))
            sink.connect()
            camera.connect()  # the peer publishes once this reader matched; a lost first sample is fine
            frame_ms = _poll_new_frames(camera, iterations, lambda: camera.frame_age_s())
            for i in range(iterations):
                sink.send_velocity([0.1 * (i % 5), -0.1])
                sent += 1
                time.sleep(0.01)  # apart, as commands are (10 Hz in the loop); the peer takes each at once
            camera.disconnect()
            sink.disconnect()  # publishes the zero command a stopping sink leaves on its topic
            sent += 1
    finally:
        try:
            output, _ = peer.communicate(input="", timeout=_WAIT_S)
        except subprocess.TimeoutExpired:
            peer.kill()
            output, _ = peer.communicate()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"frames_sent": 0, "command_ms": []}
    return {"domain": domain, "frame": summarize(frame_ms), "frames_published": result["frames_sent"],
            "command": summarize(result["command_ms"][1:]),  # the first one may wait for the match
            "commands_sent": sent, "commands_received": len(result["command_ms"])}


def _mjpeg_frames(iterations: int) -> list[float]:
    from edge.io.camera import Camera, CameraConfig
    from simulator.mjpeg import MjpegServer

    height, width = FRAME_SHAPE
    taken_at = [0.0] * 200  # by grey level - 28: when the server took that frame
    counter = [0]

    def frame_source() -> np.ndarray:
        counter[0] += 1
        index = counter[0] % 200
        taken_at[index] = time.monotonic()
        return np.full((height, width, 3), 28 + index, np.uint8)  # a flat level survives JPEG within +-1

    def age_of_newest() -> float | None:
        frame, _, _ = camera.read_latest()
        if frame is None:
            return None
        index = int(round(float(frame.mean()))) - 28
        return time.monotonic() - taken_at[index] if 0 <= index < 200 else None

    server = MjpegServer(frame_source, fps=50.0)
    server.start()
    camera = Camera(CameraConfig(source=server.url, open_timeout_s=_WAIT_S))
    try:
        camera.connect()
        return _poll_new_frames(camera, iterations, age_of_newest)
    finally:
        camera.disconnect()
        server.stop()


def _serial_commands(iterations: int) -> list[float]:
    from edge.io.motor_link import MotorLinkConfig, SerialMotorLink
    from edge.io.protocol import (
        Capabilities,
        ChannelCapability,
        FrameDecoder,
        GetCapabilities,
        SetTargets,
        encode,
    )

    leader, follower = os.openpty()
    decoded_at: dict[int, float] = {}
    stop = threading.Event()

    def controller_reader() -> None:  # the controller's side of the line
        decoder = FrameDecoder()
        while not stop.is_set():
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            now = time.monotonic()
            for message in decoder.feed(data):
                if isinstance(message, SetTargets):
                    decoded_at[message.seq] = now
                elif isinstance(message, GetCapabilities):  # the link commands only after the answer
                    os.write(leader, encode(Capabilities(seq=0, firmware_version=(2, 0, 0),
                                                         channels=(ChannelCapability(("velocity",)),) * 2,
                                                         watchdog_timeout_ms=300, telemetry_period_ms=20)))

    reader = threading.Thread(target=controller_reader, daemon=True)
    reader.start()
    link = SerialMotorLink(MotorLinkConfig(port=os.ttyname(follower), exclusive=False, low_latency=False))
    latencies = []
    try:
        link.connect()
        link.wait_for_capabilities(2.0)
        for i in range(iterations):
            before = time.monotonic()
            sent = link.send_targets([0.1 * (i % 5), -0.1])
            deadline = time.monotonic() + 1.0
            while sent.seq not in decoded_at and time.monotonic() < deadline:
                time.sleep(0.0002)
            if sent.seq in decoded_at:
                latencies.append((decoded_at[sent.seq] - before) * 1e3)
            time.sleep(0.01)
    finally:
        link.disconnect()
        stop.set()
        os.close(follower)
        os.close(leader)
        reader.join(timeout=2.0)
    return latencies


def run_transports(iterations: int) -> dict:
    """Both transports and the image codec; a part that cannot run here says why instead."""
    out: dict = {"frame_shape": list(FRAME_SHAPE), "iterations": iterations}
    try:
        import cyclonedds  # noqa: F401
    except ImportError as exc:
        out["dds"] = {"unavailable": f"the ros2 extra (cyclonedds) is not installed: {exc}"}
    else:
        out["dds"] = measure_dds(iterations)
        out["image_codec"] = _codec_costs(iterations)
    out["serial"] = {"frame": summarize(_mjpeg_frames(iterations)), "command": summarize(_serial_commands(iterations))}
    return out


def format_transports(transports: dict | None) -> list[str]:
    """The Markdown section of the report."""
    if not transports:
        return []
    height, width = transports["frame_shape"]

    def cells(stats: dict | None) -> str:
        stats = stats or {}
        return " | ".join("-" if stats.get(k) is None else f"{stats[k]:.2f}" for k in ("p50", "p90", "p99", "max"))

    dds, serial = transports.get("dds") or {}, transports["serial"]
    lines = ["", f"## Transports: ROS 2 over DDS next to serial + MJPEG (one-way, loopback, {width}x{height} frames)",
             "", "| path | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    if "unavailable" in dds:
        lines.append(f"| DDS | - | {dds['unavailable']} | | | |")
    elif dds:
        lines += [f"| DDS frame: Image published (other process) -> Ros2Camera holds BGR | {dds['frame'].get('n', 0)} | "
                  f"{cells(dds['frame'])} |",
                  f"| DDS command: JointTrajectory published -> taken by the other process | "
                  f"{dds['command'].get('n', 0)} | {cells(dds['command'])} |"]
    lines += [f"| serial path frame: MJPEG server takes it -> OpenCV camera holds BGR | {serial['frame'].get('n', 0)} | "
              f"{cells(serial['frame'])} |",
              f"| serial command: SetTargets written -> decoded at the pty's other end | "
              f"{serial['command'].get('n', 0)} | {cells(serial['command'])} |"]
    for size, costs in (transports.get("image_codec") or {}).items():
        for step, label in (("encode", "CDR encode"), ("decode", "CDR decode"), ("to_bgr", "rgb8 -> BGR")):
            lines.append(f"| sensor_msgs/Image {size} {label} (per frame) | {costs[step].get('n', 0)} | "
                         f"{cells(costs[step])} |")
    return lines
