"""The head's dropout-mask contract (docs/architecture.md, "Contracts: Export contract") and checkpoint handling."""

import numpy as np
import pytest
import torch

from reference_policy.model import (
    CheckpointError,
    HeadConfig,
    PolicyHead,
    load_head,
    ones_masks,
    sample_masks,
    save_head,
    uncertainty_score,
)

CFG = HeadConfig()


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return PolicyHead(CFG).eval()


def inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    vision = torch.randn(batch, CFG.vision_tokens, CFG.vision_channels, generator=g).relu()
    language = torch.nn.functional.normalize(torch.randn(batch, CFG.language_dim, generator=g), dim=-1)
    proprio = torch.rand(batch, CFG.proprio_dim, generator=g) * 2 - 1
    return vision, language, proprio


def as_torch(masks):
    return [torch.from_numpy(m) for m in masks]


def test_ones_mask_equals_eval_mode(head):
    with torch.inference_mode():
        eval_out = head(*inputs())
        ones_out = head(*inputs(), *as_torch(ones_masks(CFG)))
    assert eval_out.shape == (1, CFG.action_dim)
    torch.testing.assert_close(ones_out, eval_out, atol=1e-6, rtol=0)


def test_t_samples_in_one_batch_match_one_at_a_time(head):
    masks = sample_masks(CFG, 16, np.random.default_rng(3))
    with torch.inference_mode():
        batched = head(*inputs(), *as_torch(masks))
        single = torch.cat([head(*inputs(), *as_torch([m[i : i + 1] for m in masks])) for i in range(16)])
    assert batched.shape == (16, CFG.action_dim)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    assert batched.std(0).max() > 0  # different masks -> different samples


def test_same_masks_give_same_outputs_and_bounds(head):
    masks = as_torch(sample_masks(CFG, 8, np.random.default_rng(7)))
    with torch.inference_mode():
        a = head(*inputs(1), *masks)
        b = head(*inputs(1), *masks)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0


def test_mask_values_and_shapes():
    masks = sample_masks(CFG, 32, np.random.default_rng(0))
    assert len(masks) == CFG.dropout_layers
    for m in masks:
        assert m.shape == (32, CFG.width) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, np.float32(1.0 / (1.0 - CFG.dropout_p))}
        assert abs(float((m == 0).mean()) - CFG.dropout_p) < 0.02


def test_wrong_mask_count_is_refused(head):
    with pytest.raises(ValueError, match="dropout masks"):
        head(*inputs(), torch.ones(1, CFG.width))


def test_uncertainty_score():
    assert uncertainty_score(np.zeros((8, 2), np.float32)) == 0.0
    spread = np.array([[-1, -1], [1, 1]], np.float32)  # std 1 per dim over a range of 2
    assert uncertainty_score(spread) == pytest.approx(0.5)


def test_checkpoint_round_trip_and_errors(tmp_path, head):
    save_head(head, tmp_path / "ckpt", {"seed": 1})
    loaded = load_head(tmp_path / "ckpt")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(*inputs()), head(*inputs()))
    with pytest.raises(CheckpointError, match="missing"):
        load_head(tmp_path / "nothing")
    (tmp_path / "ckpt" / "head.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_head(tmp_path / "ckpt")


def test_committed_checkpoint_loads():
    head = load_head()
    assert head.cfg.dropout_layers == 2 and head.cfg.width == CFG.width
