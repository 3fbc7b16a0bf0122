"""The pipeline runs bundles of other shapes than the reference policy's (tests/edge/tiny_bundles.py):
two cameras, no language, no proprio, action chunks, a 7-DoF arm, a head without dropout. Outputs are
checked against the bundle's own reference inputs/outputs and against its head graph run directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from edge.errors import BundleError, ConfigError, InputError
from edge.inference.bundle import Bundle, write_manifest_digest
from edge.inference.pipeline import PolicyPipeline


def reference(bundle: Bundle, graph: str, what: str) -> dict[str, np.ndarray]:
    """The build's reference arrays of `graph`: what = "inputs" or a variant's outputs ("fp32_outputs")."""
    with np.load(bundle.path(f"reference/{graph}_{what}.npz")) as data:
        return {name: data[name] for name in data.files}


def reference_call(bundle: Bundle):
    """infer()'s arguments from the bundle's reference inputs: the first frame of each camera, the head's
    proprio and language features (the head's reference inputs were computed from those same frames)."""
    spec = bundle.spec
    vision = reference(bundle, "vision", "inputs")
    head = reference(bundle, "head", "inputs")
    frames = [vision[spec.camera_input(c)][0] for c in spec.cameras]
    proprio = head["proprio"][0] if spec.proprio.dim else np.zeros(0, np.float32)
    return frames, proprio, head.get("language_features")


def head_graph(bundle: Bundle, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(bundle.graph_path("head", "fp32")), providers=["CPUExecutionProvider"])
    return session.run(["actions"], feeds)[0]


def test_outputs_have_the_shapes_of_the_spec(shaped_bundle):
    spec = shaped_bundle.spec
    horizon, dim = spec.action.horizon, spec.action.dim
    frames, proprio, language = reference_call(shaped_bundle)
    with PolicyPipeline(shaped_bundle, target="cpu") as pipeline:
        assert pipeline.cameras == spec.cameras and pipeline.horizon == horizon and pipeline.action_dim == dim
        assert pipeline.proprio_dim == spec.proprio.dim and pipeline.needs_language == (spec.language is not None)
        assert pipeline.has_uncertainty == (shaped_bundle.manifest["uncertainty"]["signal"] == "mc-dropout")
        out = pipeline.infer(frames, proprio, language)
        samples = pipeline.samples
        assert samples == (16 if pipeline.has_uncertainty else 1)
        assert out.actions.shape == (horizon, dim) and out.spread.shape == (horizon, dim)
        assert out.samples.shape == (samples, horizon, dim) and out.score_per_step.shape == (horizon,)
        assert out.actions.dtype == out.spread.dtype == out.score_per_step.dtype == np.float32
        assert out.action.shape == (dim,) and np.shares_memory(out.action, out.actions)
        np.testing.assert_array_equal(out.action, out.actions[0])
        np.testing.assert_allclose(out.actions, out.samples.mean(0), atol=1e-6)
        np.testing.assert_allclose(out.spread, out.samples.std(0), atol=1e-6)
        if pipeline.has_uncertainty:
            assert out.score > 0 and np.all(out.score_per_step > 0)
        else:
            assert out.score == 0.0 and not out.spread.any() and not out.score_per_step.any()
        buffers = (out.actions, out.spread, out.score_per_step)
        again = pipeline.infer(frames, proprio, language)
        assert again is out and (again.actions, again.spread, again.score_per_step) == buffers  # no new buffers


def test_the_score_covers_the_steps_that_will_be_executed(tiny_bundle_dir):
    bundle = Bundle.load(tiny_bundle_dir("arm7"))
    frames, proprio, _ = reference_call(bundle)
    with PolicyPipeline(bundle, target="cpu-fp32", mc_samples=32, mask_seed=3) as pipeline:
        assert pipeline.score_steps == 8  # all of the chunk by default
        out = pipeline.infer(frames, proprio, None)
        full = out.score
        square = out.spread.astype(np.float64) ** 2
        assert full == pytest.approx(np.sqrt(square.mean()) / 2.0, rel=1e-5)  # action range 2 (-1..1)
        np.testing.assert_allclose(out.score_per_step, np.sqrt(square.mean(1)) / 2.0, rtol=1e-5)
        for steps in (1, 3):
            pipeline.score_steps = steps
            out = pipeline.infer(frames, proprio, None)
            square = out.spread.astype(np.float64) ** 2
            assert out.score == pytest.approx(np.sqrt(square[:steps].mean()) / 2.0, rel=1e-5)
            assert out.score == pytest.approx(np.sqrt(np.mean(out.score_per_step[:steps].astype(np.float64) ** 2)),
                                              rel=1e-4)
        assert out.score != pytest.approx(float(np.sqrt(square.mean())) / 2.0, rel=1e-3)  # not the whole chunk
        for bad in (0, 9, 2.5, True):
            with pytest.raises(ConfigError, match=r"score_steps must be an integer in 1\.\.8"):
                pipeline.score_steps = bad


@pytest.mark.parametrize("name", ["arm7", "chunk", "no_uncertainty"])
def test_ones_masks_give_the_graphs_deterministic_outputs(tiny_bundle_dir, name):
    bundle = Bundle.load(tiny_bundle_dir(name))
    frames, proprio, language = reference_call(bundle)
    head_inputs = reference(bundle, "head", "inputs")
    with PolicyPipeline(bundle, target="cpu-fp32") as pipeline:
        pipeline.set_mc_samples(1, deterministic=True)
        out = pipeline.infer(frames, proprio, language)
        # every camera's frame reached its own input: the vision features are the build's reference
        np.testing.assert_allclose(pipeline.backends["head"].input("vision_features")[0],
                                   reference(bundle, "vision", "fp32_outputs")["vision_features"][0], atol=1e-5)
    masks = [m for m in head_inputs if m.startswith("dropout_mask_")]
    if not masks:  # no dropout: the stored reference output is the policy's output
        expected = reference(bundle, "head", "fp32_outputs")["actions"]
    else:
        expected = head_graph(bundle, {**head_inputs, **{m: np.ones_like(head_inputs[m][:1]) for m in masks}})
    np.testing.assert_allclose(out.actions, expected.reshape(out.actions.shape), atol=1e-5)
    assert out.score == 0.0 and out.samples.shape == (1, *out.actions.shape)


def test_mc_samples_are_the_head_graph_with_the_masks_the_pipeline_drew(tiny_bundle_dir):
    bundle = Bundle.load(tiny_bundle_dir("chunk"))
    frames, proprio, _ = reference_call(bundle)
    with PolicyPipeline(bundle, target="cpu-fp32", mc_samples=8, mask_seed=11) as pipeline:
        first = pipeline.infer(frames, proprio, None).samples.copy()
        head = pipeline.backends["head"]
        feeds = {"vision_features": head.input("vision_features").copy(),
                 **{f"dropout_mask_{i}": head.input(f"dropout_mask_{i}")[:8].copy() for i in range(2)}}
        masks = feeds["dropout_mask_0"]
        assert set(np.unique(masks)) <= {0.0, np.float32(1 / 0.9)} and (masks == 0).any()
        second = pipeline.infer(frames, proprio, None).samples.copy()
    np.testing.assert_allclose(first, head_graph(bundle, feeds), atol=1e-5)
    assert not np.allclose(first, second)  # new masks every inference


def test_inputs_that_do_not_fit_the_policy_are_refused_naming_what_to_pass(tiny_bundle_dir):
    arm = Bundle.load(tiny_bundle_dir("arm7"))
    frames, proprio, _ = reference_call(arm)
    with PolicyPipeline(arm, target="cpu", mc_samples=2) as pipeline:
        with pytest.raises(InputError, match=r"2 camera\(s\) \(cam0, cam1\); got 1 frame"):
            pipeline.infer(frames[0], proprio, None)
        with pytest.raises(InputError, match=r"proprio must have 14 values \(p0, .*p13\), got shape \[7\]"):
            pipeline.infer(frames, proprio[:7], None)
        with pytest.raises(InputError, match="takes no instruction .*pass language=None"):
            pipeline.infer(frames, proprio, np.zeros((1, 16), np.float32))
        with pytest.raises(InputError, match="takes no instruction"):
            pipeline.embedding("go to the red block")
        with pytest.raises(InputError, match="uint8"):
            pipeline.infer([frames[0].astype(np.float32), frames[1]], proprio, None)
    plain = Bundle.load(tiny_bundle_dir("no_uncertainty"))
    with pytest.raises(ConfigError, match="must be 1 for this bundle, got 16: it was built with --uncertainty none"):
        PolicyPipeline(plain, target="cpu", mc_samples=16)
    with PolicyPipeline(plain, target="cpu") as pipeline:
        assert pipeline.samples == 1 and not pipeline.has_uncertainty
        with pytest.raises(ConfigError, match="must be 1 for a bundle without uncertainty"):
            pipeline.set_mc_samples(4)
        frames, proprio, language = reference_call(plain)
        with pytest.raises(InputError, match="conditioned on an instruction"):
            pipeline.infer(frames, proprio, None)
        with pytest.raises(InputError, match=r"language embedding must be float \[16\]"):
            pipeline.infer(frames, proprio, np.zeros((1, 8), np.float32))
    chunk = Bundle.load(tiny_bundle_dir("chunk"))
    with PolicyPipeline(chunk, target="cpu", mc_samples=2) as pipeline:
        frames, _, _ = reference_call(chunk)
        assert pipeline.infer(frames, None, None).actions.shape == (4, 3)  # no proprio: none to pass
        with pytest.raises(InputError, match=r"proprio must have 0 values \(none\)"):
            pipeline.infer(frames, np.zeros(2, np.float32), None)


def edited(source, tmp_path, change):
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    write_manifest_digest(copy)  # a deliberate edit that the schema accepts: only the pipeline's check is left
    return Bundle.load(copy)


def _head_input(manifest, name):
    return next(s for s in manifest["graphs"]["head"]["inputs"] if s["name"] == name)


@pytest.mark.parametrize("change, message", [
    (lambda m: _head_input(m, "proprio").update(shape=[1, 13]),
     r"head proprio is float32 \[1, 13\], expected float32 \[1, 14\]"),
    (lambda m: m["graphs"]["vision"]["inputs"][1].update(name="image_side"),
     r"the vision graph has no input image_cam1; the vision graph has unexpected inputs image_side"),
    (lambda m: m["graphs"]["vision"]["inputs"][0].update(shape=[-1, 64, 48, 3]),
     r"vision image_cam0 is uint8 \[N, 64, 48, 3\], expected uint8 \[N, 64, 64, 3\]"),
    (lambda m: m["graphs"]["head"]["outputs"][0].update(shape=[-1, 4, 7]),
     r"head actions is float32 \[T, 4, 7\], expected float32 \[T, 8, 7\] \(spec.action: horizon 8, 7 channels\)"),
    (lambda m: m["dropout"].update(mask_inputs=["dropout_mask_0"], widths=[32]),
     r"the head graph has unexpected inputs dropout_mask_1"),
    (lambda m: m["uncertainty"].update(signal="none", threshold={}),
     r"its uncertainty signal is none but the manifest lists dropout masks"),
])
def test_a_bundle_whose_graphs_do_not_fit_its_spec_is_refused_before_any_device(tiny_bundle_dir, tmp_path, change,
                                                                                 message):
    bundle = edited(tiny_bundle_dir("arm7"), tmp_path, change)
    with pytest.raises(BundleError, match=message) as error:
        PolicyPipeline(bundle, target="cpu")
    assert "Rebuild it with: build-engines" in str(error.value)
