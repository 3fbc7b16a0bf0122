"""The transports part of the latency benchmark runs end to end and reports every row (no timing asserted)."""

import random

import pytest

from benchmarks import transport


def test_dds_frames_and_commands_reach_the_other_process():
    pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")
    result = transport.measure_dds(12, domain=random.randint(1, 200))
    assert result["frame"]["n"] == 12 and result["frames_published"] >= 12
    # 12 commands and the zero the sink leaves on disconnect. Reliable once matched: all but (at most) the
    # first, which may precede the match, arrive.
    assert result["commands_sent"] == 13 and result["commands_received"] >= 12
    assert 0 <= result["command"]["p50"] <= result["command"]["max"]


def test_the_serial_path_rows_and_the_markdown():
    report = {"frame_shape": [240, 320], "iterations": 8,
              "serial": {"frame": transport.summarize(transport._mjpeg_frames(8)),
                         "command": transport.summarize(transport._serial_commands(8))},
              "dds": {"unavailable": "not measured in this test"}}
    assert report["serial"]["frame"]["n"] == 8 and report["serial"]["command"]["n"] == 8
    lines = transport.format_transports(report)
    assert any(line.startswith("| serial command: SetTargets written -> decoded") for line in lines)
    assert "| DDS | - | not measured in this test | | | |" in lines
