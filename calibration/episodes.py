"""Recorded episodes, whatever their on-disk format, and the split of calibration from held-out data.

An episode source (``EpisodeDataset``) names its episodes and loads one at a time as ``EpisodeStep`` s:
per step the uint8 image of every camera of the policy spec (already at the spec's size and channel
order), the proprio vector, the recorded action and the instruction. Two sources implement it:
``calibration.lerobot.LeRobotEpisodes`` (a LeRobot v3 dataset directory) and ``Hdf5Episodes`` below
(the HDF5 layout of ``calibration.sources``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from build_engines.errors import CalibrationError


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
