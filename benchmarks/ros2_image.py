"""Cost of a camera frame on the ROS 2 bridge: CDR encode/decode and publish → the bridge sees it.

    python -m benchmarks.ros2_image [--width 640 --height 480 --iterations 200 --domain 42]

Prints a Markdown table (median and p90 in ms). Rows:
- ``encode fast`` / ``decode fast``: sensor_msgs/Image through the bridge's bytes-typed twin struct
  (edge/io/ros2/msgs.py), the path the bridge uses.
- ``encode declared`` / ``decode declared``: the binding's own encoder for the declared ``sequence<uint8>``
  (one value at a time), for comparison; few iterations, it is slow.
- ``to BGR``: the bridge's conversion of an rgb8 message to the BGR array the loop reads.
- ``publish -> seen``: write on one participant until the bridge's Ros2Camera of the same process holds the
  frame, over the loopback domain (Cyclone delivers in-process without the network; the network hop
  needs two hosts and is not in this number).
Absolute numbers mean something only on the target machine; compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np


def _stats(samples_s: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_s)
    return statistics.median(ordered) * 1e3, ordered[int(0.9 * (len(ordered) - 1))] * 1e3


def _time(fn, iterations: int) -> list[float]:
    out = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run(width: int, height: int, iterations: int, domain: int) -> list[tuple[str, float, float, int]]:
    from cyclonedds.idl import IdlStruct

    from edge.io.ros2 import msgs
    from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node
    from edge.io.ros2.sources import Ros2Camera, Ros2CameraConfig, decode_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    message = msgs.Image(header=msgs.Header(frame_id="bench"), height=height, width=width, encoding="rgb8",
                         step=width * 3, data=pixels.tobytes())
    wire = message.serialize()
    declared = msgs.Image(message.header, height, width, "rgb8", 0, width * 3, list(message.data))
    slow_n = max(3, iterations // 50)
    rows = []
    for name, fn, n in (("encode fast", message.serialize, iterations),
                        ("decode fast", lambda: msgs.Image.deserialize(wire), iterations),
                        ("encode declared", lambda: IdlStruct.serialize(declared), slow_n),
                        ("decode declared", lambda: IdlStruct.deserialize.__func__(msgs.Image, wire), slow_n),
                        ("to BGR", lambda: decode_image(message), iterations)):
        rows.append((name, *_stats(_time(fn, n)), n))

    with Ros2Node(Ros2Config(domain_id=domain)) as node:
        writer = node.writer("/bench/image_raw", msgs.Image, QosProfile.SENSOR)
        camera = Ros2Camera(node, Ros2CameraConfig(topic="/bench/image_raw", open_timeout_s=10))
        stop = threading.Event()

        def feed() -> None:  # until the reader has matched and holds a first frame
            while not stop.is_set():
                writer.write(message)
                stop.wait(0.05)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            camera.connect()
        finally:
            stop.set()
            feeder.join()
        latencies = []
        for _ in range(iterations):
            before = camera.frame_count
            start = time.perf_counter()
            writer.write(message)
            while camera.frame_count == before and time.perf_counter() - start < 1.0:
                time.sleep(0)
            if camera.frame_count != before:
                latencies.append(time.perf_counter() - start)
        camera.disconnect()
    if latencies:
        rows.append(("publish -> seen", *_stats(latencies), len(latencies)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ros2_image", description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--domain", type=int, default=42, help="DDS domain id (loopback only)")
    args = parser.parse_args(argv)
    rows = run(args.width, args.height, args.iterations, args.domain)
    print(f"sensor_msgs/Image {args.width}x{args.height} rgb8 ({args.width * args.height * 3} bytes)\n")
    print("| step | median ms | p90 ms | n |\n|---|---|---|---|")
    for name, median_ms, p90_ms, n in rows:
        print(f"| {name} | {median_ms:.2f} | {p90_ms:.2f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
