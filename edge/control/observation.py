"""What the loop observes each tick: the policy's shape, one frame per camera, proprio from telemetry.

`PolicyShape` is read once from the pipeline (its horizon, action and proprio widths, cameras and
whether it takes language), so the loop never special-cases a policy. `CameraInputs` holds one camera
object per spec camera, in spec order, each with its own frame buffer and capture time: a camera whose
frame is missing or older than the loop's freshness bound is named in `stale`, and any stale camera
stops the robot. `fill_proprio` fills the policy's proprio vector from a telemetry sample by the spec's
sources (`velocities[i]`, `positions[i]`; `ProprioSpec.fill`), not by assuming it is as wide as the action.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import InputError

DEFAULT_FRAME_SHAPE = (480, 640, 3)


@dataclass(frozen=True)
class PolicyShape:
    """What the loop needs to know about a policy, from its pipeline and the bundle's spec."""

    name: str
    horizon: int  # H: actions per inference (1: one action per tick)
    action_dim: int
    kinds: tuple[str, ...]  # per action channel: velocity or position
    cameras: tuple[str, ...]  # spec camera names, in the order the pipeline takes their frames
    needs_language: bool
    proprio: object  # the spec's ProprioSpec (dim, sources; fill where the spec has it)

    @property
    def proprio_dim(self) -> int:
        return int(self.proprio.dim)

    @classmethod
    def of(cls, pipeline) -> PolicyShape:
        """From the pipeline's contract attributes (edge/inference/pipeline.py) and its bundle's spec."""
        spec = pipeline.bundle.spec
        return cls(name=spec.name, horizon=int(pipeline.horizon), action_dim=int(pipeline.action_dim),
                   kinds=tuple(spec.action.kinds), cameras=tuple(c.name for c in pipeline.cameras),
                   needs_language=bool(pipeline.needs_language), proprio=spec.proprio)

    @property
    def has_positions(self) -> bool:
        return "position" in self.kinds


def fill_proprio(proprio, out: np.ndarray, velocities: Sequence[float], positions: Sequence[float]) -> bool:
    """`out` from one telemetry sample by the spec's sources (ProprioSpec.fill); False when a source's
    channel is missing (the caller treats the sample as not to be believed). A policy without proprio
    reads nothing."""
    return True if proprio.dim == 0 else bool(proprio.fill(out, velocities, positions))


class CameraInputs:
    """One camera object per spec camera, each with its frame buffer, capture time and freshness."""

    def __init__(self, cameras: Mapping[str, object], names: Sequence[str],
                 frame_shape: tuple[int, int, int] | None, warn: Callable[..., None]):
        missing = [n for n in names if n not in cameras]
        if missing:
            raise InputError(f"no camera for the policy's camera(s) {', '.join(missing)} (it takes "
                             f"{', '.join(names)}); give each one under `cameras:` in the robot config")
        self.names = tuple(names)
        self.devices = tuple(cameras[n] for n in self.names)
        self._warn = warn
        self.frames = [np.zeros(frame_shape or getattr(d, "frame_shape", None) or DEFAULT_FRAME_SHAPE, np.uint8)
                       for d in self.devices]
        self.times: list[float | None] = [None] * len(self.devices)
        self.stale: tuple[str, ...] = ()

    @classmethod
    def of(cls, camera, names: Sequence[str], frame_shape, warn) -> CameraInputs:
        """From one camera object (a one-camera policy), a sequence in spec order, or a name mapping."""
        if isinstance(camera, Mapping):
            return cls(camera, names, frame_shape, warn)
        if isinstance(camera, (list, tuple)):
            if len(camera) != len(names):
                raise InputError(f"{len(camera)} camera object(s) for a policy of {len(names)} cameras "
                                 f"({', '.join(names)})")
            return cls(dict(zip(names, camera)), names, frame_shape, warn)
        if len(names) != 1:
            raise InputError(f"one camera object for a policy of {len(names)} cameras ({', '.join(names)}); "
                             "give one per camera under `cameras:` in the robot config")
        return cls({names[0]: camera}, names, frame_shape, warn)

    def read(self) -> None:
        """Copy each camera's newest frame into its buffer (never waits for a new one)."""
        for i, device in enumerate(self.devices):
            try:
                stamp = device.read_into(self.frames[i])
            except InputError as exc:
                # The camera came back with another resolution (reconnect, replugged device): a new buffer,
                # once; this tick has no frame from it, so it commands a controlled stop.
                self._warn("camera %s frame size changed (%s); reallocating its frame buffer", self.names[i], exc)
                shape = getattr(device, "frame_shape", None)
                if shape is not None:
                    self.frames[i] = np.zeros(shape, np.uint8)
                stamp = None
            self.times[i] = stamp[0] if stamp is not None else None

    def check_fresh(self, now: float, stale_after_s: float) -> bool:
        """True when every camera's frame is at most `stale_after_s` old; `stale` names the others."""
        self.stale = tuple(name for name, t in zip(self.names, self.times)
                           if t is None or now - t > stale_after_s)
        return not self.stale

    @property
    def oldest_s(self) -> float | None:
        """The oldest frame's capture time (None when a camera has none): the inputs' capture time."""
        if any(t is None for t in self.times):
            return None
        return min(self.times)

    def age_text(self, now: float) -> str:
        return ", ".join(f"{n}: {'never' if t is None else f'{now - t:.2f} s'}"
                         for n, t in zip(self.names, self.times) if n in self.stale)

    @property
    def policy_frames(self):
        """What the pipeline takes: the one frame of a one-camera policy, else the list in spec order."""
        return self.frames[0] if len(self.frames) == 1 else self.frames
