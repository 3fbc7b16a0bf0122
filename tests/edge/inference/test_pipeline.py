"""The runtime policy pipeline on ONNX Runtime with a real reference bundle.

The head's outputs are compared with an independent NumPy re-implementation of the head, computed from
the committed checkpoint's weights with the same masks: mean and spread must agree.
"""

import time

import numpy as np
import pytest

from edge.errors import ConfigError, InputError
from edge.inference.bundle import Bundle
from edge.inference.pipeline import EmbeddingCache, PolicyPipeline
from reference_world.world import TabletopWorld


def _numpy_head(weights, vision, language, proprio, masks):
    def linear(x, name):
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    def layer_norm(x, name, eps=1e-5):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * weights[f"{name}.weight"] + weights[f"{name}.bias"]

    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    tokens = linear(vision, "token_proj") + weights["position"]
    gamma, beta = np.split(linear(language, "film")[:, None, :], 2, axis=-1)
    tokens = relu(linear(layer_norm(tokens, "token_norm") * (1 + gamma) + beta, "token_mlp.0"))
    d = tokens.shape[-1]
    queries = np.concatenate([weights["static_queries"][None], linear(language, "language_query")[:, None]], axis=1)
    logits = queries @ tokens.transpose(0, 2, 1) / np.sqrt(d)
    attention = np.exp(logits - logits.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    side = int(round(np.sqrt(tokens.shape[1])))
    ys, xs = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    grid = np.stack([xs.ravel(), ys.ravel()], -1)
    pooled = np.concatenate([attention @ tokens, attention @ grid], -1).reshape(1, -1)
    maps = linear(tokens, "keypoint_maps").transpose(0, 2, 1) * np.exp(weights["keypoint_temperature"])[:, None]
    maps = np.exp(maps - maps.max(-1, keepdims=True))
    keypoints = ((maps / maps.sum(-1, keepdims=True)) @ grid).reshape(1, -1)
    p = relu(linear(relu(linear(proprio, "proprio_mlp.0")), "proprio_mlp.2"))
    fused = np.concatenate([pooled, keypoints, p, relu(linear(language, "language_proj.0"))], -1)
    h = relu(linear(fused, "trunk.0")) * masks[0]
    h = relu(linear(h, "hidden.0.0")) * masks[1]
    return np.tanh(linear(h, "action_out"))


@pytest.fixture(scope="module")
def bundle(reference_bundle):
    return Bundle.load(reference_bundle[0])


@pytest.fixture(scope="module")
def observation():
    world = TabletopWorld()
    obs = world.reset(123)
    for _ in range(3):
        obs = world.step([0.5, 0.2])
    return obs


def test_mc_mean_and_spread_match_numpy_head(bundle, observation):
    from safetensors.numpy import load_file

    from reference_policy.model import DEFAULT_CHECKPOINT_DIR, HEAD_WEIGHTS_FILE

    weights = {k: v.astype(np.float64) for k, v in load_file(str(DEFAULT_CHECKPOINT_DIR / HEAD_WEIGHTS_FILE)).items()}
    with PolicyPipeline(bundle, target="cpu-fp32", mc_samples=16, mask_seed=5) as pipeline:
        embedding = pipeline.cache.encode_now(observation.instruction)
        out = pipeline.infer(observation.frame, observation.proprio, embedding)
        features = pipeline.backends["head"].input("vision_features").astype(np.float64)
        masks = [pipeline.backends["head"].input(f"dropout_mask_{i}")[:16].astype(np.float64) for i in range(2)]
        expected = _numpy_head(weights, features, embedding.astype(np.float64),
                               observation.proprio[None].astype(np.float64), masks)
        # a single-step policy is a chunk of one step: samples [T, 1, A], actions and spread [1, A]
        assert out.samples.shape == (16, 1, 2) and out.actions.shape == (1, 2) and out.spread.shape == (1, 2)
        np.testing.assert_allclose(out.samples[:, 0], expected, atol=2e-4)
        np.testing.assert_allclose(out.action, expected.mean(0), atol=2e-4)
        np.testing.assert_allclose(out.actions[0], expected.mean(0), atol=2e-4)
        np.testing.assert_allclose(out.spread[0], expected.std(0), atol=2e-4)
        assert out.score == pytest.approx(np.sqrt(np.mean(expected.std(0) ** 2)) / 2.0, abs=2e-4)
        assert out.score > 0 and out.score_per_step.shape == (1,)
        assert out.score_per_step[0] == pytest.approx(out.score, rel=1e-5)


def test_t1_ones_mask_is_the_deterministic_policy(bundle, observation):
    from reference_policy.policy import TorchPolicy

    torch_policy = TorchPolicy()
    expected = torch_policy.act(observation)
    with PolicyPipeline(bundle, target="cpu-fp32", mc_samples=1) as pipeline:
        pipeline.set_mc_samples(1, deterministic=True)
        embedding = pipeline.cache.encode_now(observation.instruction)
        out = pipeline.infer(observation.frame, observation.proprio, embedding)
    np.testing.assert_allclose(out.action, expected, atol=1e-3)
    assert out.score == 0.0


def test_int8_cpu_target_close_to_fp32(bundle, observation):
    actions = {}
    for target in ("cpu-fp32", "cpu"):
        with PolicyPipeline(bundle, target=target, mc_samples=8, mask_seed=1) as pipeline:
            embedding = pipeline.cache.encode_now(observation.instruction)
            actions[target] = pipeline.infer(observation.frame, observation.proprio, embedding).action.copy()
    assert np.abs(actions["cpu"] - actions["cpu-fp32"]).max() < 0.15


def test_embedding_cache_seeded_async_and_refusals(bundle):
    with PolicyPipeline(bundle, target="cpu", mc_samples=4) as pipeline:
        known = bundle.manifest["embeddings"]["instructions"][0]
        assert pipeline.embedding(known) is not None  # precomputed: no encoder call
        assert pipeline.cache.encoded == 0
        new = "please go over to the blue ball"
        assert pipeline.embedding(new) is None  # queued, the caller does not wait
        for _ in range(500):
            vector = pipeline.embedding(new)
            if vector is not None:
                break
            time.sleep(0.01)
        assert vector is not None and vector.shape == (1, 384)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-3
        too_long = "go to the red block " * 20
        assert pipeline.embedding(too_long) is None
        for _ in range(500):
            if pipeline.cache.error(too_long) is not None:
                break
            time.sleep(0.01)
        with pytest.raises(InputError, match="at most 32"):
            pipeline.embedding(too_long)


def test_bad_frame_and_sample_count(bundle):
    with pytest.raises(ConfigError, match="mc_samples"):
        PolicyPipeline(bundle, target="cpu", mc_samples=1000)
    with PolicyPipeline(bundle, target="cpu", mc_samples=2) as pipeline:
        embedding = np.zeros((1, 384), np.float32)
        with pytest.raises(InputError, match="uint8"):
            pipeline.infer(np.zeros((240, 320, 3), np.float32), np.zeros(2, np.float32), embedding)


def test_lru_capacity():
    calls = []
    cache = EmbeddingCache(lambda t: calls.append(t) or np.ones((1, 2), np.float32), capacity=2)
    for text in ("a", "b", "c"):
        cache.encode_now(text)
    assert cache.request("a") is None  # evicted, re-queued
    assert cache.request("c") is not None
