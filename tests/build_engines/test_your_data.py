"""Your data through `build-engines`: a LeRobot dataset calibrates and gates a tiny policy (split by episode,
held-out episodes replayed per chunk step), and data that does not fit the spec is refused in one line."""

from __future__ import annotations

import json

import pytest

from build_engines import cli
from edge.inference.bundle import Bundle
from tests.build_engines.tiny_policies import INSTRUCTIONS

pytest.importorskip("av")
pytest.importorskip("pyarrow")

from tests.calibration.lerobot_writer import write_dataset  # noqa: E402  (needs av and pyarrow)

POLICY = "tests.build_engines.tiny_policies:lerobot_arm"
SMALL = ["--int8", "--no-fp16", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off",
         "--log-level", "WARNING"]
CAMERA = (("observation.images.cam0", 96, 120),)  # resized to the spec's 64x80


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 6 episodes of 10 frames, 3 per data/video file; 2 held out give 20 replayed steps (>= 19 for alpha 0.05)
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "ds", lengths=(10,) * 6,
                         tasks=tuple(INSTRUCTIONS[:2]), cameras=CAMERA, state_dim=3, action_dim=3,
                         episodes_per_file=3)


def build(out, *extra, policy=POLICY):
    return cli.main(["--policy", policy, "--out", str(out), *SMALL, *extra])


def test_a_lerobot_dataset_calibrates_and_gates_a_chunking_policy_on_held_out_episodes(tmp_path, dataset, capsys):
    out = tmp_path / "bundle"
    assert build(out, "--calib-source", str(dataset.root), "--heldout-fraction", "0.34") == 0
    printed = capsys.readouterr().out
    manifest = Bundle.load(out).manifest
    assert str(dataset.root.parent) not in (out / "manifest.json").read_text()  # named, not located
    source = manifest["calibration"]["source"]
    assert source["path"] == "ds" and source["kind"] == "lerobot" and source["codebase_version"] == "v3.0" and source["episodes"] == 6
    held_out = source["split"]["held_out"]
    assert len(held_out) == 2 and not set(held_out) & set(source["split"]["calibration"])
    assert manifest["calibration"]["episodes"]["heldout"] == [str(e) for e in held_out]
    assert manifest["calibration"]["samples"] == 32 and manifest["calibration"]["heldout_samples"] == 8

    replay = json.loads((out / "reports" / "accuracy.json").read_text())["replay"]
    assert replay["episodes"] == held_out and replay["steps"] == 20 and replay["horizon"] == 4
    assert set(replay["variants"]) == set(manifest["targets"]) == {"cpu-fp32", "cpu", "cpu-qoperator", "cpu-reduce-range",
                                                                  "tensorrt"}
    assert replay["reference"] == "cpu-fp32"
    fp32, cpu = replay["variants"]["cpu-fp32"], replay["variants"]["cpu"]
    assert fp32["vs_reference"]["max_abs_overall"] == 0.0
    assert 0 < cpu["vs_reference"]["worst_mean_abs"] <= 0.02 and len(cpu["vs_reference"]["mean_abs"]) == 4
    # vs the recordings: step t + h exists for fewer (t, h) than the chunk covers, per chunk step
    assert cpu["vs_recorded"]["values"] == 3 * sum(min(4, 10 - t) for t in range(10)) * 2
    assert cpu["vs_reference"]["values"] == 3 * 4 * 20
    assert cpu["vs_recorded"]["worst_mean_abs"] > 0.05  # an untrained policy imitates nothing; it is measured
    uncertainty = manifest["uncertainty"]
    assert uncertainty["source"] == "held-out" and "20 steps of the 2 held-out recorded episodes" in uncertainty["method"]
    assert uncertainty["threshold"] == {t: v["score"]["threshold"] for t, v in replay["variants"].items()}
    assert manifest["gate"] == {"environment": None, "closed_loop_seeds": 0, "replay": True, "heldout_episodes": 2,
                                "camera_jpeg": [],  # no closed loop: no episodes through a codec
                                "optional_targets": ["cpu-qoperator", "cpu-reduce-range"], "dropped_targets": []}
    assert "Open-loop replay of 2 held-out episodes (20 steps, chunk of 4)" in printed
    assert "Open-loop replay" in (out / "reports" / "summary.md").read_text()


def test_a_target_beyond_the_replay_tolerance_refuses_the_bundle(tmp_path, dataset, capsys):
    out = tmp_path / "bundle"
    assert build(out, "--calib-source", str(dataset.root), "--heldout-fraction", "0.34",
                 "--max-replay-error", "1e-9") == 3
    err = capsys.readouterr().err
    assert "replay: cpu: mean error vs the reference" in err and "> 1e-09" in err
    assert not out.exists()
    refused = json.loads((tmp_path / "bundle.refused.json").read_text())
    assert refused["replay"]["variants"]["cpu"]["vs_reference"]["worst_mean_abs"] > 0


@pytest.mark.parametrize("written, extra, message", [
    (dict(action_dim=2), [], "feature 'action' has 2 values, the spec's action channels has 3"),
    (dict(state_dim=5), [], r"proprio \['observation.state'\] gives 5 values, the spec's proprio has 3"),
    (dict(cameras=(("observation.images.top", 32, 32), ("observation.images.side", 32, 32))), [],
     "no video feature for the spec's camera 'cam0'"),
    (dict(), ["--dataset-camera", "cam0=observation.images.wrist"], "camera 'cam0' is mapped to "
     "'observation.images.wrist', which meta/info.json does not list"),
    (dict(lengths=(10,)), [], "the data has 1 episodes; splitting by episode needs at least 2"),
])
def test_a_dataset_that_does_not_fit_the_spec_is_refused_in_one_line_before_any_graph(tmp_path, capsys, written,
                                                                                        extra, message):
    import re

    options = dict(lengths=(4, 4), tasks=tuple(INSTRUCTIONS[:1]), cameras=CAMERA, state_dim=3, action_dim=3)
    root = write_dataset(tmp_path / "ds", **{**options, **written}).root
    out = tmp_path / "bundle"
    assert build(out, "--calib-source", str(root), *extra) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("build-engines: error:")
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".bundle.building-*"))


def test_too_few_held_out_steps_and_bad_dataset_options_say_what_to_change(tmp_path, capsys):
    root = write_dataset(tmp_path / "ds", lengths=(5,) * 8, tasks=tuple(INSTRUCTIONS[:1]), cameras=CAMERA,
                         state_dim=3, action_dim=3, episodes_per_file=4).root
    assert build(tmp_path / "a", "--calib-source", str(root), "--heldout-fraction", "0.125") == 1
    err = capsys.readouterr().err
    assert "the 1 held-out episode(s) hold 5 steps; the gate needs at least 8" in err
    assert "raise --heldout-fraction" in err
    assert build(tmp_path / "b", "--calib-source", str(root), "--dataset-camera", "cam0") == 1
    assert "--dataset-camera 'cam0' must be CAMERA=FEATURE" in capsys.readouterr().err
