"""Frame preparation shared by the runtime and the offline build: resize into a caller-owned buffer.

The vision graph owns every other preprocessing step (channel order, scaling, layout), so the
runtime's only work on a frame is this resize, into a buffer allocated once at start-up.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge.errors import InputError


def check_frame(frame: object) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise InputError(f"camera frame must be uint8 [H, W, 3] BGR, got shape {shape} dtype {dtype}")
    return frame


def resize_into(frame: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Resize a BGR uint8 frame into `out` ([H, W, 3] uint8, e.g. a view of a pinned buffer)."""
    check_frame(frame)
    height, width = out.shape[:2]
    if frame.shape[0] == height and frame.shape[1] == width:
        np.copyto(out, frame)
        return out
    # INTER_AREA is the right filter for shrinking and costs no allocation with dst given.
    cv2.resize(frame, (width, height), dst=out, interpolation=cv2.INTER_AREA)
    return out
