"""Running a policy for one episode of the reference task, and drawing where it went."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from reference_world.world import Observation, TabletopWorld, WorldConfig, metres_to_pixels

logger = logging.getLogger(__name__)

Policy = Callable[[Observation], object]
StepHook = Callable[[Observation, np.ndarray], None]

_PLOT_SCALE = 2  # the PNG is drawn at twice the frame size so thin lines stay legible
_SHIFT_BITS = 4
# Distinct BGR colours that stand out on the table; reused cyclically for many trajectories.
_PALETTE = (
    (255, 80, 0),
    (0, 140, 255),
    (200, 0, 200),
    (0, 200, 0),
    (255, 255, 0),
    (0, 0, 0),
    (0, 60, 160),
    (255, 255, 255),
)
_FALLBACK_BGR = (40, 40, 230)  # poses in fallback and the stop sign where the robot came to rest in it


@dataclass
class EpisodeResult:
    seed: int
    instruction: str
    target: str
    variant: str | None
    success: bool
    steps: int
    final_distance_m: float
    trajectory: np.ndarray  # (steps + 1, 3) poses x_m, y_m, theta_rad, the start pose first
    # Where the runtime was known to be in fallback (one flag per trajectory pose), and how the episode
    # ended in words ("stopped in fallback (spread) 2.9 s after the instruction"); drawn when given.
    fallback: np.ndarray | None = None
    outcome: str | None = None
    stopped_in_fallback: bool = False  # the episode ended with the robot at rest in fallback


def run_episode(
    world: TabletopWorld,
    policy: Policy,
    seed: int,
    *,
    target: str | None = None,
    instruction: str | None = None,
    heldout_paraphrase: bool = False,
    variant: str | None = None,
    on_step: StepHook | None = None,
) -> EpisodeResult:
    """Reset `world` with `seed`, act with `policy` until the episode is done.

    `on_step(obs, action)` is called after each step with the observation the policy saw and the
    action the world actually applied (clipped, NaN replaced by 0), i.e. a clean training pair.
    """
    obs = world.reset(
        seed, target=target, instruction=instruction, heldout_paraphrase=heldout_paraphrase, variant=variant
    )
    poses = [world.pose]
    while not world.done:
        action = policy(obs)
        next_obs = world.step(action)
        if on_step is not None:
            on_step(obs, world.last_action)
        poses.append(world.pose)
        obs = next_obs
    result = EpisodeResult(
        seed=world.seed,
        instruction=world.instruction,
        target=world.target_name,
        variant=variant,
        success=world.success,
        steps=world.steps,
        final_distance_m=world.distance_to_target_m,
        trajectory=np.array(poses, dtype=np.float64).reshape(-1, 3),
    )
    logger.debug(
        "episode seed=%d target=%r success=%s steps=%d final_distance=%.3f m",
        seed,
        result.target,
        result.success,
        result.steps,
        result.final_distance_m,
    )
    return result


def draw_trajectories(
    world_or_config: TabletopWorld | WorldConfig,
    results: Sequence[EpisodeResult],
    path: str | os.PathLike,
) -> None:
    """Write a PNG: the table, each trajectory (start dot, path, end mark) and its target ring.

    When every result comes from the same scene (seed, target, variant) that scene's objects form
    the background; otherwise layouts differ per episode, so the background is the bare table and
    each target is marked by a ring in its trajectory's colour.
    """
    config = world_or_config.config if isinstance(world_or_config, TabletopWorld) else world_or_config
    if not isinstance(config, WorldConfig):
        raise TypeError(
            f"world_or_config must be a TabletopWorld or WorldConfig, got {type(world_or_config)}"
        )
    # A scratch world recreates each episode's layout from its seed without disturbing the caller's.
    scratch = TabletopWorld(config)
    scenes = {(r.seed, r.target, r.variant) for r in results}
    if len(scenes) == 1:
        seed, target, variant = next(iter(scenes))
        scratch.reset(seed, target=target, variant=variant)
        background = scratch.scene_background()
    else:
        scratch.reset(results[0].seed if results else 0)
        background = scratch.scene_background(include_objects=False)
    canvas = cv2.resize(
        background,
        (config.frame_width_px * _PLOT_SCALE, config.frame_height_px * _PLOT_SCALE),
        interpolation=cv2.INTER_LINEAR,
    )

    def to_canvas(points_m: np.ndarray) -> np.ndarray:
        pixels = (metres_to_pixels(config, points_m) + 0.5) * _PLOT_SCALE - 0.5
        return np.round(pixels * (1 << _SHIFT_BITS)).astype(np.int32)

    successes = 0
    for index, result in enumerate(results):
        colour = _PALETTE[index % len(_PALETTE)]
        scratch.reset(result.seed, target=result.target, variant=result.variant)
        target_px = to_canvas(scratch.target_position)
        ring_radius = round(
            config.success_radius_m * config.frame_width_px / config.table_width_m * _PLOT_SCALE
        )
        cv2.circle(
            canvas,
            tuple(int(v) for v in target_px),
            ring_radius << _SHIFT_BITS,
            colour,
            2,
            cv2.LINE_AA,
            _SHIFT_BITS,
        )
        points = to_canvas(np.asarray(result.trajectory, dtype=np.float64)[:, :2])
        if len(points) > 1:
            cv2.polylines(canvas, [points.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA, _SHIFT_BITS)
        start = tuple(int(v) for v in points[0])
        end = tuple(int(v) for v in points[-1])
        cv2.circle(canvas, start, 4 << _SHIFT_BITS, colour, -1, cv2.LINE_AA, _SHIFT_BITS)
        if result.fallback is not None:
            flags = np.asarray(result.fallback, dtype=bool)[: len(points)]
            for point in points[flags]:  # each pose seen in fallback: a small dot in the fallback colour
                cv2.circle(canvas, tuple(int(v) for v in point), 3 << _SHIFT_BITS, _FALLBACK_BGR, -1, cv2.LINE_AA,
                           _SHIFT_BITS)
        if result.stopped_in_fallback:
            # A stop sign where the robot came to rest in fallback.
            cv2.circle(canvas, end, 9 << _SHIFT_BITS, _FALLBACK_BGR, -1, cv2.LINE_AA, _SHIFT_BITS)
            cx, cy = end[0] >> _SHIFT_BITS, end[1] >> _SHIFT_BITS
            cv2.line(canvas, (cx - 5, cy), (cx + 5, cy), (255, 255, 255), 2, cv2.LINE_AA)
        elif result.success:
            successes += 1
            cv2.circle(canvas, end, 6 << _SHIFT_BITS, colour, 2, cv2.LINE_AA, _SHIFT_BITS)
        else:
            cv2.drawMarker(
                canvas, (end[0] >> _SHIFT_BITS, end[1] >> _SHIFT_BITS), colour, cv2.MARKER_TILTED_CROSS, 14, 2
            )
    cv2.putText(
        canvas,
        f"{successes}/{len(results)} reached",
        (10, 22),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.6,
        (255, 255, 255),
        2,
        cv2.LINE_AA,
    )
    captions = [r.outcome for r in results if r.outcome]
    if any(r.fallback is not None and np.any(r.fallback) for r in results):
        captions.append("dots: in fallback")
    height = canvas.shape[0]
    for row, text in enumerate(reversed(captions)):  # bottom-up on dark bands, the last result's outcome lowest
        (width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        origin = (10, height - 10 - 20 * row)
        cv2.rectangle(canvas, (origin[0] - 4, origin[1] - text_height - 4), (origin[0] + width + 4, origin[1] + baseline),
                      (0, 0, 0), -1)
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(
            f"could not write trajectory plot to {path} (is the suffix .png and the folder writable?)"
        )
    logger.info("wrote %d trajectories to %s", len(results), path)
