"""Recorded episodes, whatever their on-disk format, and the split of calibration from held-out data.

An episode source (``EpisodeDataset``) names its episodes and loads one at a time as ``EpisodeStep`` s:
per step the uint8 image of every camera of the policy spec (already at the spec's size and channel
order), the proprio vector, the recorded action and the instruction. Two sources implement it:
``calibration.lerobot.LeRobotEpisodes`` (a LeRobot v3 dataset directory) and ``Hdf5Episodes`` below
(the HDF5 layout of ``calibration.sources``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from build_engines.errors import CalibrationError
from calibration.sources import CalibrationSample, Hdf5EpisodeSource, _import_h5py
from edge.inference.spec import PolicySpec


@dataclass(frozen=True, eq=False)
class EpisodeStep:
    """One recorded step: what the policy would have seen, and what the robot was commanded."""

    images: Mapping[str, np.ndarray]  # camera name (the spec's) -> uint8 [H, W, 3] in the spec's channel order
    proprio: np.ndarray  # float32 [P]
    action: np.ndarray  # float32 [A], the recorded command
    instruction: str


@runtime_checkable
class EpisodeDataset(Protocol):
    """Recorded episodes, addressed by id; ids are stable across runs so a split can be written down."""

    def episode_ids(self) -> list[Hashable]: ...

    def load_episode(self, episode_id: Hashable) -> list[EpisodeStep]: ...

    def describe(self) -> dict[str, Any]:
        """What the data is, for reports: at least 'kind' and 'name'."""
        ...


def check_steps(where: str, steps: Sequence[EpisodeStep], cameras: Mapping[str, tuple[int, int]],
                proprio_dim: int, action_dim: int) -> None:
    """Every step of an episode must fit the spec: a wrong size here would only show up as a bad gate."""
    if not steps:
        raise CalibrationError(f"{where} has no steps; remove the episode or record it again")
    for t, step in enumerate(steps):
        for name, (height, width) in cameras.items():
            image = step.images.get(name)
            if image is None or image.dtype != np.uint8 or image.shape != (height, width, 3):
                got = "nothing" if image is None else f"{image.dtype} {list(image.shape)}"
                raise CalibrationError(f"{where} step {t}: camera '{name}' gave {got}, expected uint8 "
                                       f"[{height}, {width}, 3]")
        if step.proprio.shape != (proprio_dim,) or step.action.shape != (action_dim,):
            raise CalibrationError(f"{where} step {t}: proprio {list(step.proprio.shape)} and action "
                                   f"{list(step.action.shape)}, expected [{proprio_dim}] and [{action_dim}] "
                                   "(the policy spec's widths)")


def iter_steps(dataset: EpisodeDataset, episode_ids: Sequence[Hashable]) -> Iterator[tuple[Hashable, EpisodeStep]]:
    for episode_id in episode_ids:
        for step in dataset.load_episode(episode_id):
            yield episode_id, step


# -- the split ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpisodeSplit:
    """Which episodes calibrate and which are held out for the gate; never a frame of one on both sides."""

    calibration: tuple[Hashable, ...]
    held_out: tuple[Hashable, ...]
    held_out_fraction: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"calibration": [_jsonable(i) for i in self.calibration],
                "held_out": [_jsonable(i) for i in self.held_out],
                "held_out_fraction": self.held_out_fraction, "seed": self.seed}


def split_episodes(episode_ids: Sequence[Hashable], *, held_out_fraction: float = 0.2, seed: int = 0,
                   min_calibration: int = 1, min_held_out: int = 1) -> EpisodeSplit:
    """Split by episode: ``round(held_out_fraction * n)`` episodes (at least ``min_held_out``) are held out.

    Frames of one episode are strongly correlated (the same scene, a few tenths of a second apart), so a
    split by frame would gate the policy on near-copies of its calibration data. The split depends only
    on the set of ids and the seed, not on the order the source lists them in.
    """
    ids = list(episode_ids)
    if len(set(ids)) != len(ids):
        raise CalibrationError("episode ids repeat; each episode must have one id")
    if not 0.0 < float(held_out_fraction) < 1.0:
        raise CalibrationError(f"held-out fraction must be between 0 and 1 (exclusive), got {held_out_fraction}")
    for name, value in (("min_calibration", min_calibration), ("min_held_out", min_held_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive integer, got {value!r}")
    n = len(ids)
    held = max(min_held_out, int(round(held_out_fraction * n)))
    if n - held < min_calibration:
        raise CalibrationError(f"the data has {n} episodes; splitting by episode needs at least "
                               f"{min_calibration + min_held_out} ({min_calibration} to calibrate, {min_held_out} "
                               f"held out at fraction {held_out_fraction}): record more episodes")
    ordered = sorted(ids, key=lambda i: (type(i).__name__, str(i)))
    permutation = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in permutation]
    held_out = tuple(sorted(shuffled[:held], key=lambda i: (type(i).__name__, str(i))))
    calibration = tuple(sorted(shuffled[held:], key=lambda i: (type(i).__name__, str(i))))
    return EpisodeSplit(calibration=calibration, held_out=held_out, held_out_fraction=float(held_out_fraction),
                        seed=int(seed))


def _jsonable(value: Hashable) -> Any:
    return value if isinstance(value, int | str) else str(value)


class EpisodeCalibrationSource:
    """The steps of some episodes as a ``calibration.sources.CalibrationSource`` (for ``take``).

    Episodes come in a seeded shuffled order and ``per_episode`` evenly spaced steps of each (all steps
    when None), so the first ``n`` samples spread over many episodes. The frame is the named camera's
    image, turned to BGR as ``CalibrationSample`` carries it; ``views`` (camera name -> the channel order
    the dataset gives it in) adds the frames of every camera of a policy with several, also as BGR. Each
    sample names its episode, so a later split by episode stays one.
    """

    def __init__(self, dataset: EpisodeDataset, episode_ids: Sequence[Hashable], *, camera: str,
                 channel_order: str, per_episode: int | None = None, shuffle_seed: int = 0,
                 views: Mapping[str, str] | None = None) -> None:
        if not episode_ids:
            raise CalibrationError("no episodes to calibrate on: the split left none")
        if per_episode is not None and (isinstance(per_episode, bool) or not isinstance(per_episode, int)
                                        or per_episode < 1):
            raise CalibrationError(f"per_episode must be a positive integer or None, got {per_episode!r}")
        self.dataset = dataset
        self.episode_ids = tuple(episode_ids)
        self.camera = camera
        self.channel_order = channel_order
        self.per_episode = per_episode
        self.shuffle_seed = shuffle_seed
        self.views = dict(views or {})
        for name, order in self.views.items():
            if order not in ("bgr", "rgb"):
                raise CalibrationError(f"channel order of camera {name!r} must be 'bgr' or 'rgb', got {order!r}")

    def __iter__(self) -> Iterator[CalibrationSample]:
        order = np.random.default_rng(self.shuffle_seed).permutation(len(self.episode_ids))
        for i in order:
            steps = self.dataset.load_episode(self.episode_ids[i])
            picked = range(len(steps)) if self.per_episode is None or self.per_episode >= len(steps) \
                else np.linspace(0, len(steps) - 1, self.per_episode).round().astype(int)
            episode = _jsonable(self.episode_ids[i])
            for t in picked:
                step = steps[t]
                views = {name: _bgr(step.images[name], order) for name, order in self.views.items()} or None
                yield CalibrationSample(frame=_bgr(step.images[self.camera], self.channel_order),
                                        instruction=step.instruction, proprio=step.proprio, episode=episode,
                                        views=views)

    def describe(self) -> dict[str, Any]:
        inner = self.dataset.describe()
        return {"kind": f"{inner.get('kind')}_episodes", "name": f"{inner.get('name')}, "
                f"{len(self.episode_ids)} calibration episodes", "episodes": [_jsonable(i) for i in self.episode_ids],
                "per_episode": self.per_episode, "camera": self.camera, "dataset": inner}


def _bgr(image: np.ndarray, channel_order: str) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1] if channel_order == "rgb" else image)


# -- HDF5 episodes --------------------------------------------------------------------------------------
class Hdf5Episodes:
    """The HDF5 episodes of ``calibration.sources`` (one 'images' dataset: a single camera) as an
    ``EpisodeDataset`` for a spec; an episode's id is its file (relative to the folder) and group."""

    def __init__(self, path_or_folder: str | os.PathLike[str], spec: PolicySpec, *,
                 channel_order: str = "bgr") -> None:
        if len(spec.cameras) != 1:
            raise CalibrationError(f"HDF5 episodes hold one camera ('images'); the spec has {len(spec.cameras)} "
                                   f"({[c.name for c in spec.cameras]}): record a LeRobot dataset instead")
        self.source = Hdf5EpisodeSource(path_or_folder, channel_order=channel_order, shuffle_seed=None)
        self.spec = spec
        self.channel_order = channel_order
        base = self.source.path if self.source.path.is_dir() else self.source.path.parent
        self._episodes = {f"{e.path.relative_to(base)}:{e.group}" if e.group else str(e.path.relative_to(base)): e
                          for e in self.source.episodes}

    def episode_ids(self) -> list[Hashable]:
        return sorted(self._episodes)

    def load_episode(self, episode_id: Hashable) -> list[EpisodeStep]:
        episode = self._episodes.get(episode_id)  # type: ignore[call-overload]
        if episode is None:
            raise CalibrationError(f"{self.source.path} has no episode {episode_id!r}")
        camera = self.spec.cameras[0]
        with _import_h5py().File(episode.path, "r") as handle:
            node = handle[episode.group] if episode.group else handle
            images, proprio, actions = node["images"][()], node["proprio"][()], node["actions"][()]
        steps = []
        for t in range(episode.steps):
            image = images[t]
            if image.shape[:2] != (camera.height, camera.width):
                image = cv2.resize(image, (camera.width, camera.height), interpolation=cv2.INTER_AREA)
            if camera.channel_order != self.channel_order:
                image = image[..., ::-1]
            steps.append(EpisodeStep(images={camera.name: np.ascontiguousarray(image)},
                                     proprio=np.asarray(proprio[t], np.float32),
                                     action=np.asarray(actions[t], np.float32), instruction=episode.instruction))
        check_steps(episode.where, steps, {camera.name: (camera.height, camera.width)}, self.spec.proprio.dim,
                    self.spec.action.dim)
        return steps

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "kind": "hdf5"}
