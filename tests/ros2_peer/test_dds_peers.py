"""The bridge against independent DDS peers built from their own IDL of the ROS 2 types (ros2_types.idl): a C
program on Cyclone DDS's C toolchain (idlc, libddsc) and a C++ one on Fast DDS (fastddsgen, libfastrtps),
ROS 2's default middleware. It publishes a fragmented Image and a String and
subscribes to the commands and to an Image the bridge's encoder writes: matching types, names, QoS and
bytes across implementations is what a ROS 2 node needs.

CI installs the toolchains (`.ci/run`, from Debian); elsewhere a peer's test skips, naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")

from edge.io.ros2 import msgs  # noqa: E402
from edge.io.ros2.dds import QosProfile, Ros2Config, Ros2Node, cyclone_config_xml  # noqa: E402
from edge.io.ros2.outputs import Ros2CommandConfig, Ros2CommandSink  # noqa: E402
from edge.io.ros2.sources import Ros2Camera, Ros2CameraConfig, Ros2InstructionSource, Ros2TopicConfig  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

HERE = Path(__file__).parent
WIDTH, HEIGHT = 320, 240  # 230 kB per frame: every sample is fragmented (> 64 kB)


def _missing(tools: tuple[str, ...], headers: tuple[str, ...], packages: str) -> str | None:
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install {packages} (see .ci/run)"
    for header in headers:
        if not Path("/usr/include", header).exists():
            return f"{header} not found: apt-get install {packages} (see .ci/run)"
    return None


def build_cyclone_c(build: Path) -> Path:
    # -t: no XTypes type information, so topics match by type name, as with ROS 2's middlewares
    # (docs/ros2.md, "Checked against an independent DDS implementation").
    subprocess.run(["idlc", "-t", "-o", str(build), str(HERE / "ros2_types.idl")], check=True)
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", f"-I{build}", "-o", str(build / "peer"), str(HERE / "peer.c"),
                    str(build / "ros2_types.c"), "-lddsc"], check=True)
    return build / "peer"


def build_fast_dds(build: Path) -> Path:
    subprocess.run(["fastddsgen", "-replace", "-d", str(build), str(HERE / "ros2_types.idl")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["c++", "-O1", "-std=c++17", "-Wall", f"-I{build}", "-o", str(build / "fast_peer"),
                    str(HERE / "fast_peer.cpp"), str(build / "ros2_types.cxx"),
                    str(build / "ros2_typesPubSubTypes.cxx"), "-lfastrtps", "-lfastcdr"], check=True)
    return build / "fast_peer"


PEERS = {
    "cyclone-c": (("idlc", "cc"), ("dds/dds.h",), "cyclonedds-dev cyclonedds-tools", build_cyclone_c),
    "fast-dds": (("fastddsgen", "c++"), ("fastdds/dds/domain/DomainParticipant.hpp",),
                 "fastddsgen libfastrtps-dev g++", build_fast_dds),
}


@pytest.fixture(scope="module", params=sorted(PEERS))
def peer_program(request, tmp_path_factory) -> Path:
    tools, headers, packages, build = PEERS[request.param]
    reason = _missing(tools, headers, packages)
    if reason:
        pytest.skip(reason)
    return build(tmp_path_factory.mktemp(request.param))


def test_peer_image_and_string_reach_the_bridge_and_the_bridge_reaches_the_peer(peer_program):
    config = Ros2Config(domain_id=int.from_bytes(os.urandom(1), "little") % 200 + 1)
    env = {**os.environ, "CYCLONEDDS_URI": cyclone_config_xml(config)}
    peer = subprocess.Popen([str(peer_program), str(config.domain_id), str(WIDTH), str(HEIGHT)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line.strip()) for line in peer.stdout], daemon=True).start()
    try:
        assert wait_until(lambda: "ready" in lines), f"{peer_program.name} did not start"
        with Ros2Node(config) as node:
            camera = Ros2Camera(node, Ros2CameraConfig(open_timeout_s=10))
            instructions = Ros2InstructionSource(node, Ros2TopicConfig("/instruction"))
            sink = Ros2CommandSink(node, Ros2CommandConfig(max_abs=(1.0, 3.0)))
            with camera, instructions, sink:
                assert camera.frame_shape == (HEIGHT, WIDTH, 3)
                frame, _, count = camera.read_latest()
                # rgb8 from the peer, BGR here: red (channel 2) = column, green = row.
                np.testing.assert_array_equal(frame[..., 2], np.tile(np.arange(WIDTH) % 256, (HEIGHT, 1)))
                np.testing.assert_array_equal(frame[..., 1], np.tile((np.arange(HEIGHT) % 256)[:, None], (1, WIDTH)))
                assert np.all(frame[..., 0] == frame[0, 0, 0])
                assert wait_until(lambda: instructions.latest()[0] == "pick up the red cube")
                sent = sink.send_velocity([0.25, -1.5])
                assert sent.delivered
                assert wait_until(lambda: "cmd 0.25 -1.5" in lines), lines[-5:]
                assert wait_until(lambda: camera.frame_count > count)
                # The bridge's fast Image encoding, decoded by the C peer's generated code.
                echo = node.writer("/echo/image_raw", msgs.Image, QosProfile.SENSOR)
                pixels = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
                expected = (f"image {WIDTH} {HEIGHT} bgr8 {WIDTH * 3} bridge_camera {pixels.size} "
                            f"{int(pixels.sum(dtype=np.uint64)) % 2**32}")

                def echoed() -> bool:
                    echo.write(msgs.Image(header=msgs.Header(frame_id="bridge_camera"), height=HEIGHT,
                                          width=WIDTH, encoding="bgr8", step=WIDTH * 3, data=pixels.tobytes()))
                    return expected in lines

                assert wait_until(echoed, poll_s=0.05), [line for line in lines if line.startswith("image")]
    finally:
        peer.stdin.close()
        peer.wait(timeout=10)
    assert peer.returncode == 0
