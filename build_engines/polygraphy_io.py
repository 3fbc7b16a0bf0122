"""Reference data in Polygraphy's JSON format, so that on the Jetson an engine can be re-verified with

    polygraphy run engines/vision_int8.engine --trt \
        --load-inputs reference/vision_inputs.json --load-outputs reference/vision_int8-tensorrt_outputs.json

Polygraphy encodes a NumPy array as {"array": base64(np.save bytes), "polygraphy_class": "ndarray"};
inputs are a list of feed dicts, outputs a RunResults: a list of (runner name, [IterationResult]).
Written without importing Polygraphy, which the build machine need not have.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

_MARKER = "polygraphy_class"


def _encode(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode(), _MARKER: "ndarray"}


def _decode(obj):
    if isinstance(obj, dict):
        if obj.get(_MARKER) == "ndarray":
            return np.load(io.BytesIO(base64.b64decode(obj["array"])), allow_pickle=False)
        return {k: _decode(v) for k, v in obj.items() if k != _MARKER}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def save_inputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    path.write_text(json.dumps([{k: _encode(v) for k, v in feed.items()} for feed in feeds], indent=1))


def save_outputs(path: Path, runner_name: str, iterations: list[dict[str, np.ndarray]]) -> None:
    results = [
        {"outputs": {k: _encode(v) for k, v in outputs.items()}, "runner_name": runner_name,
         _MARKER: "IterationResult"}
        for outputs in iterations
    ]
    path.write_text(json.dumps({"lst": [[runner_name, results]], _MARKER: "RunResults"}, indent=1))


def load_inputs(path: Path) -> list[dict[str, np.ndarray]]:
    return _decode(json.loads(Path(path).read_text()))


def load_outputs(path: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    raw = json.loads(Path(path).read_text())
    return {runner: [_decode(it)["outputs"] for it in iterations] for runner, iterations in raw["lst"]}
