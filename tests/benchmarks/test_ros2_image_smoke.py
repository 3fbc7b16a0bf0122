"""The ROS 2 image benchmark runs end to end on a tiny frame and reports every row (no timing asserted)."""

import random

import pytest

pytest.importorskip("cyclonedds", reason="the ros2 extra (cyclonedds) is not installed")

from benchmarks import ros2_image  # noqa: E402


def test_every_row_is_measured_on_a_tiny_frame():
    rows = ros2_image.run(width=8, height=6, iterations=5, domain=random.randint(1, 200))
    names = [row[0] for row in rows]
    assert names == ["encode fast", "decode fast", "encode declared", "decode declared", "to BGR",
                     "publish -> seen"]
    assert all(n > 0 and 0 <= median <= p90 for _, median, p90, n in rows)
