"""Bring your own policy: tiny policies of several shapes go from torch through `build-engines --policy`
into bundles that validate against the manifest schema; what cannot be built is refused in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from build_engines import cli
from edge.errors import InputError
from edge.inference.bundle import Bundle

POLICIES = "tests.build_engines.tiny_policies"
SMALL = ["--int8", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off", "--log-level", "WARNING"]


def build(tmp_path, factory, *extra, name="bundle"):
    out = tmp_path / name
    code = cli.main(["--policy", f"{POLICIES}:{factory}", "--out", str(out), *SMALL, *extra])
    return code, out


def inputs(bundle, graph):
    return {s.name: (s.dtype, list(s.shape)) for s in bundle.graphs[graph].inputs}


def test_a_96px_language_policy_builds_and_runs_in_the_runtime_pipeline(tmp_path):
    from edge.inference.pipeline import PolicyPipeline

    code, out = build(tmp_path, "image96")
    assert code == 0
    bundle = Bundle.load(out)  # hashes, manifest digest and schema
    assert inputs(bundle, "vision") == {"image": ("uint8", [-1, 96, 96, 3])}
    assert inputs(bundle, "head")["dropout_mask_1"] == ("float32", [-1, 32])
    assert bundle.manifest["dropout"]["layers"][0] == {"module": "mlp.2", "width": 32, "rate": 0.1}
    variants = bundle.manifest["graphs"]["head"]["variants"]
    assert set(variants) == {"fp32", "fp16", "int8-cpu", "int8-cpu-qop", "int8-cpu-rr", "int8-tensorrt"}
    assert variants["int8-cpu"]["latency_ms"] > 0 and variants["int8-cpu"]["accuracy_vs_fp32"]["action_error_mean"] < 0.05
    uncertainty = bundle.manifest["uncertainty"]
    assert uncertainty["source"] == "held-out" and set(uncertainty["by_samples"]["cpu"]) >= {"2", "16", "32"}
    assert all(not p.startswith("/") for p in bundle.manifest["files"])
    assert oct((out / "manifest.json").stat().st_mode & 0o777) == "0o644"
    assert oct((out / "graphs").stat().st_mode & 0o777) == "0o755"
    for target in ("cpu-fp32", "cpu", "cpu-qoperator", "cpu-reduce-range"):  # every CPU target runs
        with PolicyPipeline(bundle, target=target, mc_samples=8) as pipeline:
            out_ = pipeline.infer(np.full((120, 160, 3), 90, np.uint8), np.zeros(2, np.float32),
                                  pipeline.cache.encode_now("pick up the blue ball"))
            assert out_.action.shape == (2,) and out_.samples.shape == (8, 1, 2) and out_.score > 0, target


def test_a_256x192_seven_dof_chunking_policy_without_language(tmp_path):
    from edge.inference.pipeline import PolicyPipeline

    code, out = build(tmp_path, "image256x192_arm", "--no-fp16")
    assert code == 0
    bundle = Bundle.load(out)
    assert set(bundle.graphs) == {"vision", "head"} and bundle.manifest["tokenizer"] is None
    assert not (out / "tokenizer.json").exists() and bundle.manifest["embeddings"] is None
    assert inputs(bundle, "vision") == {"image": ("uint8", [-1, 192, 256, 3])}
    assert [s.shape for s in bundle.graphs["head"].outputs] == [(-1, 8, 7)]
    assert set(inputs(bundle, "head")) == {"vision_features", "proprio", "dropout_mask_0"}
    assert bundle.action["horizon"] == 8 and bundle.action["kinds"] == ["position"] * 7
    assert bundle.manifest["targets"]["cpu"] == {"vision": "int8-cpu", "head": "int8-cpu"}
    # without language the candidates' targets name only their own variant
    assert bundle.manifest["targets"]["cpu-reduce-range"] == {"vision": "int8-cpu-rr", "head": "int8-cpu-rr"}
    with PolicyPipeline(bundle, target="cpu-qoperator", mc_samples=2) as pipeline:
        assert pipeline.infer(np.full((192, 256, 3), 90, np.uint8), np.zeros(7, np.float32),
                              None).actions.shape == (8, 7)
    bundle.check_runnable()  # chunks, no language and position channels run in the runtime
    with PolicyPipeline(bundle, target="cpu", mc_samples=4) as pipeline:
        assert (pipeline.horizon, pipeline.action_dim, pipeline.proprio_dim) == (8, 7, 7)
        assert not pipeline.needs_language and pipeline.cache is None
        out = pipeline.infer(np.full((192, 256, 3), 90, np.uint8), np.zeros(7, np.float32), None)
        assert out.actions.shape == (8, 7) and out.samples.shape == (4, 8, 7) and out.score_per_step.shape == (8,)
        assert out.score > 0  # the dropout on the per-step tokens spreads every step


def test_two_cameras_are_two_uint8_inputs_of_the_vision_graph(tmp_path):
    import onnxruntime as ort

    from build_engines.polygraphy_io import load_inputs, load_outputs

    code, out = build(tmp_path, "two_cameras", "--no-fp16")
    assert code == 0
    bundle = Bundle.load(out)
    assert inputs(bundle, "vision") == {"image_cam0": ("uint8", [-1, 96, 96, 3]),
                                        "image_cam1": ("uint8", [-1, 64, 80, 3])}
    entry = bundle.manifest["reference"]["vision"]
    feeds = load_inputs(out / entry["inputs"])[0]
    session = ort.InferenceSession(str(bundle.graph_path("vision", "int8-cpu")), providers=["CPUExecutionProvider"])
    expected = next(iter(load_outputs(out / entry["outputs"]["int8-cpu"]).values()))[0]
    np.testing.assert_allclose(session.run(None, feeds)[0], expected["vision_features"], atol=1e-5)
    bundle.check_runnable()  # several cameras run in the runtime
    from edge.inference.pipeline import PolicyPipeline
    from edge.service import wiring
    from edge.service.config import config_from_dict

    config = config_from_dict({"bundle": str(out), "camera": {"source": 0}, "motor": {"port": "loop://"},
                               "policy": {"target": "cpu"}})
    wiring.check_policy(bundle, config)  # what run checks before any device
    frames = [feeds["image_cam0"][0], feeds["image_cam1"][0]]
    with PolicyPipeline(bundle, target="cpu", mc_samples=4) as pipeline:
        assert [c.name for c in pipeline.cameras] == ["cam0", "cam1"]
        pipeline.infer(frames, np.zeros(2, np.float32), pipeline.cache.encode_now("go to the red block"))
        # each frame went to its own camera's input: the features are the vision graph's on the reference
        np.testing.assert_allclose(pipeline.backends["head"].input("vision_features")[0], expected["vision_features"][0],
                                   atol=1e-5)
        with pytest.raises(InputError, match=r"2 camera\(s\) \(cam0, cam1\); got 1 frame"):
            pipeline.infer(frames[0], np.zeros(2, np.float32), pipeline.cache.encode_now("go to the red block"))


def test_a_head_without_dropout_needs_uncertainty_none(tmp_path, capsys):
    code, out = build(tmp_path, "no_dropout", "--no-fp16")
    assert code == 1 and not out.exists()
    assert "has no nn.Dropout" in capsys.readouterr().err
    code, out = build(tmp_path, "no_dropout", "--no-fp16", "--uncertainty", "none")
    assert code == 0
    bundle = Bundle.load(out)
    assert not any(s.name.startswith("dropout_mask") for s in bundle.graphs["head"].inputs)
    assert [s.shape for s in bundle.graphs["head"].outputs] == [(1, 2)]  # T = 1
    uncertainty = bundle.manifest["uncertainty"]
    assert uncertainty["signal"] == "none" and uncertainty["threshold"] == {} and "T = 1" in uncertainty["method"]
    assert bundle.dropout["max_samples"] == 1 and bundle.dropout["mask_inputs"] == []


@pytest.mark.parametrize("factory, message", [
    ("nine_channels", "9 channels; the serial protocol carries at most 8"),
    ("wrong_horizon", r"needs \(1, 4, 2\)"),
    ("not_a_policy", "returned dict; it must return build_engines.policy.Policy"),
    ("WORDS", "is not callable"),
    ("long_known_instruction", "instruction 'go to the red block and then.*is 13 tokens long; the policy accepts at most 8"),
])
def test_a_policy_that_does_not_fit_is_refused_in_one_line_before_any_work(tmp_path, capsys, factory, message):
    code, out = build(tmp_path, factory)
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and len(err.strip().splitlines()) == 1
    assert err.startswith("build-engines: error:")
    assert re.search(message, err), err


def test_bad_arguments_are_refused_before_the_policy_is_loaded(tmp_path, capsys):
    assert cli.main(["--policy", "no_such_package.mod:make", "--out", str(tmp_path / "a")]) == 1
    assert "cannot import no_such_package.mod" in capsys.readouterr().err
    assert cli.main(["--policy", "just-a-name", "--out", str(tmp_path / "a")]) == 1
    assert "must be 'package.module:function'" in capsys.readouterr().err
    assert build(tmp_path, "image96", "--calib-source", "reference-world")[0] == 1
    assert "omit --calib-source" in capsys.readouterr().err
    assert cli.main(["--gate-seeds", "0", "--out", str(tmp_path / "a")]) == 1
    assert "--gate-seeds must be an integer 1..10000, got 0" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 1
    assert "--checkpoint" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_hdf5_episodes_calibrate_are_split_by_episode_and_replay_in_the_gate(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    path = tmp_path / "episodes.h5"
    with h5py.File(path, "w") as f:
        for e in range(8):
            group = f.create_group(f"episode_{e}")
            group.create_dataset("images", data=rng.integers(0, 255, (6, 120, 160, 3), dtype=np.uint8))
            group.create_dataset("proprio", data=rng.uniform(-1, 1, (6, 2)).astype(np.float32))
            group.create_dataset("actions", data=rng.uniform(-1, 1, (6, 2)).astype(np.float32))
            group.attrs["instruction"] = "go to the red block"
    # 2 held-out episodes give 12 replayed steps: enough for a conformal threshold at 10 %, not at 5 %
    code, out = build(tmp_path, "image96", "--no-fp16", "--calib-source", str(path), "--false-alarm-rate", "0.1")
    assert code == 0
    text = (out / "manifest.json").read_text()
    assert str(tmp_path) not in text  # no build-machine path: the data file is named, not located
    manifest = json.loads(text)
    source = manifest["calibration"]["source"]
    assert source["kind"] == "hdf5" and source["path"] == "episodes.h5"
    # 20 % of 8 episodes held out; calibration takes --calib-samples steps of the other 6
    assert manifest["calibration"]["samples"] == 32 and manifest["calibration"]["heldout_samples"] == 8
    episodes = manifest["calibration"]["episodes"]
    assert len(episodes["calibration"]) == 6 and len(episodes["heldout"]) == 2
    assert not set(episodes["calibration"]) & set(episodes["heldout"])
    assert source["split"]["held_out"] == episodes["heldout"]
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert report["replay"]["steps"] == 12 and report["replay"]["episodes"] == episodes["heldout"]
    assert manifest["gate"]["replay"] and manifest["gate"]["heldout_episodes"] == 2
    uncertainty = manifest["uncertainty"]
    assert uncertainty["threshold"]["cpu"] == report["replay"]["variants"]["cpu"]["score"]["threshold"] > 0
    assert "split-conformal" in uncertainty["method"] and uncertainty["by_samples"]["cpu"].keys() == {"16"}
    code, _ = build(tmp_path, "image96", "--no-fp16", "--calib-source", str(path), name="strict")
    assert code == 3  # at the default 5 % the 12 held-out steps cannot set a threshold: refused, not guessed


def test_bad_calibration_data_and_checkpoints_end_in_one_line(tmp_path, capsys):
    import cv2

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(50):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((40, 60, 3), i * 4, np.uint8))
    (folder / "025.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("go to the red block\n")
    code, _ = build(tmp_path, "image96", "--calib-source", str(folder), "--calib-instructions", str(instructions))
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "025.jpg" in err
    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        cv2.imwrite(str(few / f"{i}.png"), np.zeros((40, 60, 3), np.uint8))
    code, _ = build(tmp_path, "image96", "--calib-source", str(few), "--calib-instructions", str(instructions))
    err = capsys.readouterr().err
    assert code == 1 and "gave 5 samples; at least 40 are needed" in err
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "head_config.json").write_text("{not json")
    (checkpoint / "head.safetensors").write_bytes(b"garbage")
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "ref")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "policy factory reference_policy.policy:make_policy failed" in err
    assert "corrupt" in err


def test_any_environment_drives_the_closed_loop_gate_and_calibrates_the_threshold(tmp_path):
    code, out = build(tmp_path, "image96", "--no-fp16", "--env", f"{POLICIES}:PointArena", "--gate-seeds", "2",
                      "--monitor-check-seeds", "2")
    assert code == 0
    manifest = Bundle.load(out).manifest
    assert manifest["gate"]["environment"] == f"{POLICIES}:PointArena"
    assert manifest["uncertainty"]["source"] == "closed-loop" and "PointArena" in manifest["uncertainty"]["method"]
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert report["closed_loop"]["cpu"]["episodes"] == 2 and report["closed_loop"]["cpu"]["ticks"] == 24
    # The monitor's thresholds come from those successful ticks, windowed, and the gate checks the monitor
    # in the same environment on other seeds, with the failure kinds any environment supports.
    monitor = manifest["monitor"]
    assert "closed loop" in monitor["signals"]["feature_novelty"]["calibrated_on"]
    assert monitor["spread"]["threshold"]["cpu"] == manifest["uncertainty"]["threshold"]["cpu"]
    check = manifest["gate"]["monitor"]
    assert check["seeds"] == 2 and set(check["goals_missed"]) == set(manifest["targets"])
    table = (out / "reports" / "monitor.md").read_text()
    for kind in ("black_frame", "heavy_noise"):
        assert f"| {kind} | 1 |" in table
    assert "| black_at_30 | 0 | - (1 more ended within 3 ticks of the onset)" in table  # 12-step episodes
    rows = json.loads((out / "reports" / "monitor.json").read_text())
    assert rows["cpu"]["in_distribution"]["episodes"] == 2 and rows["cpu"]["black_frame"]["engaged_share"] == 1.0


def test_an_environment_the_runtime_cannot_run_yet_is_refused_naming_why(tmp_path, capsys):
    code, out = build(tmp_path, "two_cameras", "--no-fp16", "--env", f"{POLICIES}:PointArena")
    assert code == 1 and not out.exists()
    assert "cannot run 2 cameras yet; pass --env none" in capsys.readouterr().err


def test_the_replay_gate_hook_gets_a_runner_per_target_and_the_held_out_episodes(tmp_path):
    import cv2

    from build_engines.build import BuildOptions, GateRefused, run_build

    seen = {}

    def replay(runners, episodes):
        sample = episodes[0][0]
        frames = {"image": cv2.resize(sample.frame, (96, 96), interpolation=cv2.INTER_AREA)[None]}
        seen["actions"] = {t: run(frames, sample.instruction, sample.proprio) for t, run in runners.items()}
        seen["episodes"] = [len(e) for e in episodes]
        failures = seen.get("failures", ["cpu: replay action error 0.9 > 0.1"])
        return {"passed": seen.get("pass", True), "failures": failures}

    options = dict(policy=f"{POLICIES}:image96", calib_samples=32, heldout_samples=8, fp16=False, tensorrt="off",
                   env="none", replay_gate=replay)
    run_build(BuildOptions(out=tmp_path / "ok", **options))
    assert set(seen["actions"]) == {"cpu-fp32", "cpu", "cpu-qoperator", "cpu-reduce-range", "tensorrt"}
    assert sum(seen["episodes"]) == 8
    assert seen["actions"]["cpu"].shape == (1, 1, 2)
    np.testing.assert_allclose(seen["actions"]["cpu"], seen["actions"]["cpu-fp32"], atol=0.05)
    seen["pass"] = False
    with pytest.raises(GateRefused, match="replay: cpu: replay action error 0.9"):
        run_build(BuildOptions(out=tmp_path / "refused", **options))
    assert not (tmp_path / "refused").exists()
    # a failure the replay names for an optional candidate leaves that target out instead of refusing
    seen["failures"] = ["cpu-qoperator: replay action error 0.9 > 0.1"]
    run_build(BuildOptions(out=tmp_path / "dropped", **options))
    manifest = Bundle.load(tmp_path / "dropped").manifest
    assert "cpu-qoperator" not in manifest["targets"] and "cpu-reduce-range" in manifest["targets"]
    assert "int8-cpu-qop" not in manifest["graphs"]["vision"]["variants"]
    [dropped] = manifest["gate"]["dropped_targets"]
    assert (dropped["target"], dropped["stage"], dropped["reasons"]) == (
        "cpu-qoperator", "open-loop replay", ["cpu-qoperator: replay action error 0.9 > 0.1"])
    report = json.loads((tmp_path / "dropped" / "reports" / "accuracy.json").read_text())
    assert report["passed"] and report["replay"]["failures"] == []


def test_a_candidate_failing_the_closed_loop_is_left_out(tmp_path, monkeypatch):
    from build_engines import accuracy_gate

    real = accuracy_gate.closed_loop

    def no_success_for_reduce_range(*args, **kwargs):
        results = real(*args, **kwargs)
        results["cpu-reduce-range"].update(successes=0, success_rate=0.0, threshold=float("nan"))
        return results

    monkeypatch.setattr(accuracy_gate, "closed_loop", no_success_for_reduce_range)
    code, out = build(tmp_path, "image96", "--no-fp16", "--env", f"{POLICIES}:PointArena", "--gate-seeds", "2")
    assert code == 0
    manifest = Bundle.load(out).manifest
    assert "cpu-reduce-range" not in manifest["targets"] and "cpu-reduce-range" not in manifest["uncertainty"]["threshold"]
    [dropped] = manifest["gate"]["dropped_targets"]
    assert dropped["stage"] == "closed loop" and "no successful gate episode" in dropped["reasons"][0]
    assert dropped["closed_loop"]["threshold"] is None  # NaN is no JSON: recorded as null
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert "cpu-reduce-range" not in report["closed_loop"] and "cpu-qoperator" in report["closed_loop"]


def test_a_failing_calibration_hook_or_environment_ends_in_one_line(tmp_path, capsys):
    code, _ = build(tmp_path, "broken_calibration")
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "calibration source of tests.build_engines.tiny_policies:broken_calibration failed: OSError" in err
    code, out = build(tmp_path, "image96", "--no-fp16", "--env", f"{POLICIES}:BrokenArena", "--gate-seeds", "1")
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and len(err.strip().splitlines()) == 1
    assert "BrokenArena: the environment failed during the closed-loop gate (RuntimeError: physics exploded)" in err


def test_a_default_environment_the_runtime_cannot_drive_yet_is_skipped_not_faked(tmp_path, caplog):
    code, out = build(tmp_path, "two_cameras_with_a_default_environment", "--no-fp16")
    assert code == 0
    manifest = Bundle.load(out).manifest
    assert manifest["gate"]["environment"] is None and manifest["uncertainty"]["source"] == "held-out"
    assert "closed-loop gate in tests.build_engines.tiny_policies:PointArena skipped" in caplog.text


def test_a_factory_in_the_current_directory_is_found_as_python_m_would(tmp_path, monkeypatch, capsys):
    import sys

    (tmp_path / "my_cwd_policy.py").write_text("def make_policy():\n    return {'vision': None}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.main(["--policy", "my_cwd_policy:make_policy", "--out", str(tmp_path / "b")]) == 1
    # imported (its result is refused), not "cannot import my_cwd_policy"
    assert "my_cwd_policy:make_policy returned dict" in capsys.readouterr().err
