"""Splitting calibration from held-out data by episode, for LeRobot datasets and HDF5 episodes alike."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from build_engines.errors import CalibrationError
from calibration.episodes import EpisodeCalibrationSource, EpisodeDataset, Hdf5Episodes, split_episodes
from calibration.lerobot import LeRobotEpisodes
from calibration.sources import take
from tests.calibration.lerobot_writer import write_dataset
from tests.calibration.test_lerobot import make_spec


def test_split_is_by_episode_disjoint_complete_and_deterministic():
    ids = list(range(20))
    split = split_episodes(ids, held_out_fraction=0.25, seed=3)
    assert len(split.held_out) == 5 and len(split.calibration) == 15
    assert not set(split.held_out) & set(split.calibration)
    assert set(split.held_out) | set(split.calibration) == set(ids)
    assert split_episodes(list(reversed(ids)), held_out_fraction=0.25, seed=3) == split  # order-free
    others = {split_episodes(ids, held_out_fraction=0.25, seed=s).held_out for s in range(6)}
    assert len(others) > 1  # the seed matters
    assert split.to_dict()["held_out"] == list(split.held_out)


def test_minimum_counts_are_kept_and_too_few_episodes_are_refused():
    split = split_episodes(["a", "b", "c"], held_out_fraction=0.1, min_held_out=1)
    assert len(split.held_out) == 1  # round(0.3) == 0, raised to the minimum
    split = split_episodes(list(range(4)), held_out_fraction=0.5, min_calibration=2, min_held_out=2)
    assert len(split.calibration) == 2 and len(split.held_out) == 2
    with pytest.raises(CalibrationError, match=r"has 3 episodes.*at least 4 \(2 to calibrate, 2 held out.*record more"):
        split_episodes([0, 1, 2], min_calibration=2, min_held_out=2)
    with pytest.raises(CalibrationError, match="between 0 and 1"):
        split_episodes([0, 1, 2], held_out_fraction=1.0)
    with pytest.raises(CalibrationError, match="repeat"):
        split_episodes([0, 0, 1])


def _episode_of(proprio_by_episode, proprio):
    matches = [e for e, rows in proprio_by_episode.items() if any(np.array_equal(proprio, r) for r in rows)]
    assert len(matches) == 1
    return matches[0]


def test_lerobot_calibration_samples_come_only_from_calibration_episodes(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(3, 2, 4, 3, 2, 3), episodes_per_file=3)
    source = LeRobotEpisodes(written.root, make_spec())
    split = split_episodes(source.episode_ids(), held_out_fraction=0.34, seed=1)
    assert len(split.held_out) == 2
    calibration = EpisodeCalibrationSource(source, split.calibration, camera="front", channel_order="rgb")
    samples = take(calibration, 100, minimum=1)
    assert len(samples) == sum(written.lengths[e] for e in split.calibration)
    states = {e: list(s) for e, s in enumerate(written.state)}
    seen = {_episode_of(states, s.proprio) for s in samples}
    assert seen == set(split.calibration) and not seen & set(split.held_out)
    # the frame is BGR, as CalibrationSample carries it: the front camera was asked for in RGB
    first = samples[0]
    step = next(st for e in split.calibration for st in source.load_episode(e)
                if np.array_equal(st.proprio, first.proprio))
    np.testing.assert_array_equal(first.frame, step.images["front"][..., ::-1])


def test_per_episode_spreads_the_first_samples_over_episodes(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(4, 4, 4, 4), episodes_per_file=4)
    source = LeRobotEpisodes(written.root, make_spec())
    calibration = EpisodeCalibrationSource(source, [0, 1, 2, 3], camera="wrist", channel_order="bgr",
                                           per_episode=1)
    states = {e: list(s) for e, s in enumerate(written.state)}
    assert {_episode_of(states, s.proprio) for s in take(calibration, 4, minimum=4)} == {0, 1, 2, 3}


def _write_h5(folder, episodes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    proprio_by_episode = {}
    with h5py.File(folder / "many.h5", "w") as handle:
        for name in episodes:
            group = handle.create_group(name)
            group.create_dataset("images", data=rng.integers(0, 255, (3, 20, 24, 3), dtype=np.uint8))
            proprio = rng.normal(size=(3, 3)).astype(np.float32)
            group.create_dataset("proprio", data=proprio)
            group.create_dataset("actions", data=rng.uniform(-1, 1, (3, 2)).astype(np.float32))
            group.attrs["instruction"] = f"task {name}"
            proprio_by_episode[f"many.h5:{name}"] = list(proprio)
    return proprio_by_episode


def test_hdf5_episodes_split_the_same_way(tmp_path):
    proprio = _write_h5(tmp_path / "h5", [f"ep{i}" for i in range(5)])
    spec = make_spec(cameras=(("cam", 10, 12, "rgb"),))
    source = Hdf5Episodes(tmp_path / "h5", spec)
    assert isinstance(source, EpisodeDataset)
    assert source.episode_ids() == sorted(proprio)
    steps = source.load_episode("many.h5:ep2")
    assert steps[0].images["cam"].shape == (10, 12, 3) and steps[0].instruction == "task ep2"
    split = split_episodes(source.episode_ids(), held_out_fraction=0.4, seed=0)
    samples = take(EpisodeCalibrationSource(source, split.calibration, camera="cam", channel_order="rgb"),
                   100, minimum=1)
    seen = {_episode_of(proprio, s.proprio) for s in samples}
    assert seen == set(split.calibration) and not seen & set(split.held_out)


def test_hdf5_episodes_refuse_a_two_camera_spec(tmp_path):
    _write_h5(tmp_path / "h5", ["ep0"])
    with pytest.raises(CalibrationError, match="one camera.*LeRobot"):
        Hdf5Episodes(tmp_path / "h5", make_spec())
