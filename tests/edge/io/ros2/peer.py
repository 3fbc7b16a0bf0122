"""A second process on the DDS domain: publishes an Image and a String, echoes the commands it receives.

Run as ``python -m tests.edge.io.ros2.peer DOMAIN_ID``; prints one JSON line per received Twist and
publishes until stdin closes. Uses only the message types and the binding, not the bridge's roles, so the
test's other side is an independent participant.
"""

import json
import sys
import threading
import time

import numpy as np


def frame(width: int, height: int, count: int) -> np.ndarray:
    """An rgb8 test pattern whose content encodes its position and the counter."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x % 256), (y % 256), np.full_like(x, count % 256)], axis=-1)
    return rgb.astype(np.uint8)


def main() -> None:
    from cyclonedds.core import InstanceState, ReadCondition, SampleState, ViewState, WaitSet
    from cyclonedds.util import duration

    from edge.io.ros2 import msgs
    from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node

    node = Ros2Node(Ros2Config(domain_id=int(sys.argv[1])))
    node.connect()
    image_writer = node.writer("/camera/image_raw", msgs.Image, QosProfile.SENSOR)
    text_writer = node.writer("/instruction", msgs.String, QosProfile.DEFAULT)
    cmd_reader = node.reader("/cmd_vel", msgs.Twist, QosProfile.COMMAND)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    waitset = WaitSet(node.participant)
    waitset.attach(ReadCondition(cmd_reader, SampleState.Any | ViewState.Any | InstanceState.Any))
    count = 0
    while not stop.is_set():
        count += 1
        rgb = frame(64, 48, count)
        stamp = msgs.Time.from_seconds(time.time())
        image_writer.write(msgs.Image(header=msgs.Header(stamp=stamp, frame_id="peer_camera"), height=48,
                                      width=64, encoding="rgb8", step=64 * 3, data=rgb.tobytes()))
        text_writer.write(msgs.String(data="pick up the red cube"))
        waitset.wait(duration(milliseconds=20))
        for sample in cmd_reader.take(N=16):
            if not isinstance(sample, msgs.Twist):  # a notice that the writer left carries no data
                continue
            print(json.dumps({"linear_x": sample.linear.x, "angular_z": sample.angular.z}), flush=True)
    node.disconnect()


if __name__ == "__main__":
    main()
