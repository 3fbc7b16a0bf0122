"""Write tiny LeRobot v3 datasets on the fly, in the layout LeRobot's own writer produces
(huggingface/lerobot src/lerobot/datasets: utils.py path templates, dataset_metadata.py episode columns,
io_utils.write_tasks for the task table): several episodes per data file and per video file.

Every frame of every camera is one solid colour that encodes (camera, episode, frame), so a test can
tell which recorded frame a reader returned even after lossy H.264 encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FPS = 10


@dataclass
class Written:
    root: Path
    lengths: list[int]
    tasks: list[str]  # per episode
    state: list[np.ndarray] = field(default_factory=list)  # per episode [T, S]
    action: list[np.ndarray] = field(default_factory=list)  # per episode [T, A]
    colour: dict = field(default_factory=dict)  # (camera key, episode) -> [T] grey level written


def grey(camera_number: int, episode: int, frame: int) -> int:
    return (30 + 60 * camera_number + 37 * episode + 11 * frame) % 200 + 20


def write_dataset(root: Path, lengths=(3, 4, 2, 3), tasks=("pick the cube", "open the drawer"),
                  cameras=(("observation.images.front", 24, 32), ("observation.images.wrist", 16, 16)),
                  state_dim=3, action_dim=2, episodes_per_file=2, state_names=None) -> Written:
    root = Path(root)
    rng = np.random.default_rng(0)
    episode_tasks = [tasks[e % len(tasks)] for e in range(len(lengths))]
    written = Written(root=root, lengths=list(lengths), tasks=episode_tasks)
    features = {
        "observation.state": {"dtype": "float32", "shape": [state_dim], "names": state_names},
        "action": {"dtype": "float32", "shape": [action_dim], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    for key, h, w in cameras:
        features[key] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    info = {"codebase_version": "v3.0", "robot_type": "tiny", "fps": FPS, "total_episodes": len(lengths),
            "total_frames": int(sum(lengths)), "total_tasks": len(tasks), "chunks_size": 1000,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": features}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": list(tasks)}),
                   root / "meta" / "tasks.parquet")
    episodes_rows: dict[str, list] = {"episode_index": [], "tasks": [], "length": [], "data/chunk_index": [],
                                      "data/file_index": [], "dataset_from_index": [], "dataset_to_index": []}
    for key, _, _ in cameras:
        for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
            episodes_rows[f"videos/{key}/{c}"] = []
    global_index = 0
    for file_number, first in enumerate(range(0, len(lengths), episodes_per_file)):
        members = list(range(first, min(first + episodes_per_file, len(lengths))))
        frames: dict[str, list] = {"index": [], "episode_index": [], "frame_index": [], "timestamp": [],
                                   "observation.state": [], "action": [], "task_index": []}
        offset_s = 0.0
        videos = {key: [] for key, _, _ in cameras}
        for e in members:
            length = lengths[e]
            state = rng.normal(size=(length, state_dim)).astype(np.float32)
            action = rng.uniform(-1, 1, size=(length, action_dim)).astype(np.float32)
            written.state.append(state)
            written.action.append(action)
            for t in range(length):
                frames["index"].append(global_index + t)
                frames["episode_index"].append(e)
                frames["frame_index"].append(t)
                frames["timestamp"].append(t / FPS)
                frames["observation.state"].append(state[t].tolist())
                frames["action"].append(action[t].tolist())
                frames["task_index"].append(tasks.index(episode_tasks[e]))
            for c, (key, h, w) in enumerate(cameras):
                levels = [grey(c, e, t) for t in range(length)]
                written.colour[(key, e)] = np.asarray(levels)
                videos[key].extend(colour_frame(h, w, v) for v in levels)
                episodes_rows[f"videos/{key}/chunk_index"].append(0)
                episodes_rows[f"videos/{key}/file_index"].append(file_number)
                episodes_rows[f"videos/{key}/from_timestamp"].append(offset_s)
                episodes_rows[f"videos/{key}/to_timestamp"].append(offset_s + length / FPS)
            episodes_rows["episode_index"].append(e)
            episodes_rows["tasks"].append([episode_tasks[e]])
            episodes_rows["length"].append(length)
            episodes_rows["data/chunk_index"].append(0)
            episodes_rows["data/file_index"].append(file_number)
            episodes_rows["dataset_from_index"].append(global_index)
            episodes_rows["dataset_to_index"].append(global_index + length)
            offset_s += length / FPS
            global_index += length
        data = root / "data" / "chunk-000" / f"file-{file_number:03d}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(frames), data)
        for key, h, w in cameras:
            video = root / "videos" / key / "chunk-000" / f"file-{file_number:03d}.mp4"
            video.parent.mkdir(parents=True, exist_ok=True)
            encode(video, videos[key], h, w)
    table = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table.parent.mkdir(parents=True)
    pq.write_table(pa.table(episodes_rows), table)
    return written


def colour_frame(height: int, width: int, level: int) -> np.ndarray:
    """An RGB frame whose three channels differ, so a swapped channel order shows."""
    return np.broadcast_to(np.asarray([level, level // 2, 255 - level], np.uint8), (height, width, 3)).copy()


def encode(path: Path, frames: list[np.ndarray], height: int, width: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
