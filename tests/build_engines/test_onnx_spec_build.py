"""Pre-exported ONNX graphs through `build-engines --onnx-spec`: tiny graphs exported on the fly (at batch 1,
Dropout kept) build into a bundle like a --policy factory does, gated on a LeRobot dataset; a bad YAML, a
missing file and data that does not fit the spec end in one line before any graph is built."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from build_engines import cli
from edge.inference.bundle import Bundle
from tests.build_engines.test_onnx_import import (
    DropHead,
    Language,
    TokenDropHead,
    Vision,
    export_head,
    export_vision,
    tokenizer_json,
    write_spec,
)

pytest.importorskip("av")
pytest.importorskip("pyarrow")

from tests.calibration.lerobot_writer import write_dataset  # noqa: E402  (needs av and pyarrow)

SMALL = ["--int8", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off", "--log-level", "WARNING"]
CAMERAS = [("image_front", 12, 16), ("image_wrist", 16, 16)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # the writer's cameras observation.images.front (24x32, resized to 12x16) and .wrist, state 3, action 2
    return write_dataset(tmp_path_factory.mktemp("lerobot") / "ds", lengths=(10,) * 6, episodes_per_file=3)


@pytest.fixture
def graphs(tmp_path):
    """vision (two cameras, exported at a fixed batch of 1), language and a head with one nn.Dropout."""
    torch.manual_seed(0)
    vision = Vision(2).eval()
    export_vision(vision, tmp_path / "vision.onnx", CAMERAS)
    language = Language().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(language, (torch.zeros(1, 6, dtype=torch.int64), torch.ones(1, 6, dtype=torch.int64)),
                          str(tmp_path / "language.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["sentence"], opset_version=17, dynamo=False)
    head = DropHead(language=True)
    export_head(head, tmp_path / "head.onnx", language=True)
    tokenizer_json(tmp_path / "tok.json")
    spec = write_spec(tmp_path, {"vision": "vision.onnx", "language": "language.onnx", "head": "head.onnx"},
                      language={"tokenizer": "tok.json", "max_tokens": 6})
    return spec, vision, language, head


def build(out, *extra):
    return cli.main(["--out", str(out), *SMALL, *extra])


def test_pre_exported_graphs_build_a_bundle_gated_on_a_lerobot_dataset(tmp_path, graphs, dataset):
    spec_file, vision, language, head = graphs
    out = tmp_path / "bundle"
    assert build(out, "--onnx-spec", str(spec_file), "--calib-source", str(dataset.root),
                 "--heldout-fraction", "0.34") == 0
    bundle = Bundle.load(out)  # hashes, digest and schema
    manifest = bundle.manifest
    assert manifest["policy"]["factory"] == "build_engines.onnx_import:load_onnx_spec"
    assert manifest["policy"]["onnx_spec"] == "policy.yaml"
    assert set(manifest["policy"]["checkpoint_sha256"]) == {"policy.yaml", "vision.onnx", "language.onnx",
                                                           "head.onnx", "tok.json"}
    io = {g: {s.name: list(s.shape) for s in (*bundle.graphs[g].inputs, *bundle.graphs[g].outputs)}
          for g in bundle.graphs}
    # the export contract: a dynamic batch (the graph was exported at 1), the runtime's tensor names
    assert io["vision"] == {"image_front": [-1, 12, 16, 3], "image_wrist": [-1, 16, 16, 3],
                            "vision_features": [-1, 8]}
    assert io["language"]["language_features"] == [-1, 4]  # renamed from 'sentence'
    assert io["head"] == {"vision_features": [1, 8], "language_features": [1, 4], "proprio": [1, 3],
                          "dropout_mask_0": [-1, 16], "actions": [-1, 3, 2]}
    assert set(manifest["graphs"]["head"]["variants"]) == {"fp32", "fp16", "int8-cpu", "int8-cpu-qop", "int8-cpu-rr",
                                                           "int8-tensorrt"}
    assert manifest["dropout"]["widths"] == [16] and manifest["dropout"]["rate"] == 0.25
    replay = json.loads((out / "reports" / "accuracy.json").read_text())["replay"]
    assert replay["passed"] and replay["horizon"] == 3 and replay["steps"] == 20
    assert manifest["uncertainty"]["threshold"]["cpu"] == replay["variants"]["cpu"]["score"]["threshold"] > 0

    # the bundle's graphs compute what the user's modules do; masks of ones are the inference-mode head
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for _, h, w in CAMERAS]
    run = {g: ort.InferenceSession(str(bundle.graph_path(g, "fp32")), providers=["CPUExecutionProvider"])
           for g in bundle.graphs}
    features = run["vision"].run(None, dict(zip(("image_front", "image_wrist"), frames)))[0]
    ids, mask = np.asarray([[2, 3, 4, 0, 0, 0]]), np.asarray([[1, 1, 1, 0, 0, 0]])
    sentence = run["language"].run(None, {"input_ids": ids, "attention_mask": mask})[0]
    proprio = rng.normal(size=(1, 3)).astype(np.float32)
    actions = run["head"].run(None, {"vision_features": features[:1], "language_features": sentence,
                                     "proprio": proprio, "dropout_mask_0": np.ones((5, 16), np.float32)})[0]
    with torch.no_grad():
        expected_features = vision(*(torch.from_numpy(f) for f in frames)).numpy()
        expected = head.eval()(torch.from_numpy(expected_features[:1]),
                               language(torch.from_numpy(ids), torch.from_numpy(mask)), torch.from_numpy(proprio))
    np.testing.assert_allclose(features, expected_features, atol=1e-5)
    assert actions.shape == (5, 3, 2)
    np.testing.assert_allclose(actions, np.broadcast_to(expected.numpy(), actions.shape), atol=1e-5)


def test_a_broadcast_token_dropout_becomes_a_plain_mask_input_of_the_bundle(tmp_path, dataset):
    torch.manual_seed(0)
    export_vision(Vision(2).eval(), tmp_path / "vision.onnx", CAMERAS)
    export_head(TokenDropHead(), tmp_path / "head.onnx")
    spec_file = write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"})
    out = tmp_path / "bundle"
    assert build(out, "--no-fp16", "--onnx-spec", str(spec_file), "--calib-source", str(dataset.root),
                 "--heldout-fraction", "0.34") == 0
    bundle = Bundle.load(out)
    assert {s.name: list(s.shape) for s in bundle.graphs["head"].inputs}["dropout_mask_0"] == [-1, 4]
    session = ort.InferenceSession(str(bundle.graph_path("head", "int8-cpu")), providers=["CPUExecutionProvider"])
    keep = 0.75
    masks = (np.random.default_rng(0).random((6, 4)) < keep).astype(np.float32) / keep
    actions = session.run(None, {"vision_features": np.ones((1, 8), np.float32), "proprio": np.ones((1, 3), np.float32),
                                 "dropout_mask_0": masks})[0]
    assert actions.shape == (6, 3, 2) and len({a.tobytes() for a in actions}) > 1  # T samples that differ


def test_a_head_without_dropout_needs_uncertainty_none(tmp_path, dataset, capsys):
    torch.manual_seed(0)
    export_vision(Vision(2).eval(), tmp_path / "vision.onnx", CAMERAS)
    export_head(DropHead(), tmp_path / "head.onnx", keep_dropout=False)  # eval mode: torch drops nn.Dropout
    spec_file = write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"})
    common = ["--no-fp16", "--onnx-spec", str(spec_file), "--calib-source", str(dataset.root)]
    assert build(tmp_path / "refused", *common) == 1
    assert "has no Dropout node" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    out = tmp_path / "bundle"
    assert build(out, *common, "--uncertainty", "none") == 0
    bundle = Bundle.load(out)
    assert [list(s.shape) for s in bundle.graphs["head"].outputs] == [[1, 3, 2]]
    assert bundle.manifest["uncertainty"]["signal"] == "none" and bundle.dropout["mask_inputs"] == []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("build-engines: error:"), err
    return err


def test_a_bad_yaml_a_missing_file_or_data_that_does_not_fit_end_in_one_line(tmp_path, graphs, dataset, capsys):
    spec_file = graphs[0]
    out = tmp_path / "bundle"
    broken = tmp_path / "broken.yaml"
    broken.write_text("graphs: {vision: vision.onnx\nname: [")
    assert build(out, "--onnx-spec", str(broken), "--calib-source", str(dataset.root)) == 1
    assert "broken.yaml cannot be read as YAML" in _one_line(capsys)
    assert build(out, "--onnx-spec", str(tmp_path / "nowhere.yaml"), "--calib-source", str(dataset.root)) == 1
    assert "nowhere.yaml does not exist" in _one_line(capsys)
    raw = yaml.safe_load(spec_file.read_text())
    raw["graphs"]["head"] = "missing_head.onnx"
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(raw))
    assert build(out, "--onnx-spec", str(missing), "--calib-source", str(dataset.root)) == 1
    assert "missing_head.onnx (named in" in _one_line(capsys)
    assert build(out, "--onnx-spec", str(spec_file)) == 1  # no data: pre-exported graphs bring none
    assert "pass --calib-source" in _one_line(capsys)
    assert build(out, "--onnx-spec", str(spec_file), "--policy", "tests.build_engines.tiny_policies:image96") == 1
    assert "give one of them" in _one_line(capsys)
    other = write_dataset(tmp_path / "other", lengths=(4, 4), action_dim=3)
    assert build(out, "--onnx-spec", str(spec_file), "--calib-source", str(other.root)) == 1
    assert "feature 'action' has 3 values, the spec's action channels has 2" in _one_line(capsys)
    top = write_dataset(tmp_path / "top", lengths=(4, 4), cameras=(("observation.images.top", 16, 16),))
    assert build(out, "--onnx-spec", str(spec_file), "--calib-source", str(top.root)) == 1
    assert "no video feature for the spec's camera 'front'" in _one_line(capsys)
    assert not out.exists()


def test_a_head_exported_with_its_own_mask_inputs_builds_and_is_not_silently_deterministic(tmp_path, dataset,
                                                                                          capsys):
    from tests.build_engines.test_replay_gate import Head

    torch.manual_seed(0)
    export_vision(Vision(2).eval(), tmp_path / "vision.onnx", CAMERAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head multiplies its hidden layer by an input mask [T, 16]
        torch.onnx.export(Head(3, language=False).eval(), (torch.zeros(1, 8), torch.zeros(1, 3), torch.ones(2, 16)),
                          str(tmp_path / "head.onnx"), input_names=["vision_features", "proprio", "dropout_mask_0"],
                          output_names=["actions"], opset_version=17, dynamo=False)
    spec_file = write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"})
    common = ["--no-fp16", "--onnx-spec", str(spec_file), "--calib-source", str(dataset.root),
              "--heldout-fraction", "0.34"]
    assert build(tmp_path / "none", *common, "--uncertainty", "none") == 1
    assert "has dropout mask inputs ['dropout_mask_0'] but --uncertainty is none" in _one_line(capsys)
    out = tmp_path / "bundle"
    assert build(out, *common) == 0
    bundle = Bundle.load(out)
    assert {s.name: list(s.shape) for s in bundle.graphs["head"].inputs}["dropout_mask_0"] == [-1, 16]
    assert bundle.manifest["uncertainty"]["threshold"]["cpu"] > 0
