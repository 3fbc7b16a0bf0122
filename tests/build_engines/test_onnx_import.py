"""Importing pre-exported ONNX graphs: spec checks and the head's Dropout nodes rewritten into mask inputs."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from build_engines.onnx_import import OnnxImportError, load_onnx_spec
from build_engines.replay_gate import Observation, onnx_variant
from edge.errors import ConfigError
from tests.build_engines.test_replay_gate import Language, Vision, tokenizer_json

H, A, P = 3, 2, 3


class DropHead(nn.Module):
    def __init__(self, rates=(0.25,), language=False) -> None:
        super().__init__()
        self.language = language
        self.fc1 = nn.Linear(8 + P + (4 if language else 0), 16)
        self.drops = nn.ModuleList(nn.Dropout(r) for r in rates)
        self.mids = nn.ModuleList(nn.Linear(16, 16) for _ in rates[1:])
        self.fc2 = nn.Linear(16, H * A)

    def forward(self, vision_features, *rest):
        h = torch.relu(self.fc1(torch.cat([vision_features, *rest], dim=-1)))
        h = self.drops[0](h)
        for mid, drop in zip(self.mids, self.drops[1:]):
            h = drop(torch.relu(mid(h)))
        return torch.tanh(self.fc2(h)).reshape(-1, H, A)


def export_head(head, path, keep_dropout=True, language=False):
    torch.manual_seed(0)
    head.eval()
    if keep_dropout:
        for module in head.modules():
            if isinstance(module, nn.Dropout):
                module.train()
    args = [torch.zeros(1, 8)] + ([torch.zeros(1, 4)] if language else []) + [torch.zeros(1, P)]
    names = ["vision_features"] + (["language_features"] if language else []) + ["proprio"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, tuple(args), str(path), input_names=names, output_names=["actions"], opset_version=17,
                          dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
    head.eval()
    return path


class PermuteFirst(nn.Module):
    def forward(self, image):  # reads the uint8 image with a Transpose before casting: TensorRT refuses it
        return image.permute(0, 3, 1, 2).float().mean(dim=(2, 3)).repeat(1, 3)[:, :8]


def export_vision(module, path, cameras):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.zeros(1, h, w, 3, dtype=torch.uint8) for _, h, w in cameras), str(path),
                          input_names=[n for n, _, _ in cameras], output_names=["vision_features"], opset_version=17,
                          dynamo=False)
    return path


def write_spec(folder, graphs, cameras=(("front", 12, 16), ("wrist", 16, 16)), horizon=H, rate=0.25, language=None):
    raw = {"graphs": graphs, "name": "imported",
           "cameras": [{"name": n, "height": h, "width": w, "channel_order": "rgb"} for n, h, w in cameras],
           "language": language,
           "proprio": {"names": ["a", "b", "c"], "sources": ["positions[0]", "positions[1]", "positions[2]"]},
           "action": {"names": ["j0", "j1"], "low": [-1.0, -1.0], "high": [1.0, 1.0], "max_slew_per_s": [2.0, 2.0],
                      "horizon": horizon},
           "dropout_rate": rate}
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def vision(tmp_path):
    torch.manual_seed(0)
    return export_vision(Vision(2).eval(), tmp_path / "vision.onnx",
                         [("image_front", 12, 16), ("image_wrist", 16, 16)])


def run_head(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_dropout_becomes_a_mask_input_ones_give_inference_mode_random_masks_sample(tmp_path, vision):
    head = DropHead(rates=(0.25, 0.25))
    export_head(head, tmp_path / "head.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "head.onnx")).graph.node].count("Dropout") == 2
    imported = load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}))
    assert [(m.input, m.width, m.shape) for m in imported.masks] == [("dropout_mask_0", 16, ("T", 16)),
                                                                      ("dropout_mask_1", 16, ("T", 16))]
    rewritten = imported.graphs["head"]
    assert not [n for n in rewritten.graph.node if n.op_type == "Dropout"]
    rng = np.random.default_rng(0)
    base = {"vision_features": rng.normal(size=(1, 8)).astype(np.float32),
            "proprio": rng.normal(size=(1, P)).astype(np.float32)}
    ones = {m.input: np.ones((1, 16), np.float32) for m in imported.masks}
    masked = run_head(rewritten, {**base, **ones})
    inference = run_head(load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}),
                                        uncertainty="none").graphs["head"], base)
    np.testing.assert_array_equal(masked, inference)  # exactly the graph without dropout
    with torch.no_grad():
        expected = head(torch.from_numpy(base["vision_features"]), torch.from_numpy(base["proprio"])).numpy()
    np.testing.assert_allclose(masked, expected, atol=1e-6)
    keep = 0.75
    drawn = {m.input: (rng.random((8, 16)) < keep).astype(np.float32) / keep for m in imported.masks}
    samples = run_head(rewritten, {**base, **drawn})
    assert samples.shape == (8, H, A)  # T is dynamic: eight samples in one run
    assert np.abs(samples - masked).max() > 1e-3
    assert len({samples[i].tobytes() for i in range(8)}) > 1


def test_an_eval_mode_export_is_refused_with_how_to_keep_dropout(tmp_path, vision):
    export_head(DropHead(), tmp_path / "head.onnx", keep_dropout=False)
    spec = write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"})
    with pytest.raises(OnnxImportError, match=r"no Dropout node.*TrainingMode\.PRESERVE.*--uncertainty none"):
        load_onnx_spec(spec)
    imported = load_onnx_spec(spec, uncertainty="none")
    assert imported.masks == ()


def test_the_dropout_ratio_must_be_the_spec_rate(tmp_path, vision):
    export_head(DropHead(rates=(0.1,)), tmp_path / "head.onnx")
    with pytest.raises(OnnxImportError, match=r"Dropout node '.*' has ratio 0.1 but spec.dropout_rate is 0.25"):
        load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}))


def test_a_uint8_input_must_feed_only_a_cast(tmp_path):
    export_vision(PermuteFirst(), tmp_path / "vision.onnx", [("image", 16, 16)])
    export_head(DropHead(), tmp_path / "head.onnx")
    spec = write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}, cameras=(("front", 16, 16),))
    with pytest.raises(OnnxImportError, match=r"uint8 input 'image' feeds Transpose node '.*'; TensorRT requires"):
        load_onnx_spec(spec)


def test_camera_inputs_are_named_sized_and_typed_by_the_spec(tmp_path, vision):
    export_head(DropHead(), tmp_path / "head.onnx")
    graphs = {"vision": "vision.onnx", "head": "head.onnx"}
    with pytest.raises(OnnxImportError, match=r"input 'image_front' is uint8 \[1, 12, 16, 3\], expected uint8 "
                                              r"\[24, 16, 3\] or \[1, 24, 16, 3\]"):
        load_onnx_spec(write_spec(tmp_path, graphs, cameras=(("front", 24, 16), ("wrist", 16, 16))))
    with pytest.raises(OnnxImportError, match=r"input 'image_wrist' is no camera of the spec"):
        load_onnx_spec(write_spec(tmp_path, graphs, cameras=(("front", 12, 16), ("top", 16, 16))))


def test_the_head_output_must_be_the_action_chunk(tmp_path, vision):
    export_head(DropHead(), tmp_path / "head.onnx")
    with pytest.raises(OnnxImportError, match=r"output 'actions' is float32 \[T, 3, 2\], expected \[T, 8, 2\]"):
        load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}, horizon=8))


def test_the_yaml_must_name_the_graphs_the_spec_needs(tmp_path, vision):
    with pytest.raises(ConfigError, match=r"graphs must name \['head', 'vision'\]; missing \['head'\]"):
        load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx"}))
    with pytest.raises(OnnxImportError, match=r"head graph .*head\.onnx \(named in .*policy\.yaml\) does not exist"):
        load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}))


def test_imported_graphs_with_language_run_in_the_replay_gate(tmp_path, vision):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Language().eval(), (torch.zeros(1, 6, dtype=torch.int64), torch.ones(1, 6, dtype=torch.int64)),
                          str(tmp_path / "language.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["language_features"], opset_version=17, dynamo=False)
    export_head(DropHead(language=True), tmp_path / "head.onnx", language=True)
    tokenizer_json(tmp_path / "tok.json")
    imported = load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx",
                                                    "language": "language.onnx"},
                                         language={"tokenizer": "tok.json", "max_tokens": 6}))
    paths = imported.save(tmp_path / "out")
    variant = onnx_variant(paths, imported.spec, tokenizer=imported.tokenizer, mc_samples=8)
    frames = {"front": np.full((12, 16, 3), 90, np.uint8), "wrist": np.full((16, 16, 3), 30, np.uint8)}
    out = variant.run(Observation(frames, np.zeros(P, np.float32), variant.embed("pick the cube")))
    assert out.actions.shape == (H, A) and out.score is not None and out.score > 0


class DeadDropHead(DropHead):
    def forward(self, vision_features, proprio):
        h = torch.relu(self.fc1(torch.cat([vision_features, proprio], dim=-1)))
        out = torch.tanh(self.fc2(h)).reshape(-1, H, A)
        return out + 0.0 * self.drops[0](h).sum()  # the Dropout's result never changes the actions


def test_a_dropout_that_does_not_reach_the_actions_is_refused(tmp_path, vision):
    export_head(DeadDropHead(), tmp_path / "head.onnx")
    assert "Dropout" in [n.op_type for n in onnx.load(str(tmp_path / "head.onnx")).graph.node]
    with pytest.raises(OnnxImportError, match="random dropout masks give .* all equal to the unmasked ones"):
        load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}))


def test_language_and_proprio_widths_are_checked(tmp_path, vision):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Language().eval(), (torch.zeros(1, 6, dtype=torch.int64), torch.ones(1, 6, dtype=torch.int64)),
                          str(tmp_path / "language.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["language_features"], opset_version=17, dynamo=False)
    export_head(DropHead(language=True), tmp_path / "head.onnx", language=True)
    tokenizer_json(tmp_path / "tok.json")
    graphs = {"vision": "vision.onnx", "head": "head.onnx", "language": "language.onnx"}
    with pytest.raises(OnnxImportError, match=r"input 'input_ids' is int64 \[1, 6\], expected int64 \[N, 8\]"):
        load_onnx_spec(write_spec(tmp_path, graphs, language={"tokenizer": "tok.json", "max_tokens": 8}))
    export_head(DropHead(), tmp_path / "plain_head.onnx")
    path = write_spec(tmp_path, {"vision": "vision.onnx", "head": "plain_head.onnx"})
    raw = yaml.safe_load(path.read_text())
    raw["proprio"] = {"names": ["a", "b"], "sources": ["positions[0]", "positions[1]"]}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(OnnxImportError, match=r"input 'proprio' is float32 \[1, 3\], expected float32 \[1, 2\]"):
        load_onnx_spec(path)


class TokenDropHead(DropHead):
    """Dropout on a [1, tokens, width] tensor: the mask is [T, 1, width], shared over the tokens."""

    def forward(self, vision_features, proprio):
        h = torch.relu(self.fc1(torch.cat([vision_features, proprio], dim=-1))).reshape(1, 4, 4)
        h = self.drops[0](h)
        return torch.tanh(self.fc2(h.reshape(-1, 16))).reshape(-1, H, A)


def test_dropout_on_a_token_axis_gets_a_broadcast_mask_and_runs(tmp_path, vision):
    export_head(TokenDropHead(), tmp_path / "head.onnx")
    imported = load_onnx_spec(write_spec(tmp_path, {"vision": "vision.onnx", "head": "head.onnx"}))
    assert [(m.width, m.shape) for m in imported.masks] == [(4, ("T", 1, 4))]
    paths = imported.save(tmp_path / "out")
    variant = onnx_variant(paths, imported.spec, mc_samples=6)
    frames = {"front": np.full((12, 16, 3), 200, np.uint8), "wrist": np.full((16, 16, 3), 10, np.uint8)}
    out = variant.run(Observation(frames, np.ones(P, np.float32), None))
    assert out.actions.shape == (H, A) and out.score > 0
