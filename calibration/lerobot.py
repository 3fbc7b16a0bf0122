"""A LeRobot v3 dataset directory as an episode source for calibration and the replay gate.

The on-disk layout read here is LeRobot's v3.0 format as its own code writes it (huggingface/lerobot,
``src/lerobot/datasets/utils.py``: ``INFO_PATH``, ``DEFAULT_DATA_PATH``, ``DEFAULT_VIDEO_PATH``,
``DEFAULT_EPISODES_PATH``, ``DEFAULT_TASKS_PATH``; ``dataset_metadata.py`` and ``dataset_writer.py`` for the
episode columns)::

    meta/info.json                     codebase_version "v3.x", fps, features, data_path, video_path templates
    meta/tasks.parquet                 one row per task: task_index, and the task text (the pandas index "task")
    meta/episodes/chunk-000/file-000.parquet
                                       one row per episode: episode_index, tasks, length,
                                       data/chunk_index, data/file_index,
                                       videos/<key>/chunk_index, videos/<key>/file_index,
                                       videos/<key>/from_timestamp, videos/<key>/to_timestamp
    data/chunk-000/file-000.parquet    one row per frame: episode_index, frame_index, timestamp,
                                       observation.state, action, task_index, ... (several episodes per file)
    videos/<key>/chunk-000/file-000.mp4
                                       several episodes per file, one after the other

A frame's image is the video frame closest to ``from_timestamp + timestamp`` of its episode, within
``tolerance_s`` (LeRobot's ``dataset_reader._query_videos`` and ``video_utils.decode_video_frames_pyav``
do the same, with the same default tolerance of 1e-4 s). Images are resized to the spec's camera size
with INTER_AREA (as the runtime resizes camera frames, ``edge/inference/frames.py``) and given in the
spec's channel order.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from build_engines.errors import CalibrationError
from calibration.episodes import EpisodeStep, check_steps
from edge.inference.spec import CameraSpec, PolicySpec

logger = logging.getLogger(__name__)

INFO_PATH = "meta/info.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DEFAULT_TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s
_PICK = re.compile(r"(?P<key>[^\[\]]+)(?:\[(?P<index>\d+)\])?")
_REWRITE = ("convert it with LeRobot's converter (python -m lerobot.scripts.convert_dataset_v21_to_v30) "
            "or record it again with a current LeRobot")


@dataclass(frozen=True)
class _Meta:
    index: int
    length: int
    tasks: tuple[str, ...]
    data_file: tuple[int, int]  # chunk, file
    videos: Mapping[str, tuple[int, int, float, float]]  # key -> chunk, file, from_timestamp, to_timestamp


class LeRobotEpisodes:
    """The episodes of a LeRobot v3 dataset, shaped for a policy spec.

    ``cameras`` maps each of the spec's camera names to a video feature of the dataset; by default a
    single camera takes the dataset's single video feature, and otherwise camera ``front`` takes the
    feature ``observation.images.front`` (or any video feature whose key ends in ``.front``).
    ``proprio`` lists what makes the proprio vector, in order: whole features (``observation.state``) or
    single entries (``observation.state[3]``); by default the entries of ``observation.state`` whose
    names (``features[...]["names"]``) are the spec's proprio names, or else the whole of it.
    Everything is checked against ``meta/info.json`` and the episode table when the source is made.
    """

    def __init__(self, root: str | os.PathLike[str], spec: PolicySpec, *, cameras: Mapping[str, str] | None = None,
                 proprio: Sequence[str] | None = None, action: str = "action",
                 tolerance_s: float = DEFAULT_TOLERANCE_S) -> None:
        self.root = Path(root)
        self.spec = spec
        if isinstance(tolerance_s, bool) or not isinstance(tolerance_s, int | float) or not 0 < tolerance_s < 1:
            raise CalibrationError(f"tolerance_s must be a number of seconds in (0, 1), got {tolerance_s!r}")
        self.tolerance_s = float(tolerance_s)
        self.info = _read_info(self.root)
        self.features: Mapping[str, Any] = self.info["features"]
        self.fps = float(self.info["fps"])
        self.cameras = self._camera_keys(cameras)
        self.proprio = self._proprio_picks(proprio)
        self.action_key = action
        self._check_vector(action, spec.action.dim, "action", "the spec's action channels")
        self._tasks = _read_tasks(self.root)
        self._episodes = _read_episodes(self.root, list(self.cameras.values()))
        self._table: tuple[Path, Any] | None = None  # the last data file read: episodes share files

    # -- what the dataset is --------------------------------------------------------------------------
    def episode_ids(self) -> list[Hashable]:
        return sorted(self._episodes)

    def __len__(self) -> int:
        return len(self._episodes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "lerobot", "name": f"LeRobot dataset {self.root}", "path": str(self.root),
                "codebase_version": self.info.get("codebase_version"), "fps": self.fps,
                "episodes": len(self._episodes), "frames": sum(m.length for m in self._episodes.values()),
                "cameras": dict(self.cameras), "proprio": [f"{k}[{i}]" for k, i in self.proprio],
                "action": self.action_key}

    # -- one episode ----------------------------------------------------------------------------------
    def load_episode(self, episode_id: Hashable) -> list[EpisodeStep]:
        meta = self._episodes.get(episode_id)  # type: ignore[call-overload]
        if meta is None:
            raise CalibrationError(f"LeRobot dataset {self.root} has no episode {episode_id!r}; it has "
                                   f"{len(self._episodes)} episodes ({self.episode_ids()[:5]}...)")
        path, rows = self._frames(meta)
        timestamps = rows["timestamp"]
        images = {name: self._video(meta, name, key, timestamps) for name, key in self.cameras.items()}
        proprio = np.stack([rows[k][:, i] for k, i in self.proprio], axis=1) if self.proprio \
            else np.zeros((meta.length, 0), np.float32)
        actions = rows[self.action_key]
        task_index = rows.get("task_index")
        steps = []
        for t in range(meta.length):
            steps.append(EpisodeStep(images={name: frames[t] for name, frames in images.items()},
                                     proprio=np.ascontiguousarray(proprio[t], dtype=np.float32),
                                     action=np.ascontiguousarray(actions[t], dtype=np.float32),
                                     instruction=self._instruction(meta, path, task_index, t)))
        check_steps(f"LeRobot episode {episode_id} ({path})", steps,
                    {c.name: (c.height, c.width) for c in self.spec.cameras}, self.spec.proprio.dim,
                    self.spec.action.dim)
        return steps

    def _frames(self, meta: _Meta) -> tuple[Path, dict[str, np.ndarray]]:
        chunk, file = meta.data_file
        path = self.root / self.info["data_path"].format(chunk_index=chunk, file_index=file)
        if self._table is None or self._table[0] != path:
            self._table = (path, _read_parquet(path, "data file"))
        table = self._table[1]
        columns = {"episode_index", "frame_index", "timestamp", self.action_key} | {k for k, _ in self.proprio}
        missing = sorted(columns - set(table.column_names))
        if missing:
            raise CalibrationError(f"LeRobot data file {path} lacks column(s) {missing}; it has "
                                   f"{table.column_names}. {_REWRITE}")
        episode = np.asarray(table.column("episode_index").to_numpy(zero_copy_only=False))
        picked = np.flatnonzero(episode == meta.index)
        order = np.argsort(np.asarray(table.column("frame_index").to_numpy(zero_copy_only=False))[picked],
                           kind="stable")
        picked = picked[order]
        if len(picked) != meta.length:
            raise CalibrationError(f"LeRobot data file {path} holds {len(picked)} frames of episode {meta.index}, "
                                   f"but {EPISODES_DIR} says it has {meta.length}; the dataset is incomplete: "
                                   "download or record it again")
        rows: dict[str, np.ndarray] = {}
        for name in columns | ({"task_index"} & set(table.column_names)):
            rows[name] = _column(table, name, picked, path)
        return path, rows

    def _video(self, meta: _Meta, name: str, key: str, timestamps: np.ndarray) -> np.ndarray:
        camera = next(c for c in self.spec.cameras if c.name == name)
        chunk, file, start, _ = meta.videos[key]
        template = self.info.get("video_path")
        if not template:
            raise CalibrationError(f"{self.root / INFO_PATH} has no video_path but feature '{key}' is a video; "
                                   f"{_REWRITE}")
        path = self.root / template.format(video_key=key, chunk_index=chunk, file_index=file)
        queries = start + np.asarray(timestamps, dtype=np.float64).reshape(-1)
        return _decode(path, queries, self.tolerance_s, camera, meta.index)

    def _instruction(self, meta: _Meta, path: Path, task_index: np.ndarray | None, t: int) -> str:
        if task_index is not None and self._tasks:
            index = int(np.asarray(task_index[t]).reshape(-1)[0])
            if index not in self._tasks:
                raise CalibrationError(f"LeRobot data file {path}: episode {meta.index} frame {t} has task_index "
                                       f"{index}, which {self.root / TASKS_PATH} does not list")
            return self._tasks[index]
        if meta.tasks:
            return meta.tasks[0]
        raise CalibrationError(f"LeRobot episode {meta.index} has no task: neither {self.root / TASKS_PATH} nor "
                               f"the episode table names one. {_REWRITE}")

    # -- checks against meta/info.json ----------------------------------------------------------------
    def _camera_keys(self, mapping: Mapping[str, str] | None) -> dict[str, str]:
        videos = [k for k, f in self.features.items() if isinstance(f, Mapping) and f.get("dtype") == "video"]
        images = [k for k, f in self.features.items() if isinstance(f, Mapping) and f.get("dtype") == "image"]
        keys: dict[str, str] = {}
        for camera in self.spec.cameras:
            key = _camera_key(camera, mapping, videos, len(self.spec.cameras))
            if key is None:
                stored = f" (stored as images in parquet: {images}, which this reader does not decode: " \
                         "re-encode the dataset with videos)" if images else ""
                raise CalibrationError(f"LeRobot dataset {self.root}: no video feature for the spec's camera "
                                       f"'{camera.name}'; video features: {videos}{stored}. Name it with "
                                       f"cameras={{'{camera.name}': '<feature key>'}}")
            if key not in videos:
                raise CalibrationError(f"LeRobot dataset {self.root}: camera '{camera.name}' is mapped to '{key}', "
                                       f"which {INFO_PATH} does not list as a video feature; video features: "
                                       f"{videos}")
            keys[camera.name] = key
        return keys

    def _proprio_picks(self, picks: Sequence[str] | None) -> list[tuple[str, int]]:
        dim = self.spec.proprio.dim
        if picks is None:
            if dim == 0:
                return []
            feature = self._check_vector("observation.state", None, "proprio", "the spec's proprio")
            names = feature.get("names")
            names = names.get("motors", names.get("axes")) if isinstance(names, Mapping) else names
            if isinstance(names, list) and all(n in names for n in self.spec.proprio.names):
                return [("observation.state", names.index(n)) for n in self.spec.proprio.names]
            picks = ["observation.state"]
        result: list[tuple[str, int]] = []
        for pick in picks:
            match = _PICK.fullmatch(pick) if isinstance(pick, str) else None
            if match is None:
                raise CalibrationError(f"proprio entry {pick!r} must be a feature key or key[i]")
            key = match.group("key")
            width = int(np.prod(self._check_vector(key, None, "proprio", "the spec's proprio")["shape"]))
            if match.group("index") is None:
                result.extend((key, i) for i in range(width))
            elif int(match.group("index")) >= width:
                raise CalibrationError(f"proprio entry {pick!r}: feature '{key}' has {width} values")
            else:
                result.append((key, int(match.group("index"))))
        if len(result) != dim:
            raise CalibrationError(f"LeRobot dataset {self.root}: proprio {list(picks)} gives {len(result)} values, "
                                   f"the spec's proprio has {dim} ({list(self.spec.proprio.names)}); name the "
                                   "entries with proprio=['observation.state[0]', ...]")
        return result

    def _check_vector(self, key: str, width: int | None, role: str, wanted: str) -> Mapping[str, Any]:
        feature = self.features.get(key)
        if not isinstance(feature, Mapping):
            raise CalibrationError(f"LeRobot dataset {self.root}: {INFO_PATH} has no feature '{key}' for the "
                                   f"{role}; features: {sorted(self.features)}")
        shape = feature.get("shape")
        if feature.get("dtype") in ("video", "image", "string") or not isinstance(shape, list | tuple) \
                or len(shape) != 1:
            raise CalibrationError(f"LeRobot dataset {self.root}: feature '{key}' is {feature.get('dtype')} "
                                   f"{shape}, expected a numeric vector for the {role}")
        if width is not None and int(shape[0]) != width:
            raise CalibrationError(f"LeRobot dataset {self.root}: feature '{key}' has {shape[0]} values, "
                                   f"{wanted} has {width}; pick another feature or fix the spec")
        return feature


def _camera_key(camera: CameraSpec, mapping: Mapping[str, str] | None, videos: list[str], count: int) -> str | None:
    if mapping is not None:
        return mapping.get(camera.name)
    if count == 1 and len(videos) == 1:
        return videos[0]
    for key in videos:
        if key == f"observation.images.{camera.name}" or key.endswith(f".{camera.name}"):
            return key
    return None


def _read_info(root: Path) -> dict[str, Any]:
    path = root / INFO_PATH
    if not root.is_dir():
        raise CalibrationError(f"LeRobot dataset {root} does not exist or is not a folder")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CalibrationError(f"{path} is missing: {root} is not a LeRobot dataset directory (it needs "
                               "meta/info.json, meta/episodes/, data/ and videos/)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path} cannot be read as JSON ({exc}); download the dataset again") from exc
    if not isinstance(info, dict):
        raise CalibrationError(f"{path} must hold a JSON object, got {type(info).__name__}")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise CalibrationError(f"{path}: codebase_version is {version or 'missing'!r}, this reader takes the "
                               f"v3 layout; {_REWRITE}")
    for key, kind in (("features", dict), ("fps", int | float), ("data_path", str)):
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise CalibrationError(f"{path}: '{key}' is missing or malformed ({info.get(key)!r}); {_REWRITE}")
    if info["fps"] <= 0:
        raise CalibrationError(f"{path}: fps must be positive, got {info['fps']}")
    return info


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CalibrationError("reading LeRobot datasets needs pyarrow: pip install 'vla-edge[build]' "
                               "(or pip install pyarrow)") from exc
    return pq


def _read_parquet(path: Path, what: str) -> Any:
    pq = _pyarrow()
    import pyarrow as pa

    if not path.is_file():
        raise CalibrationError(f"LeRobot {what} {path} is missing; the dataset is incomplete: download it again")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CalibrationError(f"LeRobot {what} {path} is not a readable parquet file ({exc}); "
                               "download the dataset again") from exc


def _column(table: Any, name: str, rows: np.ndarray, path: Path) -> np.ndarray:
    values = table.column(name).take(rows).to_pylist()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CalibrationError(f"LeRobot data file {path}: column '{name}' is not numeric ({exc})") from exc
    if name in ("episode_index", "frame_index", "timestamp", "task_index"):
        return array.reshape(-1)
    return array.reshape(len(values), -1)


def _read_tasks(root: Path) -> dict[int, str]:
    path = root / TASKS_PATH
    if not path.is_file():
        return {}
    table = _read_parquet(path, "task table")
    # pandas writes the task text as its index, named "task" (lerobot io_utils.write_tasks / load_tasks);
    # an unnamed index lands in "__index_level_0__".
    text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if "task_index" not in table.column_names or text is None:
        raise CalibrationError(f"{path} must have columns 'task_index' and 'task', has {table.column_names}")
    return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())}


def _read_episodes(root: Path, video_keys: list[str]) -> dict[int, _Meta]:
    folder = root / EPISODES_DIR
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise CalibrationError(f"{folder} holds no parquet files: LeRobot v3 keeps its episode table there "
                               f"(episode_index, length, data/ and videos/ file indices); {_REWRITE}")
    needed = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        needed += [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    episodes: dict[int, _Meta] = {}
    for path in files:
        table = _read_parquet(path, "episode table")
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise CalibrationError(f"LeRobot episode table {path} lacks column(s) {missing}; {_REWRITE}")
        columns = {c: table.column(c).to_pylist() for c in needed}
        tasks = table.column("tasks").to_pylist() if "tasks" in table.column_names else [None] * table.num_rows
        for r in range(table.num_rows):
            index = int(columns["episode_index"][r])
            if index in episodes:
                raise CalibrationError(f"LeRobot episode table {path} repeats episode {index}")
            episodes[index] = _Meta(
                index=index, length=int(columns["length"][r]),
                tasks=tuple(str(t) for t in (tasks[r] or ())),
                data_file=(int(columns["data/chunk_index"][r]), int(columns["data/file_index"][r])),
                videos={k: (int(columns[f"videos/{k}/chunk_index"][r]), int(columns[f"videos/{k}/file_index"][r]),
                            float(columns[f"videos/{k}/from_timestamp"][r]),
                            float(columns[f"videos/{k}/to_timestamp"][r])) for k in video_keys})
            if episodes[index].length < 1:
                raise CalibrationError(f"LeRobot episode table {path}: episode {index} has length "
                                       f"{episodes[index].length}")
    return episodes


def _decode(path: Path, queries: np.ndarray, tolerance_s: float, camera: CameraSpec, episode: int) -> np.ndarray:
    """The frames of ``path`` closest to each query time (seconds), as uint8 [N, H, W, 3] for ``camera``."""
    try:
        import av
    except ImportError as exc:
        raise CalibrationError("decoding LeRobot videos needs PyAV: pip install 'vla-edge[build]' "
                               "(or pip install av)") from exc
    if not path.is_file():
        raise CalibrationError(f"LeRobot video {path} (episode {episode}) is missing; download the dataset again")
    first, last = float(queries.min()), float(queries.max())
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CalibrationError(f"LeRobot video {path} has no video stream; re-encode it")
            stream = container.streams.video[0]
            # Seek to the keyframe at or before the episode's first frame, as LeRobot's PyAV reader does.
            container.seek(max(0, round(first / stream.time_base) - 1), backward=True, any_frame=False,
                           stream=stream)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                when = float(frame.pts * stream.time_base)
                if when >= first - tolerance_s:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(when)
                if when >= last:
                    break
    except av.FFmpegError as exc:
        raise CalibrationError(f"LeRobot video {path} (episode {episode}) cannot be decoded ({exc}); the file is "
                               "corrupt or truncated: download the dataset again or re-encode the video") from exc
    if not frames:
        raise CalibrationError(f"LeRobot video {path} holds no frames between {first:.4f} s and {last:.4f} s "
                               f"(episode {episode}); the video is truncated or the episode table is wrong")
    stamps = np.asarray(times)
    nearest = np.abs(queries[:, None] - stamps[None, :]).argmin(axis=1)
    worst = float(np.abs(stamps[nearest] - queries).max())
    if worst > tolerance_s:
        raise CalibrationError(f"LeRobot video {path} (episode {episode}): a frame's timestamp is {worst:.4f} s "
                               f"from the nearest video frame (tolerance {tolerance_s} s); the video is "
                               "truncated or does not match the data files: download the dataset again")
    out = np.empty((len(queries), camera.height, camera.width, 3), np.uint8)
    for i, j in enumerate(nearest):
        image = frames[j]
        if image.shape[:2] != (camera.height, camera.width):
            image = cv2.resize(image, (camera.width, camera.height), interpolation=cv2.INTER_AREA)
        out[i] = image[..., ::-1] if camera.channel_order == "bgr" else image
    return out
