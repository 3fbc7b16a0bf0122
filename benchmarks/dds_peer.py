"""The robot's side of the DDS path in the latency benchmark, as its own process (a real loopback hop).

    python -m benchmarks.dds_peer --domain 42 --frames 100 --width 320 --height 240

Publishes ``--frames`` sensor_msgs/Image on /bench/image_raw, each stamped with the wall clock just before
its write, once a reader has matched; meanwhile takes trajectory_msgs/JointTrajectory on
/bench/joint_trajectory and keeps, per command, the wall-clock time from its header stamp to its receipt.
Both processes read one host's clock, so the differences are one-way latencies. When stdin closes it
prints one JSON line: ``{"frames_sent": N, "command_ms": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

IMAGE_TOPIC = "/bench/image_raw"
COMMAND_TOPIC = "/bench/joint_trajectory"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dds_peer", description=__doc__.split("\n")[0])
    parser.add_argument("--domain", type=int, required=True)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--period-s", type=float, default=0.02, help="between two frames")
    args = parser.parse_args(argv)

    from edge.io.ros2 import msgs
    from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    pixels = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8).tobytes()
    command_ms: list[float] = []
    sent = [0]
    with Ros2Node(Ros2Config(domain_id=args.domain)) as node:
        from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
        from cyclonedds.util import duration

        images = node.writer(IMAGE_TOPIC, msgs.Image, QosProfile.SENSOR)
        commands = node.reader(COMMAND_TOPIC, msgs.JointTrajectory, QosProfile.COMMAND)
        waitset = WaitSet(node.participant)
        waitset.attach(ReadCondition(commands, SampleState.Any | ViewState.Any | InstanceState.Any))

        def camera() -> None:  # the camera node: frames at its period once the runtime's reader matched
            while not done.wait(args.period_s):
                if sent[0] < args.frames and images.get_matched_subscriptions():
                    message = msgs.Image(header=msgs.Header(frame_id="bench"), height=args.height,
                                         width=args.width, encoding="rgb8", step=args.width * 3, data=pixels)
                    message.header.stamp = msgs.Time.from_seconds(time.time())
                    images.write(message)
                    sent[0] += 1

        publisher = threading.Thread(target=camera, daemon=True)
        publisher.start()
        while not done.is_set():  # the base driver: each command taken as soon as it arrives
            waitset.wait(duration(milliseconds=50))
            for sample in commands.take(N=32):
                if isinstance(sample, msgs.JointTrajectory):
                    stamp = sample.header.stamp.sec + sample.header.stamp.nanosec * 1e-9
                    command_ms.append((time.time() - stamp) * 1e3)
        publisher.join(timeout=2.0)
    sent = sent[0]
    print(json.dumps({"frames_sent": sent, "command_ms": command_ms}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
