"""Calibration and held-out data of a build: the source, the split by episode, and the graph feeds.

The source is `--calib-source` or, when none is given, the policy's own calibration hook
(`Policy.calibration`). `--calib-source` names one of:

- a LeRobot v3 dataset directory (it has meta/info.json; calibration/lerobot.py),
- HDF5 episodes, a file or a folder of .h5/.hdf5 files (the layout of calibration/sources.py),
- a folder of images, with --calib-instructions (no episodes, no recorded actions).

Recorded episodes (the first two) are split by episode with `split_episodes`: `--heldout-fraction` of
them, at least one, are held out; calibration takes up to --calib-samples evenly spaced steps of the
other episodes, the tensor gate up to --heldout-samples steps of the held-out ones, and the open-loop
replay gate (build_engines/episode_replay.py) replays every step of the held-out episodes. Other
sources are read as samples and split by `split_by_episode`: whole episodes go to calibration until
it has --calib-samples, the later episodes are held out. Either way no episode gives frames to both
sides, and samples are read and checked (frame, proprio width) before any graph is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.errors import CalibrationError
from edge.errors import EdgeError
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


@dataclass
class Gathered:
    """What the build calibrates and gates on. `dataset` and `split` only for recorded episodes."""

    calibration: list  # CalibrationSample
    heldout: list  # CalibrationSample, from other episodes than calibration's
    source: dict[str, Any]  # the source's description, for the manifest
    dataset: Any = None  # calibration.episodes.EpisodeDataset: the held-out episodes replay through it
    split: Any = None  # calibration.episodes.EpisodeSplit
    episode_ids: dict[str, list[str]] = field(default_factory=dict)  # "calibration"/"heldout" -> episodes


@dataclass(frozen=True)
class DatasetOptions:
    """How a LeRobot dataset's features feed the spec (calibration.lerobot.LeRobotEpisodes)."""

    cameras: dict[str, str] | None = None  # spec camera -> video feature; None: by name
    proprio: tuple[str, ...] | None = None  # features or key[i] entries; None: by the spec's names
    action: str = "action"


SOURCE_KINDS = ("a LeRobot dataset directory (with meta/info.json), HDF5 episodes (a .h5 file or a folder of "
                "them), or a folder of images with --calib-instructions")


def is_lerobot_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "meta" / "info.json").is_file()


def is_hdf5_episodes(path: Path) -> bool:
    from calibration.sources import HDF5_SUFFIXES

    return path.is_file() or (path.is_dir() and any(p.suffix.lower() in HDF5_SUFFIXES for p in path.rglob("*")))


def open_dataset(kind: str | None, spec: PolicySpec, dataset_options: DatasetOptions = DatasetOptions()):
    """The recorded episodes `--calib-source` names, or None when it names no episodes."""
    if kind is None or kind == "reference-world":
        return None
    path = Path(kind)
    if is_lerobot_dataset(path):
        from calibration.lerobot import LeRobotEpisodes

        return LeRobotEpisodes(path, spec, cameras=dataset_options.cameras, proprio=dataset_options.proprio,
                               action=dataset_options.action)
    if path.exists() and is_hdf5_episodes(path):
        from calibration.episodes import Hdf5Episodes

        return Hdf5Episodes(path, spec)
    return None


def calibration_source(kind: str | None, instructions: Path | None, count: int, policy):
    """A sample source for what is not recorded episodes: the policy's hook or a folder of images."""
    from calibration.sources import ImageFolderSource

    spec = policy.spec
    if kind is None:
        if policy.calibration is None:
            raise CalibrationError(f"the policy has no default calibration data: pass --calib-source ({SOURCE_KINDS})")
        return policy.calibration(count)
    if kind == "reference-world":  # the name of the old built-in source, still in older instructions
        raise CalibrationError("--calib-source reference-world is gone: a policy brings its own calibration data "
                               "(the reference policy's is the reference world), so omit --calib-source")
    path = Path(kind)
    if not path.exists():
        raise CalibrationError(f"--calib-source {kind}: no such file or folder (give {SOURCE_KINDS}; without the "
                               "option the policy's own calibration data is used)")
    if instructions is None:
        if spec.language is not None:
            raise CalibrationError(f"--calib-source {path} is an image folder: pass --calib-instructions "
                                   "FILE (one instruction per line)")
        raise CalibrationError(f"--calib-source {path} is an image folder: pass --calib-instructions FILE "
                               "(a policy without language ignores the text, but each image needs a label)")
    return ImageFolderSource(path, instructions, proprio_dim=spec.proprio.dim)


def gather(options, policy, dataset_options: DatasetOptions = DatasetOptions()) -> Gathered:
    """Calibration and held-out samples for `options` (build.BuildOptions), split by episode."""
    from calibration.sources import take

    spec = policy.spec
    dataset = open_dataset(options.calib_source, spec, dataset_options)
    if dataset is not None:
        return _from_episodes(dataset, options, spec)
    # Twice the held-out count: calibration takes whole episodes, so it may run past calib_samples.
    wanted = options.calib_samples + 2 * options.heldout_samples
    try:
        source = calibration_source(options.calib_source, options.calib_instructions, wanted, policy)
        got = take(source, wanted, minimum=options.min_calib_samples + MIN_HELDOUT_SAMPLES)
    except EdgeError:
        raise
    except Exception as exc:  # a policy's own calibration hook may fail in any way: one line naming it
        raise CalibrationError(f"the calibration source of {options.policy} failed: {type(exc).__name__}: "
                               f"{exc}") from exc
    calib, heldout = split_by_episode(got, options.calib_samples, options.min_calib_samples, MIN_HELDOUT_SAMPLES)
    heldout = heldout[: max(options.heldout_samples, MIN_HELDOUT_SAMPLES)]
    describe = source.describe() if hasattr(source, "describe") else {"kind": type(source).__name__}
    ids = {part: sorted({str(s.episode) for s in chosen if s.episode is not None})
           for part, chosen in (("calibration", calib), ("heldout", heldout))}
    return Gathered(calib, heldout, describe, episode_ids=ids)


def _from_episodes(dataset, options, spec: PolicySpec) -> Gathered:
    from calibration.episodes import split_episodes

    ids = dataset.episode_ids()
    split = split_episodes(ids, held_out_fraction=options.heldout_fraction, seed=options.seed)
    where = dataset.describe().get("name", options.calib_source)
    calib = _steps(dataset, split.calibration, options.calib_samples, spec, options.seed)
    if len(calib) < options.min_calib_samples:
        raise CalibrationError(f"{where}: the {len(split.calibration)} calibration episode(s) hold {len(calib)} "
                               f"steps; calibration needs at least {options.min_calib_samples}: record more "
                               "episodes or lower --heldout-fraction")
    heldout = _steps(dataset, split.held_out, max(options.heldout_samples, MIN_HELDOUT_SAMPLES), spec, options.seed)
    if len(heldout) < MIN_HELDOUT_SAMPLES:
        raise CalibrationError(f"{where}: the {len(split.held_out)} held-out episode(s) hold {len(heldout)} steps; "
                               f"the gate needs at least {MIN_HELDOUT_SAMPLES} steps of episodes that did not "
                               "calibrate (split by episode, never by frame): record more episodes or raise "
                               "--heldout-fraction")
    source = {**dataset.describe(), "split": split.to_dict()}
    names = {part: [str(i) for i in chosen] for part, chosen in (("calibration", split.calibration),
                                                                 ("heldout", split.held_out))}
    return Gathered(calib, heldout, source, dataset=dataset, split=split, episode_ids=names)


def _steps(dataset, episode_ids, count: int, spec: PolicySpec, seed: int) -> list:
    """Up to `count` steps of `episode_ids`, evenly spaced in each episode so that they cover all."""
    from calibration.episodes import EpisodeCalibrationSource

    first = spec.cameras[0]
    source = EpisodeCalibrationSource(dataset, episode_ids, camera=first.name, channel_order=first.channel_order,
                                      per_episode=math.ceil(count / len(episode_ids)), shuffle_seed=seed,
                                      views={c.name: c.channel_order for c in spec.cameras})
    taken = []
    for sample in source:
        taken.append(sample)
        if len(taken) == count:
            break
    return taken


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
