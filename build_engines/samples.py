"""Calibration and held-out data of a build: the source, the split by episode, and the graph feeds.

The source is `--calib-source` (an image folder with --calib-instructions, HDF5 episodes) or, when
none is given, the policy's own calibration hook (`Policy.calibration`). Samples are read and checked
(frame, proprio width) before any graph is exported, and split by episode, never by frame: whole
episodes go to calibration until it has --calib-samples, the later episodes are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from build_engines.errors import CalibrationError
from edge.inference.spec import PolicySpec

MIN_HELDOUT_SAMPLES = 8


@dataclass
class Prepared:
    """Samples as graph feeds: one uint8 array per camera input, instructions, proprio."""

    frames: dict[str, np.ndarray]  # vision input name -> uint8 [n, H, W, 3] in the camera's channel order
    instructions: list[str]
    proprio: np.ndarray  # float32 [n, P]
    episodes: list

    def __len__(self) -> int:
        return len(self.instructions)

    def vision_feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: frames[start:stop] for name, frames in self.frames.items()}


def calibration_source(kind: str | None, instructions: Path | None, count: int, policy):
    from calibration.sources import Hdf5EpisodeSource, ImageFolderSource

    spec = policy.spec
    if kind is None:
        if policy.calibration is None:
            raise CalibrationError("the policy has no default calibration data: pass --calib-source (a folder "
                                   "of images with --calib-instructions, or HDF5 episodes)")
        return policy.calibration(count)
    if kind == "reference-world":  # the name of the old built-in source, still in older instructions
        raise CalibrationError("--calib-source reference-world is gone: a policy brings its own calibration data "
                               "(the reference policy's is the reference world), so omit --calib-source")
    path = Path(kind)
    if not path.exists():
        raise CalibrationError(f"--calib-source {kind}: no such file or folder (give a folder of images with "
                               "--calib-instructions, or an HDF5 file/folder of episodes; without the option "
                               "the policy's own calibration data is used)")
    if path.is_dir() and not any(path.glob("*.h5")) and not any(path.glob("*.hdf5")):
        if instructions is None:
            if spec.language is not None:
                raise CalibrationError(f"--calib-source {path} is an image folder: pass --calib-instructions "
                                       "FILE (one instruction per line)")
            raise CalibrationError(f"--calib-source {path} is an image folder: pass --calib-instructions FILE "
                                   "(a policy without language ignores the text, but each image needs a label)")
        return ImageFolderSource(path, instructions, proprio_dim=spec.proprio.dim)
    return Hdf5EpisodeSource(path)


def split_by_episode(samples: list, calib_wanted: int, min_calib: int, min_heldout: int) -> tuple[list, list]:
    """Whole episodes to calibration until it has `calib_wanted` samples, the rest held out; episodes
    are moved back to held-out while calibration keeps at least `min_calib`."""
    grouped: dict = {}  # by episode, in order of first appearance (a source may interleave episodes)
    for index, sample in enumerate(samples):
        grouped.setdefault(("sample", index) if sample.episode is None else sample.episode, []).append(sample)
    episodes = list(grouped.values())
    calib: list[list] = []
    while episodes and sum(map(len, calib)) < calib_wanted:
        calib.append(episodes.pop(0))
    heldout = episodes
    while sum(map(len, heldout)) < min_heldout and len(calib) > 1 \
            and sum(map(len, calib[:-1])) >= min_calib:
        heldout.insert(0, calib.pop())
    n_calib, n_heldout = sum(map(len, calib)), sum(map(len, heldout))
    if n_calib < min_calib or n_heldout < min_heldout:
        raise CalibrationError(
            f"the calibration source gave {len(samples)} samples in {len(calib) + len(heldout)} episode(s); the "
            f"build needs at least {min_calib} calibration samples and {min_heldout} held-out samples from "
            "other episodes (split by episode, never by frame): add episodes or lower --calib-samples")
    return [s for e in calib for s in e], [s for e in heldout for s in e]


def prepare(samples: list, spec: PolicySpec) -> Prepared:
    from edge.inference.frames import resize_into

    frames = {}
    for camera in spec.cameras:
        array = np.zeros((len(samples), camera.height, camera.width, 3), np.uint8)
        for i, sample in enumerate(samples):
            resize_into(sample.camera_frame(camera.name), array[i])
        if camera.channel_order == "rgb":  # sources deliver BGR, as OpenCV cameras do
            array = np.ascontiguousarray(array[..., ::-1])
        frames[spec.camera_input(camera)] = array
    width = spec.proprio.dim
    rows = []
    for i, sample in enumerate(samples):
        proprio = np.asarray(sample.proprio, np.float32)
        if proprio.shape != (width,):
            raise CalibrationError(f"calibration sample {i} has proprio of shape {proprio.shape}; the policy's "
                                   f"spec.proprio names {width} values ({list(spec.proprio.names)})")
        rows.append(proprio)
    proprio = np.stack(rows) if rows and width else np.zeros((len(samples), width), np.float32)
    return Prepared(frames, [s.instruction for s in samples], proprio, [s.episode for s in samples])


def concatenate(a: Prepared, b: Prepared) -> tuple[Prepared, slice]:
    """One Prepared holding `a` then `b`, and the slice of `b` in it."""
    frames = {name: np.concatenate([a.frames[name], b.frames[name]]) for name in a.frames}
    joined = Prepared(frames, a.instructions + b.instructions, np.concatenate([a.proprio, b.proprio]),
                      a.episodes + b.episodes)
    return joined, slice(len(a), len(a) + len(b))
