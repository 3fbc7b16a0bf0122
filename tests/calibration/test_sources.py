"""Calibration sources against real files: PNG/JPEG written with OpenCV, HDF5 episodes written with h5py."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.sources import (
    CalibrationSample,
    CalibrationSource,
    Hdf5EpisodeSource,
    ImageFolderSource,
    take,
)
from edge.errors import ConfigError, InputError

h5py = pytest.importorskip("h5py")

H, W = 12, 16


def solid(bgr: tuple[int, int, int]) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:] = bgr
    return frame


def write_instructions(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    assert cv2.imwrite(str(folder / "a.png"), solid((255, 0, 0)))  # pure blue in BGR
    assert cv2.imwrite(str(folder / "b.jpg"), solid((0, 200, 0)))
    assert cv2.imwrite(str(folder / "more" / "c.png"), solid((0, 0, 255)))  # pure red in BGR
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not an image")  # skipped
    instructions = write_instructions(tmp_path / "instructions.txt", ["pick up the red cube", "", "go home"])
    return folder, instructions


def test_image_folder_yields_bgr_frames_round_robin_instructions_and_zero_proprio(image_folder):
    folder, instructions = image_folder
    source = ImageFolderSource(folder, instructions, proprio_dim=5)
    assert isinstance(source, CalibrationSource)
    samples = list(source)
    assert len(samples) == len(source) == 3
    assert [s.instruction for s in samples] == ["pick up the red cube", "go home", "pick up the red cube"]
    for sample in samples:
        assert sample.frame.dtype == np.uint8 and sample.frame.shape == (H, W, 3)
        assert sample.proprio.dtype == np.float32 and sample.proprio.shape == (5,)
        assert not sample.proprio.any()
    np.testing.assert_array_equal(samples[0].frame, solid((255, 0, 0)))  # PNG is lossless, order BGR
    assert np.abs(samples[1].frame.astype(int) - solid((0, 200, 0))).max() <= 8  # JPEG is close
    np.testing.assert_array_equal(samples[2].frame, solid((0, 0, 255)))  # subfolders are included
    again = list(source)
    np.testing.assert_array_equal(again[2].frame, samples[2].frame)
    described = source.describe()
    assert described["kind"] == "image_folder" and described["images"] == 3
    assert described["instructions"] == 2 and str(folder) in described["name"]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n this is not really a png"], ids=["empty", "garbage"])
def test_a_corrupt_image_is_an_error_naming_the_file(image_folder, content):
    folder, instructions = image_folder
    (folder / "zz_broken.png").write_bytes(content)
    source = ImageFolderSource(folder, instructions, proprio_dim=2)
    with pytest.raises(InputError, match=r"zz_broken\.png.*corrupt"):
        list(source)


def test_image_folder_setup_errors(tmp_path, image_folder):
    folder, instructions = image_folder
    with pytest.raises(InputError, match="does not exist"):
        ImageFolderSource(tmp_path / "nowhere", instructions, proprio_dim=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no png/jpg/jpeg images"):
        ImageFolderSource(empty, instructions, proprio_dim=2)
    with pytest.raises(InputError, match=r"missing\.txt does not exist"):
        ImageFolderSource(folder, tmp_path / "missing.txt", proprio_dim=2)
    blank = write_instructions(tmp_path / "blank.txt", ["", "   "])
    with pytest.raises(InputError, match=r"blank\.txt holds no instructions"):
        ImageFolderSource(folder, blank, proprio_dim=2)
    with pytest.raises(ConfigError, match="proprio_dim"):
        ImageFolderSource(folder, instructions, proprio_dim=-1)


# ----------------------------------------------------------------------------------------------- HDF5


def episode_arrays(steps: int, tag: int, proprio_dim: int = 3, action_dim: int = 2):
    """Frames whose blue channel encodes (tag, step), so a sample can be traced back to its origin."""
    images = np.zeros((steps, H, W, 3), np.uint8)
    for t in range(steps):
        images[t, ..., 0] = tag * 50 + t
        images[t, ..., 2] = 7
    proprio = (np.arange(steps * proprio_dim, dtype=np.float64).reshape(steps, proprio_dim) + 100 * tag)
    actions = np.zeros((steps, action_dim), np.float32)
    return images, proprio, actions


def fill_episode(node, steps: int, tag: int, instruction="push the cube", proprio_dim: int = 3) -> None:
    images, proprio, actions = episode_arrays(steps, tag, proprio_dim)
    node.create_dataset("images", data=images, chunks=(1, H, W, 3), compression="gzip")
    node.create_dataset("proprio", data=proprio)
    node.create_dataset("actions", data=actions)
    if instruction is not None:
        node.attrs["instruction"] = instruction


def origin(sample: CalibrationSample) -> tuple[int, int]:
    blue = int(sample.frame[0, 0, 0])
    return blue // 50, blue % 50


def test_hdf5_one_episode_per_file_in_file_order(tmp_path):
    path = tmp_path / "episode.h5"
    with h5py.File(path, "w") as f:
        fill_episode(f, steps=4, tag=0, instruction="stack the blocks")
    source = Hdf5EpisodeSource(path, shuffle_seed=None)
    assert isinstance(source, CalibrationSource)
    samples = list(source)
    assert len(samples) == len(source) == 4
    images, proprio, _ = episode_arrays(4, 0)
    for t, sample in enumerate(samples):
        np.testing.assert_array_equal(sample.frame, images[t])
        assert sample.proprio.dtype == np.float32
        np.testing.assert_array_equal(sample.proprio, proprio[t].astype(np.float32))
        assert sample.instruction == "stack the blocks"
    assert source.describe()["episodes"] == 1 and source.describe()["proprio_dim"] == 3


def test_hdf5_episode_groups_shuffled_over_all_steps_deterministically(tmp_path):
    path = tmp_path / "episodes.hdf5"
    with h5py.File(path, "w") as f:
        fill_episode(f.create_group("episode_0"), steps=5, tag=0, instruction="go left")
        fill_episode(f.create_group("episode_1"), steps=3, tag=1, instruction=np.bytes_(b"go right"))
    source = Hdf5EpisodeSource(path, shuffle_seed=3)
    samples = list(source)
    origins = [origin(s) for s in samples]
    assert sorted(origins) == [(0, t) for t in range(5)] + [(1, t) for t in range(3)]
    assert origins != sorted(origins), "seeded shuffle kept file order"
    assert origins == [origin(s) for s in source], "iterating again must give the same order"
    for sample, (episode, _) in zip(samples, origins, strict=True):
        assert sample.instruction == ("go left" if episode == 0 else "go right")
        assert sample.proprio[0] >= 100 * episode
    assert source.describe()["instructions"] == ["go left", "go right"]


def test_hdf5_folder_of_files_and_rgb_channel_order(tmp_path):
    for tag in range(2):
        with h5py.File(tmp_path / f"ep{tag}.h5", "w") as f:
            fill_episode(f, steps=2, tag=tag)
    source = Hdf5EpisodeSource(tmp_path, channel_order="rgb", shuffle_seed=None)
    samples = list(source)
    assert len(samples) == 4 and source.describe()["episodes"] == 2
    # stored as RGB: the value written in channel 0 is red, so in BGR it lands in channel 2
    assert samples[0].frame[0, 0, 2] == 0 and samples[0].frame[0, 0, 0] == 7
    assert samples[3].frame[0, 0, 2] == 51


def _missing_dataset(f):
    fill_episode(f, 3, 0)
    del f["proprio"]


def _float_images(f):
    fill_episode(f, 3, 0)
    del f["images"]
    f.create_dataset("images", data=np.zeros((3, H, W, 3), np.float32))


def _grey_images(f):
    fill_episode(f, 3, 0)
    del f["images"]
    f.create_dataset("images", data=np.zeros((3, H, W), np.uint8))


def _int_proprio(f):
    fill_episode(f, 3, 0)
    del f["proprio"]
    f.create_dataset("proprio", data=np.zeros((3, 4), np.int32))


def _short_actions(f):
    fill_episode(f, 3, 0)
    del f["actions"]
    f.create_dataset("actions", data=np.zeros((2, 2), np.float32))


def _no_instruction(f):
    fill_episode(f, 3, 0, instruction=None)


def _empty_instruction(f):
    fill_episode(f, 3, 0, instruction="  ")


def _group_missing_dataset(f):
    fill_episode(f.create_group("ep_a"), 3, 0)
    group = f.create_group("ep_b")
    fill_episode(group, 3, 1)
    del group["actions"]


def _mixed_layout(f):
    fill_episode(f.create_group("ep_a"), 3, 0)
    f.create_dataset("stray", data=np.zeros(3))


def _nothing(f):
    f.attrs["note"] = "empty"


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_missing_dataset, r"dataset 'proprio' is missing"),
        (_float_images, r"dataset 'images' is float32 \[3, 12, 16, 3\], expected uint8 \[T,H,W,3\]"),
        (_grey_images, r"dataset 'images' is uint8 \[3, 12, 16\], expected uint8 \[T,H,W,3\]"),
        (_int_proprio, r"dataset 'proprio' is int32 \[3, 4\], expected float \[T,P\]"),
        (_short_actions, r"dataset 'actions' has 2 steps but 'images' has 3"),
        (_no_instruction, r"attribute 'instruction' is missing"),
        (_empty_instruction, r"attribute 'instruction' must be a non-empty string"),
        (_group_missing_dataset, r"group 'ep_b': dataset 'actions' is missing"),
        (_mixed_layout, r"mixes episode groups with top-level datasets \['stray'\]"),
        (_nothing, r"holds neither the episode datasets nor episode groups"),
    ],
)
def test_hdf5_bad_layouts_name_the_file_dataset_and_expected_layout(tmp_path, build, expected):
    path = tmp_path / "bad_episode.h5"
    with h5py.File(path, "w") as f:
        build(f)
    with pytest.raises(InputError, match=expected) as caught:
        Hdf5EpisodeSource(path)
    assert "bad_episode.h5" in str(caught.value)
    assert "expected layout" in str(caught.value)


def test_hdf5_file_and_folder_errors(tmp_path):
    not_hdf5 = tmp_path / "fake.h5"
    not_hdf5.write_text("plain text")
    with pytest.raises(InputError, match=r"fake\.h5 is not a readable HDF5 file"):
        Hdf5EpisodeSource(not_hdf5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no .h5/.hdf5 files"):
        Hdf5EpisodeSource(empty)
    with pytest.raises(InputError, match="do not exist"):
        Hdf5EpisodeSource(tmp_path / "nowhere.h5")
    with pytest.raises(ConfigError, match="channel_order"):
        Hdf5EpisodeSource(not_hdf5, channel_order="yuv")


def test_hdf5_episodes_must_share_the_proprio_width(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        fill_episode(f, 2, 0, proprio_dim=3)
    with h5py.File(tmp_path / "b.h5", "w") as f:
        fill_episode(f, 2, 1, proprio_dim=4)
    with pytest.raises(InputError, match=r"b\.h5: dataset 'proprio' has width 4, but .*a\.h5 has 3"):
        Hdf5EpisodeSource(tmp_path)


# ----------------------------------------------------------------------------------------------- take


def test_take_stops_at_n_and_refuses_too_few_with_an_actionable_message(image_folder):
    folder, instructions = image_folder
    source = ImageFolderSource(folder, instructions, proprio_dim=2)
    assert len(take(source, 2, minimum=1)) == 2
    assert len(take(source, 10, minimum=3)) == 3
    with pytest.raises(InputError) as caught:
        take(source, 128, minimum=64)
    assert str(caught.value) == (f"calibration source image folder {folder} gave 3 samples; at least 64 are "
                                 "needed: add data or lower --calib-samples")


def test_take_checks_its_arguments_and_what_a_source_yields():
    class Junk:
        def __iter__(self):
            yield "not a sample"

        def describe(self):
            return {"kind": "junk", "name": "junk source"}

    with pytest.raises(InputError, match="junk source yielded str"):
        take(Junk(), 4, minimum=1)
    with pytest.raises(ConfigError):
        take(Junk(), 0, minimum=1)
    with pytest.raises(ConfigError):
        take(Junk(), 4, minimum=5)


def test_calibration_sample_checks_its_fields():
    good = dict(frame=np.zeros((2, 2, 3), np.uint8), instruction="go", proprio=np.zeros(3, np.float32))
    CalibrationSample(**good)
    with pytest.raises(InputError, match="frame must be uint8"):
        CalibrationSample(**{**good, "frame": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(InputError, match="frame must be uint8"):
        CalibrationSample(**{**good, "frame": np.zeros((2, 2), np.uint8)})
    with pytest.raises(InputError, match="proprio must be float32"):
        CalibrationSample(**{**good, "proprio": np.zeros(3, np.float64)})
    with pytest.raises(InputError, match="instruction"):
        CalibrationSample(**{**good, "instruction": ""})
