"""What a robot's camera does to a frame before the policy sees it: JPEG compression.

USB cameras streaming MJPG, IP cameras and the simulator's camera (an MJPEG stream at quality 90) deliver
JPEG-compressed frames. The failure monitor measures distance in the vision graph's feature space, and
there compression is not small: on the reference policy JPEG at quality 90 moved in-distribution frames
from a Mahalanobis distance of 7-8 to 20-29, past a threshold calibrated on the simulator's raw frames
(22), and `make demo` fell back on nearly every tick. So the build calibrates on frames as cameras
deliver them:

- the feature model is fitted on every calibration sample raw and at each quality (`augment`), so the
  directions compression moves features along are part of what in-distribution means;
- the closed-loop gate and the monitor check pass each episode's frames through one codec setting, raw or
  one of the qualities in turn by seed (`episode_quality`), so thresholds, success and the check's
  shares are measured on what a camera delivers.

`qualities` empty (``--camera-jpeg none``) keeps every frame raw: for a camera that delivers raw frames
(a Jetson's CSI camera through Argus, GigE Vision) and data recorded raw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

DEFAULT_QUALITIES = (95, 85, 75)  # around the simulator's 90 and what UVC cameras' MJPG streams use


def check_qualities(qualities: Sequence[int]) -> tuple[int, ...]:
    """The qualities as a tuple, each an integer in 1..100 (ValueError naming the bad one)."""
    checked = []
    for quality in qualities:
        if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
            raise ValueError(f"a camera JPEG quality must be an integer 1..100, got {quality!r}")
        checked.append(int(quality))
    return tuple(checked)


def jpeg(frame: np.ndarray, quality: int | None) -> np.ndarray:
    """`frame` (uint8 [H, W, 3] BGR or [H, W] / [H, W, 1] grey) encoded as JPEG at `quality` and decoded, as a camera delivers it;
    `frame` itself for None."""
    if quality is None:
        return frame
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(frame), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode a frame of shape {list(frame.shape)}")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)  # 3 channels stay BGR, 1 stays grey
    if decoded is None or decoded.size != frame.size:
        raise ValueError(f"a JPEG round trip changed a frame of shape {list(frame.shape)}")
    return decoded.reshape(frame.shape)


def augment(frames: Mapping[str, np.ndarray], quality: int) -> dict[str, np.ndarray]:
    """Each camera's frames [n, H, W, 3] through the codec at `quality` (a new array per camera)."""
    return {name: np.stack([jpeg(frame, quality) for frame in batch]) if len(batch) else batch.copy()
            for name, batch in frames.items()}


def episode_quality(seed: int, qualities: Sequence[int]) -> int | None:
    """The codec setting of the episode with this seed: raw, then each quality, in turn."""
    settings = (None, *qualities)
    return settings[seed % len(settings)]
