"""The ACT-style example policy: its factory through the public interface, its spec, chunk shapes, MC-dropout
masks, chunk execution and the expert's chunk labels. Small and fast: no bundle is built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.act_policy.model import ActChunkHead, ActConfig, CheckpointError, load_head, save_head
from examples.act_policy.policy import ChunkExecutor, act_spec
from examples.act_policy.train import expert_chunk, step_weights
from reference_world.expert import expert_action
from reference_world.world import TabletopWorld

FACTORY = "examples.act_policy.policy:make_policy"


def _inputs(cfg: ActConfig, batch: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.randn(batch, cfg.vision_tokens, cfg.vision_channels, generator=generator)
    language = torch.nn.functional.normalize(torch.randn(batch, cfg.language_dim, generator=generator), dim=-1)
    return vision, language, torch.zeros(batch, cfg.proprio_dim)


def test_factory_builds_through_the_public_interface_with_a_chunk_spec():
    from build_engines.mc_dropout import find_dropouts
    from build_engines.policy import load_policy, probe

    policy = load_policy(FACTORY)
    spec = policy.spec
    assert spec.action.horizon == 16 and spec.action.dim == 2
    assert [(c.height, c.width) for c in spec.cameras] == [(192, 256)]  # not the reference's 224 x 224
    assert spec.action.kinds == ("velocity", "velocity")
    assert spec.language is not None and policy.tokenizer_file.is_file()
    assert policy.environment == "reference_world.world:TabletopWorld" and policy.calibration is not None
    shapes, head_args = probe(policy)
    assert shapes["vision_features"] == (1, 12 * 16, 112)  # a 16 x 12 token grid
    assert shapes["actions"] == (1, 16, 2)
    layers = find_dropouts(policy.head, head_args)
    assert [layer.width for layer in layers] == [policy.head.cfg.width] * 2
    assert {layer.rate for layer in layers} == {spec.dropout_rate}


def test_spec_round_trips_through_its_dict_form():
    from edge.inference.spec import PolicySpec

    spec = act_spec(ActConfig())
    assert PolicySpec.from_dict(spec.to_dict()) == spec


def test_masked_head_gives_t_chunks_and_ones_reproduce_the_deterministic_chunk():
    from build_engines.mc_dropout import MaskedHead, find_dropouts, sample_masks

    cfg = ActConfig()
    torch.manual_seed(0)
    head = ActChunkHead(cfg).eval()
    args = _inputs(cfg)
    layers = find_dropouts(head, args)
    masked = MaskedHead(head, layers)
    with torch.inference_mode():
        deterministic = head(*args)
        ones = masked(*args, *[torch.ones(1, layer.width) for layer in layers])
        masks = sample_masks(layers, cfg.dropout_p, 8, np.random.default_rng(0))
        samples = masked(*args, *[torch.from_numpy(m) for m in masks])
    assert deterministic.shape == (1, cfg.horizon, cfg.action_dim)
    torch.testing.assert_close(ones, deterministic)
    assert samples.shape == (8, cfg.horizon, cfg.action_dim)
    assert torch.all(samples.abs() <= 1.0)
    assert samples.std(dim=0).mean() > 0  # the masks change the chunk: MC-dropout has a spread


def test_chunk_steps_differ_and_depend_on_the_input():
    cfg = ActConfig()
    torch.manual_seed(1)
    head = ActChunkHead(cfg).eval()
    with torch.inference_mode():
        a = head(*_inputs(cfg, seed=1))[0]
        b = head(*_inputs(cfg, seed=2))[0]
    assert not torch.allclose(a[0], a[-1])  # the step queries make the steps of one chunk differ
    assert not torch.allclose(a, b)


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    cfg = ActConfig(width=32, token_dim=16, keypoints=4)
    head = ActChunkHead(cfg)
    save_head(head, tmp_path / "ckpt", {"command": "test"})
    loaded = load_head(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    for key, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="examples.act_policy.train"):
        load_head(tmp_path / "missing")
    (tmp_path / "ckpt" / "head_config.json").write_text('{"head": {"horizon": 16, "colour": 3}}')
    with pytest.raises(CheckpointError, match="colour"):
        load_head(tmp_path / "ckpt")


class _Obs:
    def __init__(self, step):
        self.step = step


def test_chunk_executor_runs_the_chunk_between_replans():
    calls = []

    def chunk_fn(obs):
        calls.append(obs.step)
        return np.arange(16 * 2, dtype=np.float32).reshape(16, 2) + 100 * len(calls)

    executor = ChunkExecutor(chunk_fn, replan_every=4)
    actions = [executor(_Obs(step)) for step in range(10)]
    assert calls == [0, 4, 8]
    np.testing.assert_array_equal(actions[1], [102.0, 103.0])  # step 1 of the first chunk
    np.testing.assert_array_equal(actions[4], [200.0, 201.0])  # a new chunk entered at its step 0
    executor(_Obs(0))  # a new episode replans at once, mid-chunk
    assert calls[-1] == 0 and len(calls) == 4
    with pytest.raises(ValueError, match="replan_every"):
        ChunkExecutor(chunk_fn, replan_every=0)


def test_expert_chunk_is_the_experts_own_rollout_and_leaves_the_world_alone():
    world = TabletopWorld()
    world.reset(123)
    for _ in range(3):
        world.step(np.array([0.4, -0.2], np.float32))
    pose, steps = world.pose, world.steps
    chunk = expert_chunk(world, 16)
    assert chunk.shape == (16, 2) and chunk.dtype == np.float32
    np.testing.assert_allclose(chunk[0], expert_action(world))
    assert world.pose == pose and world.steps == steps  # the look-ahead ran on a copy
    # The chunk's actions are what the expert does when it keeps driving: replay them on the real world.
    for h in range(4):
        np.testing.assert_allclose(chunk[h], expert_action(world), atol=1e-6)
        world.step(chunk[h])


def test_expert_chunk_is_zero_after_the_target_is_reached():
    world = TabletopWorld()
    world.reset(7)
    while not world.done:
        world.step(expert_action(world))
    assert world.success
    world.reset(7)
    steps_to_target = 0
    while not world.success:
        world.step(expert_action(world))
        steps_to_target += 1
    world.reset(7)
    for _ in range(steps_to_target - 3):
        world.step(expert_action(world))
    chunk = expert_chunk(world, 16)
    assert np.all(chunk[:3] != 0) and np.all(chunk[3:] == 0)


def test_step_weights_favour_the_executed_steps():
    weights = step_weights(16).flatten()
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.all(weights[:4] > weights[4:].max())
