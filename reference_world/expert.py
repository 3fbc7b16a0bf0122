"""Scripted expert for the reference task: drives to the target from ground truth.

It is the demonstrator a policy imitates, so it is smooth: the forward command fades continuously
to zero as the heading error grows (the robot turns in place beyond ~60 degrees), the turn command
is proportional to the heading error and saturates, and speed falls off near the goal. No switching,
no bang-bang.
"""

from __future__ import annotations

import math

import numpy as np

from reference_world.world import TabletopWorld

TURN_RATE_GAIN_PER_S = 3.0  # desired turn rate (rad/s) per radian of heading error
MAX_TURN_COMMAND = 0.5  # normalised; caps the turn rate at ~2 rad/s so commands change gradually
TURN_IN_PLACE_ERROR_RAD = math.radians(60)  # beyond this heading error the forward command is 0
SLOWDOWN_RADIUS_M = 0.25  # within this distance the forward command shrinks with the distance
MIN_FORWARD_COMMAND = 0.3  # keeps the final approach from stalling short of the success radius


def expert_action(world: TabletopWorld) -> np.ndarray:
    """Normalised wheel targets [left, right] in [-1, 1] (float32) that steer toward the target."""
    cfg = world.config
    x, y, theta = world.pose
    target_x, target_y = world.target_position
    dx, dy = target_x - x, target_y - y
    distance = math.hypot(dx, dy)
    # theta is counter-clockwise on the image while y points down, hence -dy.
    bearing = math.atan2(-dy, dx)
    heading_error = (bearing - theta + math.pi) % (2 * math.pi) - math.pi

    cos_limit = math.cos(TURN_IN_PLACE_ERROR_RAD)
    alignment = min(max((math.cos(heading_error) - cos_limit) / (1.0 - cos_limit), 0.0), 1.0)
    speed = min(max(distance / SLOWDOWN_RADIUS_M, MIN_FORWARD_COMMAND), 1.0)
    forward = speed * alignment

    # Turn rate w = (right - left) * max_speed / wheel_base, so this gain gives w = K * error.
    turn_per_rad = TURN_RATE_GAIN_PER_S * cfg.wheel_base_m / (2.0 * cfg.max_wheel_speed_m_s)
    turn = min(max(turn_per_rad * heading_error, -MAX_TURN_COMMAND), MAX_TURN_COMMAND)

    left, right = forward - turn, forward + turn
    # Scale both wheels together so saturation keeps the turn/forward ratio (the path's curvature).
    scale = max(1.0, abs(left), abs(right))
    return np.array([left / scale, right / scale], dtype=np.float32)
