"""The open-loop replay gate on tiny ONNX graphs exported on the fly and a tiny LeRobot dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from build_engines.errors import BuildError, GateRefused
from build_engines.replay_gate import (
    Observation,
    ReplayTolerances,
    ReplayVariant,
    RunnerOutput,
    conformal_threshold,
    onnx_variant,
    refuse_unless_passed,
    replay_gate,
)
from calibration.lerobot import LeRobotEpisodes
from edge.inference.spec import PolicySpec
from tests.calibration.lerobot_writer import write_dataset

WORDS = ["[PAD]", "[UNK]", "pick", "the", "cube", "open", "drawer"]


def make_spec(horizon=3, language=None, cameras=(("front", 12, 16), ("wrist", 16, 16))) -> PolicySpec:
    return PolicySpec.from_dict({
        "name": "tiny",
        "cameras": [{"name": n, "height": h, "width": w, "channel_order": "rgb"} for n, h, w in cameras],
        "language": language,
        "proprio": {"names": ["a", "b", "c"], "sources": ["positions[0]", "positions[1]", "positions[2]"]},
        "action": {"names": ["j0", "j1"], "low": [-1.0, -2.0], "high": [1.0, 2.0], "max_slew_per_s": [2.0, 2.0],
                   "horizon": horizon},
        "dropout_rate": 0.25,
    })


class Vision(nn.Module):
    def __init__(self, cameras: int) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * cameras, 8)

    def forward(self, *images: torch.Tensor) -> torch.Tensor:  # uint8 [1, H, W, 3] each
        return self.proj(torch.cat([i.float().mean(dim=(1, 2)) / 255.0 for i in images], dim=-1))


class Language(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(WORDS), 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.float()[..., None]
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Head(nn.Module):
    def __init__(self, horizon: int, language: bool) -> None:
        super().__init__()
        self.horizon = horizon
        self.language = language
        self.fc1 = nn.Linear(8 + (4 if language else 0) + 3, 16)
        self.fc2 = nn.Linear(16, horizon * 2)

    def forward(self, vision, *rest):
        language, proprio, mask = rest if self.language else (None, *rest)
        parts = [vision, language, proprio] if self.language else [vision, proprio]
        h = torch.relu(self.fc1(torch.cat(parts, dim=-1))) * mask  # [1, 16] * [T, 16] -> [T, 16]
        out = torch.tanh(self.fc2(h))
        return out.reshape(-1, self.horizon, 2) if self.horizon > 1 else out


def export(module, args, inputs, outputs, path, dynamic=None):
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=17,
                      dynamo=False, dynamic_axes=dynamic or {})
    return path


def tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def export_policy(folder, spec, head: Head, language: bool):
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    cameras = [spec.camera_input(c) for c in spec.cameras]
    images = tuple(torch.zeros(1, c.height, c.width, 3, dtype=torch.uint8) for c in spec.cameras)
    vision = Vision(len(cameras)).eval()
    graphs = {"vision": export(vision, images, cameras, ["vision_features"], folder / "vision.onnx")}
    head_args = [torch.zeros(1, 8)] + ([torch.zeros(1, 4)] if language else []) + [torch.zeros(1, 3),
                                                                                    torch.ones(2, 16)]
    head_inputs = ["vision_features"] + (["language_features"] if language else []) + ["proprio", "dropout_mask_0"]
    graphs["head"] = export(head.eval(), tuple(head_args), head_inputs, ["actions"], folder / "head.onnx",
                            {"dropout_mask_0": {0: "T"}, "actions": {0: "T"}})
    if language:
        graphs["language"] = export(Language().eval(), (torch.zeros(1, 6, dtype=torch.int64),
                                                         torch.ones(1, 6, dtype=torch.int64)),
                                    ["input_ids", "attention_mask"], ["language_features"], folder / "language.onnx")
    return graphs, vision


def perturbed(head: Head, scale: float) -> Head:
    copy = Head(head.horizon, head.language)
    copy.load_state_dict(head.state_dict())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in copy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return copy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay")
    written = write_dataset(folder / "ds", lengths=(4, 3, 4, 3), episodes_per_file=2)
    spec = make_spec(language={"tokenizer": str(tokenizer_json(folder / "tok.json")), "max_tokens": 6})
    torch.manual_seed(0)
    head = Head(spec.action.horizon, language=True)
    return folder, written, spec, head


def test_onnx_variants_replayed_on_lerobot_episodes(world):
    folder, written, spec, head = world
    dataset = LeRobotEpisodes(written.root, spec)
    fp32, vision = export_policy(folder / "fp32", spec, head, language=True)
    close, _ = export_policy(folder / "int8", spec, perturbed(head, 1e-3), language=True)
    far, _ = export_policy(folder / "broken", spec, perturbed(head, 0.5), language=True)
    variants = {name: onnx_variant(g, spec, tokenizer=spec.language.tokenizer, mc_samples=8)
                for name, g in (("fp32", fp32), ("int8", close), ("broken", far))}

    # The runner reproduces the torch policy with masks of ones.
    step = dataset.load_episode(1)[2]
    embedding = variants["fp32"].embed(step.instruction)
    out = variants["fp32"].run(Observation(step.images, step.proprio, embedding))
    with torch.no_grad():
        features = vision(*(torch.from_numpy(step.images[c.name])[None] for c in spec.cameras))
        expected = head(features, torch.from_numpy(embedding), torch.from_numpy(step.proprio)[None],
                        torch.ones(1, 16))[0].numpy()
    np.testing.assert_allclose(out.actions, expected, atol=1e-5)
    assert out.score is not None and out.score > 0

    report = replay_gate(variants, dataset, [0, 1, 2, 3], spec,
                         ReplayTolerances(max_mean_abs_vs_reference=0.01, max_abs_vs_reference=0.05,
                                          false_alarm_rate=0.1))
    assert report["steps"] == sum(written.lengths)
    fp32_entry, int8, broken = (report["variants"][n] for n in ("fp32", "int8", "broken"))
    assert fp32_entry["vs_reference"]["max_abs_overall"] == 0.0
    assert 0 < int8["vs_reference"]["max_abs_overall"] < 0.05
    assert broken["vs_reference"]["worst_mean_abs"] > 0.01
    assert len(int8["vs_recorded"]["mean_abs"]) == spec.action.horizon
    assert fp32_entry["score"]["count"] == report["steps"] and fp32_entry["score"]["threshold"] is not None
    assert not report["passed"]
    assert all(f.startswith("broken:") for f in report["failures"]) and report["failures"]
    with pytest.raises(GateRefused, match="broken: mean error vs the reference") as refused:
        refuse_unless_passed(report)
    assert refused.value.report["variants"].keys() == {"fp32", "int8", "broken"}
    import json

    json.dumps(report)  # the report is JSON-able as it is


def test_language_free_single_camera_head_without_chunks(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(3, 3), cameras=(("observation.images.top", 16, 16),))
    spec = make_spec(horizon=1, cameras=(("top", 16, 16),))
    graphs, _ = export_policy(tmp_path, spec, Head(1, language=False), language=False)
    variant = onnx_variant(graphs, spec, mc_samples=4)
    assert variant.embed is None
    report = replay_gate({"fp32": variant}, LeRobotEpisodes(written.root, spec), [0, 1], spec,
                         ReplayTolerances(false_alarm_rate=0.2))
    assert report["variants"]["fp32"]["vs_recorded"]["values"] == 6 * 2
    assert report["passed"], report["failures"]


def constant(value, score=None):
    def run(observation: Observation):
        return RunnerOutput(actions=np.full((3, 2), value), score=score)
    return ReplayVariant(run=run)


def test_errors_per_chunk_step_are_normalised_by_the_action_range(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(4, 2))
    spec = make_spec()  # ranges 2 and 4
    dataset = LeRobotEpisodes(written.root, spec)
    report = replay_gate({"fp32": constant(0.0), "other": constant(0.1)}, dataset, [0, 1], spec)
    other = report["variants"]["other"]
    np.testing.assert_allclose(other["vs_reference"]["mean_abs"], [(0.05 + 0.025) / 2] * 3, atol=1e-6)
    np.testing.assert_allclose(other["vs_reference"]["max_abs"], [0.05] * 3, atol=1e-6)
    ranges = np.asarray([2.0, 4.0])
    for h in range(3):  # recorded step t + h, where the episode has it
        errors = np.concatenate([np.abs(a[h:]) / ranges for a in written.action])
        assert report["variants"]["fp32"]["vs_recorded"]["mean_abs"][h] == pytest.approx(errors.mean(), abs=1e-6)
        assert report["variants"]["fp32"]["vs_recorded"]["max_abs"][h] == pytest.approx(errors.max(), abs=1e-6)
    tight = replay_gate({"fp32": constant(0.0), "other": constant(0.1)}, dataset, [0, 1], spec,
                        ReplayTolerances(max_mean_abs_vs_reference=0.01))
    assert tight["failures"] == ["other: mean error vs the reference 0.0375 of the action range > 0.01"]


def test_conformal_threshold_rank_and_too_few_scores(tmp_path):
    scores = list(np.random.default_rng(0).permutation(np.arange(1.0, 20.0)))
    assert conformal_threshold(scores, 0.1) == 18.0  # ceil(20 * 0.9) = 18th smallest
    assert conformal_threshold(scores[:5], 0.1) is None
    written = write_dataset(tmp_path / "ds", lengths=(2, 2))
    spec = make_spec()
    report = replay_gate({"fp32": constant(0.0, score=0.3)}, LeRobotEpisodes(written.root, spec), [0, 1], spec,
                         ReplayTolerances(false_alarm_rate=0.05))
    assert report["variants"]["fp32"]["score"]["threshold"] is None
    assert "needs at least 19" in report["failures"][0] and "hold out more episodes" in report["failures"][0]
    assert math.isclose(ReplayTolerances().false_alarm_rate, 0.05)


def test_a_runner_of_the_wrong_shape_is_named(tmp_path):
    written = write_dataset(tmp_path / "ds", lengths=(2,))
    spec = make_spec()
    bad = ReplayVariant(run=lambda observation: np.zeros((2, 2)))
    with pytest.raises(BuildError, match=r"variant 'fp32' returned actions of shape \[2, 2\].*expected \[3, 2\]"):
        replay_gate({"fp32": bad}, LeRobotEpisodes(written.root, spec), [0], spec)
    with pytest.raises(BuildError, match="reference variant 'fp32'"):
        replay_gate({"int8": bad}, LeRobotEpisodes(written.root, spec), [0], spec)


def test_a_lerobot_dataset_calibrates_int8_graphs_and_gates_them_on_held_out_episodes(tmp_path):
    from build_engines.quantize import calibrate, quantize_for_cpu
    from build_engines.replay_gate import OnnxPolicy
    from calibration.episodes import split_episodes

    written = write_dataset(tmp_path / "ds", lengths=(4, 3, 5, 4, 3, 4), episodes_per_file=3)
    spec = make_spec(language={"tokenizer": str(tokenizer_json(tmp_path / "tok.json")), "max_tokens": 6})
    dataset = LeRobotEpisodes(written.root, spec)
    split = split_episodes(dataset.episode_ids(), held_out_fraction=0.34, seed=0)
    torch.manual_seed(0)
    fp32, _ = export_policy(tmp_path / "fp32", spec, Head(spec.action.horizon, language=True), language=True)
    policy = OnnxPolicy(fp32, spec, tokenizer=spec.language.tokenizer)
    steps = [s for e in split.calibration for s in dataset.load_episode(e)]
    feeds = policy.calibration_feeds(steps)
    assert len(feeds["vision"]) == len(steps) and feeds["head"][0]["dropout_mask_0"].shape == (8, 16)
    int8 = dict(fp32)
    for role in ("vision", "head"):
        ranges = calibrate(fp32[role], feeds[role], "minmax", tmp_path / f"work_{role}")
        int8[role] = quantize_for_cpu(fp32[role], ranges, tmp_path / f"{role}_int8.onnx")
    variants = {"fp32": onnx_variant(fp32, spec, tokenizer=spec.language.tokenizer, mc_samples=8),
                "int8": onnx_variant(int8, spec, tokenizer=spec.language.tokenizer, mc_samples=8)}
    report = replay_gate(variants, dataset, split.held_out, spec, ReplayTolerances(false_alarm_rate=0.2))
    assert report["episodes"] == list(split.held_out)
    assert report["steps"] == sum(written.lengths[e] for e in split.held_out)
    error = report["variants"]["int8"]["vs_reference"]
    assert 0 < error["max_abs_overall"] < 0.1  # quantised, so not identical, and within the default tolerances
    assert report["passed"], report["failures"]
