"""The camera codec the build calibrates the failure monitor on (build_engines/camera_codec.py): JPEG round
trips as a camera delivers them, the per-episode setting, the option's checks, and a feature model fitted
with compressed samples that accepts compressed in-distribution frames a raw-only model refuses."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from build_engines.build import BuildOptions, validate_options
from build_engines.camera_codec import DEFAULT_QUALITIES, augment, check_qualities, episode_quality, jpeg
from build_engines.cli import _camera_jpeg
from build_engines.errors import BuildError
from build_engines.monitor import fit_monitor
from reference_world.world import TabletopWorld


def test_a_jpeg_round_trip_keeps_shape_and_type_and_changes_pixels_a_little():
    frame = TabletopWorld().reset(5).frame
    assert jpeg(frame, None) is frame
    coded = jpeg(frame, 75)
    assert coded.shape == frame.shape and coded.dtype == np.uint8
    error = np.abs(coded.astype(int) - frame.astype(int)).mean()
    assert 0.2 < error < 6.0, error
    assert error > np.abs(jpeg(frame, 95).astype(int) - frame.astype(int)).mean(), "lower quality, more change"
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    assert jpeg(grey, 80).shape == grey.shape and jpeg(grey[..., None], 80).shape == grey.shape + (1,)
    batch = {"cam0": np.stack([frame, frame])}
    coded = augment(batch, 85)
    assert coded["cam0"].shape == batch["cam0"].shape and not np.shares_memory(coded["cam0"], batch["cam0"])


def test_episodes_take_raw_then_each_quality_in_turn():
    assert [episode_quality(seed, (95, 85)) for seed in range(6)] == [None, 95, 85, None, 95, 85]
    assert {episode_quality(seed, ()) for seed in range(4)} == {None}


@pytest.mark.parametrize("bad", [0, 101, 1.5, True, "90"])
def test_a_quality_outside_1_to_100_is_refused_with_the_option_named(tmp_path: Path, bad):
    with pytest.raises(ValueError, match="1..100"):
        check_qualities((90, bad))
    with pytest.raises(BuildError, match="--camera-jpeg"):
        validate_options(BuildOptions(out=tmp_path / "b", camera_jpeg=(90, bad)))


def test_the_option_takes_none_or_integers():
    assert _camera_jpeg(["none"]) == () and _camera_jpeg(["NONE"]) == ()
    assert _camera_jpeg(["90", "70"]) == (90, 70)
    assert check_qualities(DEFAULT_QUALITIES) == DEFAULT_QUALITIES
    with pytest.raises(BuildError, match="--camera-jpeg takes"):
        _camera_jpeg(["90", "high"])


def _fit(tmp_path, raw, compressed):
    n = len(raw)
    return fit_monitor(tmp_path, vision_features={"fp32": raw}, targets={"cpu": {"vision": "fp32"}},
                       calibration=slice(0, n - 100), heldout=slice(n - 100, n), episodes=[None] * n, rate=0.02,
                       instruction_vectors=None, known_instructions=[], heldout_instructions=[],
                       heldout_actions={}, action_range=2.0, compressed_features=compressed,
                       camera_jpeg=(80,) if compressed else ())


def test_a_model_fitted_with_compressed_samples_accepts_compressed_frames_a_raw_model_refuses(tmp_path):
    # Features of 16 channels; compression moves every sample along one direction in which raw samples
    # hardly vary (as JPEG moved the reference policy's pooled vision features).
    rng = np.random.default_rng(0)
    scale = np.ones(16)
    scale[3] = 0.02
    raw = (rng.normal(size=(500, 16)) * scale).astype(np.float32)
    shift = np.zeros(16, np.float32)
    shift[3] = 6.0
    compressed = raw + shift + rng.normal(0, 0.01, raw.shape).astype(np.float32)
    new_compressed = (rng.normal(size=(200, 16)) * scale + shift).astype(np.float32)
    for extra, accepted in ((None, False), ({"fp32": [compressed]}, True)):
        out = tmp_path / ("with" if extra else "without")
        out.mkdir()
        section = _fit(out, raw, extra)
        threshold = section["signals"]["feature_novelty"]["threshold"]["cpu"]
        with np.load(out / section["signals"]["feature_novelty"]["path"]) as data:
            white = (new_compressed - data["mean_fp32"]) @ data["whiten_fp32"].T
        over = np.mean(np.linalg.norm(white, axis=1) > threshold)
        assert (over < 0.1) if accepted else (over > 0.9), (extra is not None, over)
        assert section["camera_jpeg"] == ([80] if extra else [])
