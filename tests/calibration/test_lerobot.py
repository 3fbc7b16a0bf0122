"""The LeRobot v3 reader on tiny datasets written on the fly (several episodes per file, two cameras)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from build_engines.errors import CalibrationError
from calibration.episodes import EpisodeDataset
from calibration.lerobot import LeRobotEpisodes
from edge.inference.spec import PolicySpec
from tests.calibration.lerobot_writer import grey, write_dataset


def make_spec(cameras=(("front", 12, 16, "rgb"), ("wrist", 16, 16, "bgr")), proprio=("a", "b", "c"),
              action_dim=2) -> PolicySpec:
    return PolicySpec.from_dict({
        "name": "tiny",
        "cameras": [{"name": n, "height": h, "width": w, "channel_order": o} for n, h, w, o in cameras],
        "proprio": {"names": list(proprio), "sources": [f"positions[{i}]" for i in range(len(proprio))]},
        "action": {"names": [f"j{i}" for i in range(action_dim)], "low": [-1.0] * action_dim,
                   "high": [1.0] * action_dim, "max_slew_per_s": [2.0] * action_dim},
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "ds")


def expected_rgb(camera: int, episode: int, frame: int) -> np.ndarray:
    level = grey(camera, episode, frame)
    return np.asarray([level, level // 2, 255 - level], np.float64)


def test_every_episode_is_read_with_its_own_frames_state_action_and_task(dataset):
    source = LeRobotEpisodes(dataset.root, make_spec())
    assert isinstance(source, EpisodeDataset)
    assert source.episode_ids() == [0, 1, 2, 3]
    for e in source.episode_ids():
        steps = source.load_episode(e)
        assert len(steps) == dataset.lengths[e]
        for t, step in enumerate(steps):
            np.testing.assert_array_equal(step.proprio, dataset.state[e][t])
            np.testing.assert_array_equal(step.action, dataset.action[e][t])
            assert step.instruction == dataset.tasks[e]
            front, wrist = step.images["front"], step.images["wrist"]
            assert front.dtype == np.uint8 and front.shape == (12, 16, 3)  # resized from 24x32
            assert wrist.shape == (16, 16, 3)
            # front is asked for in RGB, wrist in BGR: the channels come back in those orders
            np.testing.assert_allclose(front.reshape(-1, 3).mean(0), expected_rgb(0, e, t), atol=4)
            np.testing.assert_allclose(wrist.reshape(-1, 3).mean(0), expected_rgb(1, e, t)[::-1], atol=4)
    assert source.describe()["frames"] == sum(dataset.lengths)


def test_episodes_load_in_any_order(dataset):
    source = LeRobotEpisodes(dataset.root, make_spec())
    late = source.load_episode(3)
    early = source.load_episode(0)
    np.testing.assert_allclose(late[0].images["front"].reshape(-1, 3).mean(0), expected_rgb(0, 3, 0), atol=4)
    np.testing.assert_allclose(early[1].images["front"].reshape(-1, 3).mean(0), expected_rgb(0, 0, 1), atol=4)


def test_proprio_by_state_names_and_by_explicit_entries(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2, 2), state_names=["a", "b", "c"])
    by_name = LeRobotEpisodes(written.root, make_spec(proprio=("c", "a")))
    np.testing.assert_array_equal(by_name.load_episode(1)[0].proprio, written.state[1][0][[2, 0]])
    explicit = LeRobotEpisodes(written.root, make_spec(proprio=("x",)), proprio=["observation.state[1]"])
    np.testing.assert_array_equal(explicit.load_episode(0)[1].proprio, written.state[0][1][[1]])


def test_single_camera_takes_the_only_video_and_a_mapping_picks_one(tmp_path):
    written = write_dataset(tmp_path / "one", lengths=(2,), cameras=(("observation.images.top", 16, 16),))
    steps = LeRobotEpisodes(written.root, make_spec(cameras=(("cam", 8, 8, "rgb"),))).load_episode(0)
    assert steps[0].images["cam"].shape == (8, 8, 3)
    two = write_dataset(tmp_path / "two", lengths=(2,))
    mapped = LeRobotEpisodes(two.root, make_spec(cameras=(("main", 16, 16, "rgb"),)),
                             cameras={"main": "observation.images.wrist"})
    np.testing.assert_allclose(mapped.load_episode(0)[1].images["main"].reshape(-1, 3).mean(0),
                               expected_rgb(1, 0, 1), atol=4)


def test_missing_info_json_is_named(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2,))
    (written.root / "meta" / "info.json").unlink()
    with pytest.raises(CalibrationError, match=r"meta/info\.json is missing.*not a LeRobot dataset"):
        LeRobotEpisodes(written.root, make_spec())


def test_a_v2_dataset_is_refused_with_the_converter(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2,))
    info_path = written.root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["codebase_version"] = "v2.1"
    info_path.write_text(json.dumps(info))
    with pytest.raises(CalibrationError, match="v2.1.*convert_dataset_v21_to_v30"):
        LeRobotEpisodes(written.root, make_spec())


def test_features_the_spec_needs_must_exist_and_fit(dataset):
    with pytest.raises(CalibrationError, match=r"no video feature for the spec's camera 'top'.*cameras="):
        LeRobotEpisodes(dataset.root, make_spec(cameras=(("front", 8, 8, "rgb"), ("top", 8, 8, "rgb"))))
    with pytest.raises(CalibrationError, match=r"gives 3 values, the spec's proprio has 2"):
        LeRobotEpisodes(dataset.root, make_spec(proprio=("a", "b")))
    with pytest.raises(CalibrationError, match=r"'action' has 2 values, the spec's action channels has 7"):
        LeRobotEpisodes(dataset.root, make_spec(action_dim=7))
    with pytest.raises(CalibrationError, match=r"no feature 'observation.effort'"):
        LeRobotEpisodes(dataset.root, make_spec(proprio=("a",)), proprio=["observation.effort"])


def test_a_corrupt_video_names_the_file(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2, 2))
    video = written.root / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    video.write_bytes(b"\x00not an mp4" * 50)
    source = LeRobotEpisodes(written.root, make_spec())  # videos are opened per episode
    with pytest.raises(CalibrationError, match=r"file-000\.mp4 \(episode 0\) cannot be decoded.*corrupt"):
        source.load_episode(0)


def test_a_truncated_video_is_not_matched_to_wrong_frames(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2, 3), episodes_per_file=2)
    table = written.root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    import pyarrow.parquet as pq

    rows = pq.read_table(table).to_pydict()
    rows["videos/observation.images.front/from_timestamp"][1] += 1.0  # past the end of the video
    import pyarrow as pa

    pq.write_table(pa.table(rows), table)
    source = LeRobotEpisodes(written.root, make_spec())
    with pytest.raises(CalibrationError, match=r"(no frames between|from the nearest video frame)"):
        source.load_episode(1)


def test_a_missing_data_file_is_named(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2, 2, 2), episodes_per_file=2)
    (written.root / "data" / "chunk-000" / "file-001.parquet").unlink()
    source = LeRobotEpisodes(written.root, make_spec())
    assert len(source.load_episode(0)) == 2
    with pytest.raises(CalibrationError, match=r"data file .*file-001\.parquet is missing"):
        source.load_episode(2)


def test_without_a_task_table_the_episode_table_names_the_task(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2, 2))
    (written.root / "meta" / "tasks.parquet").unlink()
    source = LeRobotEpisodes(written.root, make_spec())
    assert [s.instruction for s in source.load_episode(1)] == [written.tasks[1]] * 2


def test_a_tolerance_out_of_range_is_refused(dataset):
    with pytest.raises(CalibrationError, match="tolerance_s must be a number of seconds"):
        LeRobotEpisodes(dataset.root, make_spec(), tolerance_s=0)


def test_images_stored_in_parquet_are_refused_with_what_to_do(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2,))
    info_path = written.root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.front"]["dtype"] = "image"
    info_path.write_text(json.dumps(info))
    with pytest.raises(CalibrationError, match=r"camera 'front'.*stored as images in parquet.*re-encode"):
        LeRobotEpisodes(written.root, make_spec())
