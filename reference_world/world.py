"""The reference task world: a top-down tabletop, four objects and a differential-drive robot.

Coordinates: x (metres) runs to the right of the image, y (metres) runs down the image, origin at
the table's top-left corner. The heading theta (radians) is counter-clockwise as seen by the
overhead camera, so the robot faces the unit vector (cos theta, -sin theta) in table coordinates.
With that convention the unicycle model w = (right - left) / wheel_base turns the robot the way a
real robot turns: a faster right wheel turns it to its left.

Everything is a pure function of the episode seed and the actions: layout, start pose, target,
lighting, instruction template and the pixel-noise sequence (drawn per step, so `render()` is
repeatable at any step).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from dataclasses import dataclass, fields
from statistics import NormalDist

import cv2
import numpy as np

from reference_world.instructions import OBJECT_NAMES, heldout_instruction, training_instruction

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECT_NAMES",
    "OOD_VARIANTS",
    "OBJECT_CATALOGUE",
    "NOVEL_COLOUR_NAME",
    "NOVEL_COLOUR_BGR",
    "ROBOT_RADIUS_M",
    "OBJECT_RADIUS_M",
    "ObjectStyle",
    "WorldConfig",
    "Observation",
    "TabletopWorld",
    "metres_to_pixels",
]

OOD_VARIANTS: tuple[str, ...] = ("black_frame", "heavy_noise", "novel_colour", "absent_object")

ROBOT_RADIUS_M = 0.05
OBJECT_RADIUS_M = 0.04  # collision radius used for spacing the layout
OBJECT_EDGE_MARGIN_M = 0.05  # gap between an object's collision circle and the table edge
OBJECT_MIN_SPACING_M = 0.15  # centre to centre, between objects and from the robot start
ROBOT_START_MARGIN_M = 0.10  # robot start centre to table edge
HEAVY_NOISE_SIGMA = 60.0
PHYSICS_SUBSTEPS = 10

# Stream tags: each random quantity has its own stream, so choosing the target explicitly does not
# move the objects and drawing more noise never changes the layout.
_LAYOUT_STREAM = 1
_TARGET_STREAM = 2
_LIGHTING_STREAM = 3
_INSTRUCTION_STREAM = 4
_NOISE_STREAM = 5

_SHIFT_BITS = 4  # cv2 fixed-point drawing: 1/16 pixel, so sub-pixel motion changes the image
_SHIFT_SCALE = 1 << _SHIFT_BITS


@dataclass(frozen=True)
class ObjectStyle:
    shape: str  # "square", "circle", "triangle" or "star"
    noun: str  # the word instructions use for the shape
    colour_bgr: tuple[int, int, int]
    size_m: float  # square: side; circle: diameter; triangle, star: circumscribed diameter


OBJECT_CATALOGUE: dict[str, ObjectStyle] = {
    "red block": ObjectStyle("square", "block", (40, 40, 205), 0.07),
    "blue ball": ObjectStyle("circle", "ball", (205, 95, 30), 0.07),
    "green triangle": ObjectStyle("triangle", "triangle", (50, 165, 45), 0.09),
    "yellow star": ObjectStyle("star", "star", (35, 205, 230), 0.095),
}
# Never used by a training scene: the novel_colour variant paints the target in it.
NOVEL_COLOUR_NAME = "purple"
NOVEL_COLOUR_BGR = (185, 45, 150)

_WOOD_BGR = np.array([118.0, 150.0, 178.0])
_GREY_BGR = np.array([150.0, 150.0, 150.0])
_ROBOT_BODY_BGR = (58, 58, 60)
_ROBOT_RIM_BGR = (120, 120, 124)
_ROBOT_WEDGE_BGR = (250, 245, 150)  # light cyan: readable against the body and every object


@dataclass(frozen=True)
class WorldConfig:
    frame_width_px: int = 320
    frame_height_px: int = 240
    table_width_m: float = 1.0
    table_height_m: float = 0.75
    dt_s: float = 0.1
    max_wheel_speed_m_s: float = 0.25
    wheel_base_m: float = 0.12
    motor_time_constant_s: float = 0.1  # first-order lag of measured wheel speed behind the target
    max_wheel_accel_m_s2: float = 2.5
    success_radius_m: float = 0.08  # robot centre to target centre
    time_limit_steps: int = 150
    pixel_noise_sigma: float = 3.0  # grey levels, per pixel and channel, per frame
    object_shadows: bool = True

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "object_shadows":
                if not isinstance(value, bool):
                    raise ValueError(f"WorldConfig.object_shadows must be a bool, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"WorldConfig.{field.name} must be a finite number, got {value!r}")
        for name in ("frame_width_px", "frame_height_px", "time_limit_steps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"WorldConfig.{name} must be an integer >= 1, got {value!r}")
        for name in (
            "table_width_m",
            "table_height_m",
            "dt_s",
            "max_wheel_speed_m_s",
            "wheel_base_m",
            "max_wheel_accel_m_s2",
            "success_radius_m",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"WorldConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.motor_time_constant_s < 0:
            raise ValueError(
                f"WorldConfig.motor_time_constant_s must be >= 0, got {self.motor_time_constant_s!r}"
            )
        if not 0 <= self.pixel_noise_sigma <= 255:
            raise ValueError(
                f"WorldConfig.pixel_noise_sigma must be in [0, 255], got {self.pixel_noise_sigma!r}"
            )
        min_side_m = 2 * (OBJECT_EDGE_MARGIN_M + OBJECT_RADIUS_M) + 2 * OBJECT_MIN_SPACING_M
        if min(self.table_width_m, self.table_height_m) < min_side_m:
            raise ValueError(
                f"WorldConfig table must be at least {min_side_m:.2f} m on each side to lay out "
                f"{len(OBJECT_NAMES)} objects, got {self.table_width_m} x {self.table_height_m} m"
            )


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class Observation:
    frame: np.ndarray  # uint8 (H, W, 3) BGR, as cv2.VideoCapture would deliver
    proprio: np.ndarray  # float32 (2,), measured wheel velocity / max wheel speed
    instruction: str
    step: int


def metres_to_pixels(config: WorldConfig, points_m) -> np.ndarray:
    """Table coordinates (..., 2) in metres -> image coordinates (..., 2) in pixels (float).

    Integer pixel coordinates are pixel centres (OpenCV's convention), hence the half-pixel shift.
    """
    points = np.asarray(points_m, dtype=np.float64)
    scale = np.array(
        [
            config.frame_width_px / config.table_width_m,
            config.frame_height_px / config.table_height_m,
        ]
    )
    return points * scale - 0.5


def _fixed_point(points_px: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points_px) * _SHIFT_SCALE).astype(np.int32)


@functools.lru_cache(maxsize=1)
def _standard_normal_quantiles() -> np.ndarray:
    """65536 equiprobable quantiles of N(0, 1), for inverse-CDF sampling from 16-bit uniforms.

    numpy's Gaussian generator costs ~3 ms per 320x240x3 frame on a small CI machine; a 16-bit
    uniform draw plus a table look-up is exact Gaussian sampling at 1/65536 probability resolution
    (tails cut at 4.2 sigma) for a fraction of that, which keeps closed-loop tests fast.
    """
    normal = NormalDist()
    quantiles = np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)
    quantiles.setflags(write=False)
    return quantiles


@functools.lru_cache(maxsize=4)
def _noise_levels(sigma: float) -> np.ndarray:
    # Frames are integers, so rounding the noise before adding it equals rounding the sum.
    levels = np.rint(_standard_normal_quantiles() * sigma).astype(np.int16)
    levels.setflags(write=False)
    return levels


def _wrap_angle(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _shape_polygon_m(style: ObjectStyle, centre_m: np.ndarray, rotation_rad: float) -> np.ndarray:
    if style.shape == "square":
        half = style.size_m / 2
        angles = rotation_rad + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, half * math.sqrt(2))
    elif style.shape == "triangle":
        angles = rotation_rad + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, style.size_m / 2)
    elif style.shape == "star":
        angles = rotation_rad + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, style.size_m / 2, style.size_m / 2 * 0.42)
    else:
        raise ValueError(f"no polygon for shape {style.shape!r}")
    return centre_m + np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)


class TabletopWorld:
    """The simulated task: reset(seed) starts an episode, step(action) advances it by dt_s."""

    # Episodes that must stop, for the build's failure-monitor check (build_engines/monitor_check.py):
    # kind -> reset() keyword arguments.
    failure_resets = {"absent_object": {"variant": "absent_object"},
                      "unknown_object": {"instruction": "go to the orange cone"}}

    def __init__(self, config: WorldConfig = WorldConfig()):
        self._config = config
        self._px_per_m = np.array(
            [config.frame_width_px / config.table_width_m, config.frame_height_px / config.table_height_m]
        )
        self._seed: int | None = None

    # ----------------------------------------------------------------------------------- episode
    def reset(
        self,
        seed: int,
        target: str | None = None,
        instruction: str | None = None,
        heldout_paraphrase: bool = False,
        variant: str | None = None,
    ) -> Observation:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        if variant is not None and variant not in OOD_VARIANTS:
            raise ValueError(f"variant must be None or one of {OOD_VARIANTS}, got {variant!r}")
        if target is not None and target not in OBJECT_NAMES:
            raise ValueError(f"target must be None or one of {OBJECT_NAMES}, got {target!r}")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise ValueError(f"instruction must be None or a non-empty string, got {instruction!r}")

        cfg = self._config
        self._seed = seed
        self._variant = variant
        self._sample_layout(np.random.default_rng([seed, _LAYOUT_STREAM]))
        if target is None:
            target = OBJECT_NAMES[
                int(np.random.default_rng([seed, _TARGET_STREAM]).integers(len(OBJECT_NAMES)))
            ]
        self._target = target
        if instruction is None:
            described = self.target_description
            rng = np.random.default_rng([seed, _INSTRUCTION_STREAM])
            pick = heldout_instruction if heldout_paraphrase else training_instruction
            instruction = pick(described, rng)
        self._instruction = instruction

        self._wheel_velocity = [0.0, 0.0]
        self._last_action = np.zeros(2, dtype=np.float32)
        self._steps = 0
        self._success = False
        self._frame_cache: tuple[int, np.ndarray] | None = None
        self._noise_sigma = HEAVY_NOISE_SIGMA if variant == "heavy_noise" else cfg.pixel_noise_sigma
        self._noise_levels = _noise_levels(float(self._noise_sigma))
        self._build_lighting(np.random.default_rng([seed, _LIGHTING_STREAM]))
        self._background = self._draw_background()
        logger.debug(
            "reset seed=%d target=%r variant=%s instruction=%r", seed, target, variant, self._instruction
        )
        return self._observation()

    def step(self, action) -> Observation:
        self._require_episode()
        if self.done:
            raise RuntimeError(
                f"episode (seed {self._seed}) is done after {self._steps} steps "
                f"(success={self._success}); call reset() to start another"
            )
        applied = self._clean_action(action)
        self._last_action = applied
        targets = applied.astype(np.float64) * self._config.max_wheel_speed_m_s
        self._integrate(float(targets[0]), float(targets[1]))
        self._steps += 1
        if self._variant != "absent_object" and self.distance_to_target_m <= self._config.success_radius_m:
            self._success = True
        return self._observation()

    def render(self) -> np.ndarray:
        """The camera frame of the current step; the same seed and step give the same bytes."""
        self._require_episode()
        if self._frame_cache is None or self._frame_cache[0] != self._steps:
            self._frame_cache = (self._steps, self._render_frame())
        return self._frame_cache[1].copy()

    def scene_background(self, include_objects: bool = True) -> np.ndarray:
        """The lit table (and objects) of this episode without robot and pixel noise."""
        self._require_episode()
        if include_objects:
            return self._background.copy()
        return self._draw_background(include_objects=False)

    # ------------------------------------------------------------------------------- properties
    @property
    def config(self) -> WorldConfig:
        return self._config

    @property
    def seed(self) -> int:
        self._require_episode()
        return self._seed  # type: ignore[return-value]

    @property
    def variant(self) -> str | None:
        self._require_episode()
        return self._variant

    @property
    def instruction(self) -> str:
        self._require_episode()
        return self._instruction

    @property
    def pose(self) -> tuple[float, float, float]:
        self._require_episode()
        return (self._x, self._y, self._theta)

    @property
    def wheel_velocity(self) -> np.ndarray:
        """Measured wheel velocities [left, right] in m/s."""
        self._require_episode()
        return np.array(self._wheel_velocity, dtype=np.float64)

    @property
    def proprio(self) -> np.ndarray:
        self._require_episode()
        normalised = np.array(self._wheel_velocity) / self._config.max_wheel_speed_m_s
        return np.clip(normalised, -1.0, 1.0).astype(np.float32)

    @property
    def last_action(self) -> np.ndarray:
        """The normalised wheel targets actually applied by the last step (after clipping)."""
        self._require_episode()
        return self._last_action.copy()

    @property
    def target_name(self) -> str:
        self._require_episode()
        return self._target

    @property
    def target_description(self) -> str:
        """How instructions name the target: the catalogue name, or e.g. "purple block"."""
        self._require_episode()
        if self._variant == "novel_colour":
            return f"{NOVEL_COLOUR_NAME} {OBJECT_CATALOGUE[self._target].noun}"
        return self._target

    @property
    def target_position(self) -> np.ndarray:
        self._require_episode()
        return self._objects[self._target].copy()

    @property
    def objects(self) -> dict[str, np.ndarray]:
        """Ground-truth centres (metres) of all four objects, drawn or not."""
        self._require_episode()
        return {name: position.copy() for name, position in self._objects.items()}

    @property
    def visible_objects(self) -> tuple[str, ...]:
        """Names of the objects drawn in the frame (absent_object leaves the target out)."""
        self._require_episode()
        if self._variant == "absent_object":
            return tuple(name for name in OBJECT_NAMES if name != self._target)
        return OBJECT_NAMES

    @property
    def distance_to_target_m(self) -> float:
        self._require_episode()
        tx, ty = self._objects[self._target]
        return math.hypot(tx - self._x, ty - self._y)

    @property
    def success(self) -> bool:
        self._require_episode()
        return self._success

    @property
    def done(self) -> bool:
        self._require_episode()
        return self._success or self._steps >= self._config.time_limit_steps

    @property
    def steps(self) -> int:
        self._require_episode()
        return self._steps

    # -------------------------------------------------------------------------------- internals
    def _require_episode(self) -> None:
        if self._seed is None:
            raise RuntimeError("no episode yet: call reset(seed) first")

    def _observation(self) -> Observation:
        return Observation(
            frame=self.render(), proprio=self.proprio, instruction=self._instruction, step=self._steps
        )

    @staticmethod
    def _clean_action(action) -> np.ndarray:
        try:
            values = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"action must be numeric with shape (2,) [left, right], got {action!r}") from exc
        if values.shape != (2,):
            raise ValueError(f"action must have shape (2,) [left, right], got shape {values.shape}")
        # A NaN command means "no information": treat it as stop rather than let it poison the state.
        values = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(values, -1.0, 1.0).astype(np.float32)

    def _sample_layout(self, rng: np.random.Generator) -> None:
        cfg = self._config
        w, h = cfg.table_width_m, cfg.table_height_m
        object_margin = OBJECT_EDGE_MARGIN_M + OBJECT_RADIUS_M
        for _attempt in range(100):
            x = rng.uniform(ROBOT_START_MARGIN_M, w - ROBOT_START_MARGIN_M)
            y = rng.uniform(ROBOT_START_MARGIN_M, h - ROBOT_START_MARGIN_M)
            theta = rng.uniform(-math.pi, math.pi)
            placed = [np.array([x, y])]
            objects: dict[str, np.ndarray] = {}
            for name in OBJECT_NAMES:
                for _try in range(200):
                    candidate = np.array(
                        [
                            rng.uniform(object_margin, w - object_margin),
                            rng.uniform(object_margin, h - object_margin),
                        ]
                    )
                    if all(np.hypot(*(candidate - other)) >= OBJECT_MIN_SPACING_M for other in placed):
                        objects[name] = candidate
                        placed.append(candidate)
                        break
                else:
                    break  # this start pose left no room; draw a new layout
            if len(objects) == len(OBJECT_NAMES):
                self._x, self._y, self._theta = float(x), float(y), float(theta)
                self._objects = objects
                self._rotations = {name: float(rng.uniform(0, 2 * math.pi)) for name in OBJECT_NAMES}
                return
        raise RuntimeError(f"could not lay out {len(OBJECT_NAMES)} objects on a {w} x {h} m table")

    def _integrate(self, target_left: float, target_right: float) -> None:
        cfg = self._config
        h = cfg.dt_s / PHYSICS_SUBSTEPS
        tau = cfg.motor_time_constant_s
        alpha = 1.0 - math.exp(-h / tau) if tau > 0 else 1.0
        max_dv = cfg.max_wheel_accel_m_s2 * h
        lo_x, hi_x = ROBOT_RADIUS_M, cfg.table_width_m - ROBOT_RADIUS_M
        lo_y, hi_y = ROBOT_RADIUS_M, cfg.table_height_m - ROBOT_RADIUS_M
        left, right = self._wheel_velocity
        x, y, theta = self._x, self._y, self._theta
        for _ in range(PHYSICS_SUBSTEPS):
            left += min(max((target_left - left) * alpha, -max_dv), max_dv)
            right += min(max((target_right - right) * alpha, -max_dv), max_dv)
            linear = (left + right) / 2
            angular = (right - left) / cfg.wheel_base_m
            heading_mid = theta + angular * h / 2  # midpoint rule: accurate on arcs
            x = min(max(x + linear * math.cos(heading_mid) * h, lo_x), hi_x)
            y = min(max(y - linear * math.sin(heading_mid) * h, lo_y), hi_y)
            theta += angular * h
        self._wheel_velocity = [left, right]
        self._x, self._y, self._theta = x, y, _wrap_angle(theta)

    # -------------------------------------------------------------------------------- rendering
    def _build_lighting(self, rng: np.random.Generator) -> None:
        gain = rng.uniform(0.8, 1.2)
        contrast = rng.uniform(0.85, 1.15)
        warmth = rng.uniform(-0.06, 0.06)  # colour temperature: warm raises red, lowers blue
        channel_gain = np.array([1.0 - warmth, 1.0, 1.0 + warmth]) * gain
        levels = np.arange(256, dtype=np.float64)[:, None]
        lit = ((levels - 128.0) * contrast + 128.0) * channel_gain[None, :]
        self._lighting_lut = np.clip(np.rint(lit), 0, 255).astype(np.uint8).reshape(256, 1, 3)
        self._table_mix = rng.uniform(0.0, 0.7)  # 0: wooden, 1: grey
        self._grain_phase = rng.uniform(0, 2 * math.pi, size=3)

    def _lit(self, colour_bgr) -> tuple[int, int, int]:
        lut = self._lighting_lut
        return tuple(int(lut[int(c), 0, i]) for i, c in enumerate(colour_bgr))  # type: ignore[return-value]

    def _draw_background(self, include_objects: bool = True) -> np.ndarray:
        cfg = self._config
        height, width = cfg.frame_height_px, cfg.frame_width_px
        table = ((1.0 - self._table_mix) * _WOOD_BGR + self._table_mix * _GREY_BGR).astype(np.float32)
        ys = (np.arange(height, dtype=np.float32) / np.float32(self._px_per_m[1]))[:, None]
        xs = (np.arange(width, dtype=np.float32) / np.float32(self._px_per_m[0]))[None, :]
        p0, p1, p2 = (np.float32(p) for p in self._grain_phase)
        two_pi = np.float32(2 * np.pi)
        # Wood grain: wavy bands along x, faint enough not to look like an object. The second,
        # finer term is a separable product (sin(a + b) expanded) to keep reset() cheap.
        wave = np.float32(0.6) * np.sin(two_pi * np.float32(1.7) * xs + p0)
        grain = np.float32(5.0) * np.sin(two_pi * (np.float32(28.0) * ys + wave) + p1)
        fine_y = two_pi * np.float32(71.0) * ys + p2
        fine_x = two_pi * np.float32(3.0) * xs
        grain += np.float32(2.5) * (np.sin(fine_y) * np.cos(fine_x) + np.cos(fine_y) * np.sin(fine_x))
        grain *= np.float32(1.0 - 0.5 * self._table_mix)
        image = grain[:, :, None] + table[None, None, :]

        # Table edge: a darker band with a lighter bevel line inside, so the border reads clearly.
        band = max(2, round(0.012 * float(self._px_per_m.min())))
        bevel = np.float32(1.15)
        image[band, band:-band] *= bevel
        image[-band - 1, band:-band] *= bevel
        image[band + 1 : -band - 1, band] *= bevel
        image[band + 1 : -band - 1, -band - 1] *= bevel
        dark = np.float32(0.62)
        image[:band] *= dark
        image[-band:] *= dark
        image[band:-band, :band] *= dark
        image[band:-band, -band:] *= dark
        image += np.float32(0.5)  # round to nearest when truncating below
        np.clip(image, 0.0, 255.0, out=image)
        image = image.astype(np.uint8)

        drawn = self.visible_objects if include_objects else ()
        if drawn and cfg.object_shadows:
            mask = np.zeros((height, width), dtype=np.uint8)
            offset_m = np.array([0.006, 0.009])  # light from the top-left
            for name in drawn:
                self._draw_object(mask, name, 255, offset_m=offset_m)
            soft = cv2.GaussianBlur(mask, (0, 0), sigmaX=max(1.0, 0.008 * self._px_per_m.mean()))
            # shade = 1 - 0.38 * soft / 255, as a 256-entry table applied to every channel at once.
            shade = (1.0 - 0.38 * np.arange(256, dtype=np.float32) / 255.0)[soft]
            image = cv2.multiply(image, cv2.merge([shade, shade, shade]), dtype=cv2.CV_8U)
        for name in drawn:
            colour = OBJECT_CATALOGUE[name].colour_bgr
            if self._variant == "novel_colour" and name == self._target:
                colour = NOVEL_COLOUR_BGR
            self._draw_object(image, name, colour)
        # Lighting is applied to the whole scene once; the robot's colours go through the same LUT.
        return cv2.LUT(image, self._lighting_lut)

    def _draw_object(self, image: np.ndarray, name: str, colour, offset_m=(0.0, 0.0)) -> None:
        style = OBJECT_CATALOGUE[name]
        centre = self._objects[name] + np.asarray(offset_m)
        if style.shape == "circle":
            radius_m = style.size_m / 2
            centre_fp = _fixed_point(metres_to_pixels(self._config, centre))
            axes_fp = _fixed_point(self._px_per_m * radius_m)
            cv2.ellipse(
                image,
                (int(centre_fp[0]), int(centre_fp[1])),
                (int(axes_fp[0]), int(axes_fp[1])),
                0,
                0,
                360,
                colour,
                -1,
                cv2.LINE_AA,
                _SHIFT_BITS,
            )
            return
        polygon = _shape_polygon_m(style, centre, self._rotations[name])
        points = _fixed_point(metres_to_pixels(self._config, polygon))
        cv2.fillPoly(image, [points.reshape(-1, 1, 2)], colour, cv2.LINE_AA, _SHIFT_BITS)

    def _draw_robot(self, image: np.ndarray) -> None:
        centre_m = np.array([self._x, self._y])
        centre_fp = _fixed_point(metres_to_pixels(self._config, centre_m))
        centre = (int(centre_fp[0]), int(centre_fp[1]))
        axes_fp = _fixed_point(self._px_per_m * ROBOT_RADIUS_M)
        axes = (int(axes_fp[0]), int(axes_fp[1]))
        cv2.ellipse(image, centre, axes, 0, 0, 360, self._lit(_ROBOT_BODY_BGR), -1, cv2.LINE_AA, _SHIFT_BITS)
        cv2.ellipse(image, centre, axes, 0, 0, 360, self._lit(_ROBOT_RIM_BGR), 1, cv2.LINE_AA, _SHIFT_BITS)
        forward = np.array([math.cos(self._theta), -math.sin(self._theta)])
        side = np.array([-forward[1], forward[0]])
        r = ROBOT_RADIUS_M
        wedge_m = np.stack(
            [
                centre_m + forward * 0.92 * r,
                centre_m - forward * 0.15 * r + side * 0.55 * r,
                centre_m - forward * 0.15 * r - side * 0.55 * r,
            ]
        )
        wedge = _fixed_point(metres_to_pixels(self._config, wedge_m))
        cv2.fillPoly(image, [wedge.reshape(-1, 1, 2)], self._lit(_ROBOT_WEDGE_BGR), cv2.LINE_AA, _SHIFT_BITS)

    def _render_frame(self) -> np.ndarray:
        if self._variant == "black_frame":
            cfg = self._config
            return np.zeros((cfg.frame_height_px, cfg.frame_width_px, 3), dtype=np.uint8)
        frame = self._background.copy()
        self._draw_robot(frame)
        if self._noise_sigma <= 0:
            return frame
        rng = np.random.default_rng([self._seed, _NOISE_STREAM, self._steps])
        uniform = np.frombuffer(rng.bytes(2 * frame.size), dtype="<u2")
        noisy = np.take(self._noise_levels, uniform).reshape(frame.shape)
        noisy += frame
        np.clip(noisy, 0, 255, out=noisy)
        return noisy.astype(np.uint8)
