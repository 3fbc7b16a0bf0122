"""Calibration and held-out data are split by episode, never by frame."""

from __future__ import annotations

import numpy as np
import pytest

from build_engines.errors import CalibrationError
from build_engines.samples import split_by_episode
from calibration.sources import CalibrationSample


def samples(episodes):
    frame = np.zeros((4, 4, 3), np.uint8)
    return [CalibrationSample(frame, "go", np.zeros(2, np.float32), episode=e) for e in episodes]


def test_whole_episodes_calibrate_and_later_ones_are_held_out():
    calib, heldout = split_by_episode(samples([0] * 5 + [1] * 5 + [2] * 5 + [3] * 5), 8, 5, 5)
    assert {s.episode for s in calib} == {0, 1} and {s.episode for s in heldout} == {2, 3}


def test_interleaved_frames_of_one_episode_never_land_on_both_sides():
    order = [0, 1, 0, 2, 1, 3, 2, 0, 3, 1, 2, 3]
    calib, heldout = split_by_episode(samples(order), 5, 3, 3)
    assert not {s.episode for s in calib} & {s.episode for s in heldout}
    assert len(calib) == 6 and len(heldout) == 6


def test_episodes_move_back_to_held_out_while_calibration_keeps_its_minimum():
    calib, heldout = split_by_episode(samples([0] * 6 + [1] * 6 + [2] * 2), 12, 6, 4)
    assert {s.episode for s in calib} == {0} and len(heldout) == 8


def test_one_episode_cannot_be_split_and_says_what_to_do():
    with pytest.raises(CalibrationError, match="1 episode.*add episodes or lower --calib-samples"):
        split_by_episode(samples([7] * 40), 32, 16, 8)


def test_frames_without_an_episode_are_each_their_own():
    frame = np.zeros((4, 4, 3), np.uint8)
    loose = [CalibrationSample(frame, "go", np.zeros(2, np.float32)) for _ in range(12)]
    calib, heldout = split_by_episode(loose, 8, 8, 4)
    assert len(calib) == 8 and len(heldout) == 4
