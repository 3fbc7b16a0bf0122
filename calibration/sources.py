"""Calibration data sources: where the frames, instructions and proprioception for INT8 calibration come from.

A source yields ``CalibrationSample`` s (a BGR uint8 frame as a camera delivers it, the instruction, the
proprio vector); the build turns them into graph feeds with the policy's own preprocessing, so the
calibration data goes through exactly the path the robot's data goes through.

- ``ImageFolderSource``: PNG/JPEG files plus a text file of instructions; proprio is zeros.
- ``Hdf5EpisodeSource``: recorded episodes in the layout ``images`` [T,H,W,3] uint8, ``proprio`` [T,P],
  ``actions`` [T,A] plus a string attribute ``instruction``, one episode per file (datasets at the file
  root) or one episode per top-level group.
- The reference-world source lives with the build (it needs the policy to drive the robot).

Every bad input raises ``InputError`` naming the file (and dataset), what was found and what was expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from edge.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HDF5_SUFFIXES = (".h5", ".hdf5")
HDF5_LAYOUT = (
    "expected layout: datasets 'images' [T,H,W,3] uint8 (BGR unless channel_order='rgb'), "
    "'proprio' [T,P] float, 'actions' [T,A] float with the same T, and a string attribute 'instruction'; "
    "either at the file root (one episode per file) or in each top-level group (one episode per group)"
)


@dataclass(frozen=True, eq=False)
class CalibrationSample:
    """One observation as the robot sees it."""

    frame: np.ndarray  # uint8 [H, W, 3], BGR
    instruction: str
    proprio: np.ndarray  # float32 [P]
    # Which episode the sample comes from: the build splits calibration from held-out data by episode,
    # never by frame (neighbouring frames of one episode are near copies). None: a sample of its own.
    episode: int | str | None = None
    # Frames of further cameras by camera name (uint8 [H, W, 3] BGR); a camera of the policy not named
    # here gets `frame`.
    views: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        frame, proprio = self.frame, self.proprio
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
                or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
            raise InputError(f"calibration frame must be uint8 [H,W,3] BGR, got {_describe_array(frame)}")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise InputError(f"calibration instruction must be a non-empty string, got {self.instruction!r}")
        if not isinstance(proprio, np.ndarray) or proprio.dtype != np.float32 or proprio.ndim != 1:
            raise InputError(f"calibration proprio must be float32 [P], got {_describe_array(proprio)}")
        for name, view in (self.views or {}).items():
            if not isinstance(view, np.ndarray) or view.dtype != np.uint8 or view.ndim != 3 or view.shape[2] != 3:
                raise InputError(f"calibration frame of camera {name!r} must be uint8 [H,W,3] BGR, got "
                                 f"{_describe_array(view)}")

    def camera_frame(self, camera: str) -> np.ndarray:
        return (self.views or {}).get(camera, self.frame)


@runtime_checkable
class CalibrationSource(Protocol):
    """Anything that yields calibration samples; iterating again starts again from the first sample."""

    def __iter__(self) -> Iterator[CalibrationSample]: ...

    def describe(self) -> dict[str, Any]:
        """What the data is, for the calibration report and manifest: at least 'kind' and 'name'."""
        ...


def take(source: CalibrationSource, n: int, *, minimum: int) -> list[CalibrationSample]:
    """The first ``n`` samples of ``source``; fewer than ``minimum`` is an error that says what to do."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of calibration samples must be a positive integer, got {n!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, int) or not 1 <= minimum <= n:
        raise ConfigError(f"minimum calibration samples must be an integer in [1, {n}], got {minimum!r}")
    samples: list[CalibrationSample] = []
    for sample in source:
        if not isinstance(sample, CalibrationSample):
            raise InputError(f"calibration source {_source_name(source)} yielded {type(sample).__name__}, "
                             "expected CalibrationSample")
        samples.append(sample)
        if len(samples) == n:
            break
    if len(samples) < minimum:
        raise InputError(f"calibration source {_source_name(source)} gave {len(samples)} samples; "
                         f"at least {minimum} are needed: add data or lower --calib-samples")
    logger.info("took %d calibration samples from %s", len(samples), _source_name(source))
    return samples


class ImageFolderSource:
    """Images in a folder (sorted by path, subfolders included, hidden files skipped), instructions paired
    round-robin.

    Image ``i`` gets instruction ``i % len(instructions)``; blank lines in the instructions file are
    skipped. Proprio is a zero vector of ``proprio_dim`` (the policy's proprio width): a folder of images
    carries no robot state, and zeros are the state the policy's input normalisation centres on.
    """

    def __init__(self, folder: str | os.PathLike[str], instructions_file: str | os.PathLike[str], *,
                 proprio_dim: int) -> None:
        if isinstance(proprio_dim, bool) or not isinstance(proprio_dim, int) or proprio_dim < 0:
            raise ConfigError(f"proprio_dim must be a non-negative integer, got {proprio_dim!r}")
        self.folder = Path(folder)
        self.instructions_file = Path(instructions_file)
        self.proprio_dim = proprio_dim
        if not self.folder.is_dir():
            raise InputError(f"calibration image folder {self.folder} does not exist or is not a folder")
        self.images = _files(self.folder, IMAGE_SUFFIXES)
        if not self.images:
            raise InputError(f"calibration image folder {self.folder} holds no "
                             f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images")
        self.instructions = _read_instructions(self.instructions_file)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[CalibrationSample]:
        proprio = np.zeros(self.proprio_dim, np.float32)
        for index, path in enumerate(self.images):
            yield CalibrationSample(frame=_read_image(path),
                                    instruction=self.instructions[index % len(self.instructions)],
                                    proprio=proprio.copy())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "image_folder",
            "name": f"image folder {self.folder}",
            "folder": str(self.folder),
            "instructions_file": str(self.instructions_file),
            "images": len(self.images),
            "instructions": len(self.instructions),
            "proprio": f"zeros[{self.proprio_dim}]",
        }


@dataclass(frozen=True)
class _Episode:
    path: Path
    group: str  # "" for datasets at the file root
    steps: int
    instruction: str
    frame_shape: tuple[int, int, int]
    proprio_dim: int
    action_dim: int

    @property
    def where(self) -> str:
        return f"{self.path}" if not self.group else f"{self.path} group '{self.group}'"


class Hdf5EpisodeSource:
    """Recorded episodes in HDF5 files; see the module docstring for the layout.

    Every file is checked when the source is made (shapes and dtypes only, no frame data is read), so a
    bad file fails the build before calibration starts. Samples come in a seeded shuffled order over all
    (episode, step) pairs, so the first ``n`` of them (``take``) cover every episode instead of the start
    of the first one; ``shuffle_seed=None`` keeps file order.
    """

    def __init__(self, path_or_folder: str | os.PathLike[str], *, channel_order: str = "bgr",
                 shuffle_seed: int | None = 0) -> None:
        h5py = _import_h5py()
        if channel_order not in ("bgr", "rgb"):
            raise ConfigError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
        self.path = Path(path_or_folder)
        self.channel_order = channel_order
        self.shuffle_seed = shuffle_seed
        if self.path.is_dir():
            files = _files(self.path, HDF5_SUFFIXES)
            if not files:
                raise InputError(f"calibration episode folder {self.path} holds no "
                                 f"{'/'.join(HDF5_SUFFIXES)} files")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise InputError(f"calibration episodes {self.path} do not exist")
        self.episodes: list[_Episode] = []
        for file in files:
            self.episodes.extend(_scan_file(h5py, file))
        first = self.episodes[0]
        for episode in self.episodes[1:]:
            if episode.proprio_dim != first.proprio_dim:
                raise InputError(f"{episode.where}: dataset 'proprio' has width {episode.proprio_dim}, but "
                                 f"{first.where} has {first.proprio_dim}; all episodes must share the "
                                 "policy's proprio width")
        self.proprio_dim = first.proprio_dim

    def __len__(self) -> int:
        return sum(e.steps for e in self.episodes)

    def _order(self) -> list[tuple[int, int]]:
        order = [(e, t) for e, episode in enumerate(self.episodes) for t in range(episode.steps)]
        if self.shuffle_seed is not None:
            permutation = np.random.default_rng(self.shuffle_seed).permutation(len(order))
            order = [order[i] for i in permutation]
        return order

    def __iter__(self) -> Iterator[CalibrationSample]:
        h5py = _import_h5py()
        handle = None
        open_path: Path | None = None
        try:
            for e, t in self._order():
                episode = self.episodes[e]
                if episode.path != open_path:
                    # One open file at a time bounds file handles; episodes in one file hit the same handle.
                    if handle is not None:
                        handle.close()
                    handle = h5py.File(episode.path, "r")
                    open_path = episode.path
                node = handle[episode.group] if episode.group else handle
                frame = np.ascontiguousarray(node["images"][t])
                if self.channel_order == "rgb":
                    frame = np.ascontiguousarray(frame[..., ::-1])
                proprio = np.asarray(node["proprio"][t], dtype=np.float32)
                yield CalibrationSample(frame=frame, instruction=episode.instruction, proprio=proprio,
                                        episode=e)
        finally:
            if handle is not None:
                handle.close()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "hdf5_episodes",
            "name": f"HDF5 episodes {self.path}",
            "path": str(self.path),
            "episodes": len(self.episodes),
            "steps": len(self),
            "instructions": sorted({e.instruction for e in self.episodes}),
            "proprio_dim": self.proprio_dim,
            "channel_order": self.channel_order,
            "shuffle_seed": self.shuffle_seed,
        }


def _source_name(source: Any) -> str:
    describe = getattr(source, "describe", None)
    if callable(describe):
        name = describe().get("name")
        if name:
            return str(name)
    return type(source).__name__


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # Hidden files are skipped: macOS copies leave '._name.png' AppleDouble files that are not images.
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _describe_array(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _read_instructions(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"calibration instructions file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration instructions file {path} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise InputError(f"cannot read calibration instructions file {path}: {exc.strerror or exc}") from exc
    instructions = [line.strip() for line in text.splitlines() if line.strip()]
    if not instructions:
        raise InputError(f"calibration instructions file {path} holds no instructions "
                         "(expected one instruction per line)")
    return instructions


def _read_image(path: Path) -> np.ndarray:
    # imdecode instead of imread: imread says nothing about why it failed, and we must name the file.
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read calibration image {path}: {exc.strerror or exc}") from exc
    frame = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if frame is None:
        raise InputError(f"calibration image {path} is corrupt or not a PNG/JPEG image "
                         "(OpenCV could not decode it); remove or replace the file")
    if frame.dtype != np.uint8:  # IMREAD_COLOR already gives 8-bit; keep the contract explicit
        raise InputError(f"calibration image {path} decoded as {frame.dtype}, expected 8-bit")
    return frame


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise ConfigError("reading HDF5 calibration episodes needs h5py: pip install 'vla-edge[build]' "
                          "(or pip install h5py)") from exc
    return h5py


def _scan_file(h5py: Any, path: Path) -> list[_Episode]:
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"calibration episode file {path} is not a readable HDF5 file ({exc}); "
                         f"{HDF5_LAYOUT}") from exc
    with handle:
        root_names = {"images", "proprio", "actions"} & set(handle.keys())
        if root_names or "instruction" in handle.attrs:
            return [_check_episode(h5py, path, handle, "")]
        groups = [name for name in handle.keys() if isinstance(handle[name], h5py.Group)]
        if not groups:
            raise InputError(f"calibration episode file {path} holds neither the episode datasets nor "
                             f"episode groups; {HDF5_LAYOUT}")
        others = sorted(set(handle.keys()) - set(groups))
        if others:
            raise InputError(f"calibration episode file {path} mixes episode groups with top-level "
                             f"datasets {others}; {HDF5_LAYOUT}")
        return [_check_episode(h5py, path, handle[name], name) for name in sorted(groups)]


def _check_episode(h5py: Any, path: Path, node: Any, group: str) -> _Episode:
    where = f"{path}" if not group else f"{path} group '{group}'"

    def dataset(name: str) -> Any:
        if name not in node:
            raise InputError(f"{where}: dataset '{name}' is missing; {HDF5_LAYOUT}")
        item = node[name]
        if not isinstance(item, h5py.Dataset):
            raise InputError(f"{where}: '{name}' is a {type(item).__name__}, expected a dataset; {HDF5_LAYOUT}")
        return item

    images, proprio, actions = dataset("images"), dataset("proprio"), dataset("actions")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 \
            or images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(f"{where}: dataset 'images' is {images.dtype} {list(images.shape)}, "
                         f"expected uint8 [T,H,W,3]; {HDF5_LAYOUT}")
    for name, item in (("proprio", proprio), ("actions", actions)):
        if item.dtype.kind != "f" or item.ndim != 2:
            raise InputError(f"{where}: dataset '{name}' is {item.dtype} {list(item.shape)}, "
                             f"expected float [T,{'P' if name == 'proprio' else 'A'}]; {HDF5_LAYOUT}")
    steps = images.shape[0]
    if steps == 0:
        raise InputError(f"{where}: dataset 'images' has no steps (T=0); {HDF5_LAYOUT}")
    for name, item in (("proprio", proprio), ("actions", actions)):
        if item.shape[0] != steps:
            raise InputError(f"{where}: dataset '{name}' has {item.shape[0]} steps but 'images' has {steps}; "
                             f"{HDF5_LAYOUT}")
    if "instruction" not in node.attrs:
        raise InputError(f"{where}: attribute 'instruction' is missing; {HDF5_LAYOUT}")
    instruction = node.attrs["instruction"]
    if isinstance(instruction, np.ndarray) and instruction.shape == ():
        instruction = instruction.item()
    if isinstance(instruction, bytes):
        try:
            instruction = instruction.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: attribute 'instruction' is not UTF-8 ({exc.reason})") from exc
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"{where}: attribute 'instruction' must be a non-empty string, got {instruction!r}; "
                         f"{HDF5_LAYOUT}")
    return _Episode(path=path, group=group, steps=steps, instruction=instruction.strip(),
                    frame_shape=tuple(images.shape[1:]), proprio_dim=proprio.shape[1],
                    action_dim=actions.shape[1])
