"""MC-dropout for any head: nn.Dropout layers found in call order and replaced by mask inputs that
reproduce dropout exactly (ones = the eval-mode head), for heads of several structures."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from build_engines.errors import PolicyError
from build_engines.mc_dropout import MaskedHead, check_rate, find_dropouts, sample_masks


class CalledOutOfOrder(nn.Module):
    """`late` is defined first but runs second: masks follow the call order."""

    def __init__(self):
        super().__init__()
        self.late = nn.Dropout(0.2)
        self.first = nn.Linear(6, 10)
        self.early = nn.Dropout(0.2)
        self.second = nn.Linear(10, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x, proprio):
        h = self.early(torch.relu(self.first(torch.cat([x, proprio], -1))))
        return self.out(self.late(torch.relu(self.second(h))))


class TokenHead(nn.Module):
    """Dropout on a rank-3 activation [1, H, width] (a chunk of H steps)."""

    def __init__(self):
        super().__init__()
        self.steps = nn.Parameter(torch.randn(5, 7))
        self.project = nn.Linear(4, 7)
        self.blocks = nn.ModuleDict({"drop": nn.Dropout(0.5)})
        self.readout = nn.Linear(7, 2)

    def forward(self, x):
        tokens = self.project(x).unsqueeze(1) + self.steps
        return self.readout(self.blocks["drop"](tokens))


def test_dropouts_are_found_in_call_order_with_their_widths():
    head = CalledOutOfOrder()
    layers = find_dropouts(head, (torch.zeros(1, 4), torch.zeros(1, 2)))
    assert [(layer.module, layer.width) for layer in layers] == [("early", 10), ("late", 4)]
    assert check_rate(layers, 0.2) == 0.2
    nested = find_dropouts(TokenHead(), (torch.zeros(1, 4),))
    assert [(layer.module, layer.width) for layer in nested] == [("blocks.drop", 7)]


def test_ones_masks_give_the_eval_head_and_other_masks_drop_exactly_those_units():
    torch.manual_seed(0)
    head = CalledOutOfOrder().eval()
    x, proprio = torch.randn(1, 4), torch.randn(1, 2)
    layers = find_dropouts(head, (x, proprio))
    masked = MaskedHead(head, layers)
    ones = [torch.ones(3, layer.width) for layer in layers]
    with torch.inference_mode():
        expected = head(x, proprio)
        np.testing.assert_allclose(masked(x, proprio, *ones).numpy(), expected.expand(3, -1).numpy(), atol=1e-6)
        masks = [torch.from_numpy(m) for m in sample_masks(layers, 0.2, 3, np.random.default_rng(1))]
        got = masked(x, proprio, *masks)
        h = torch.relu(head.first(torch.cat([x, proprio], -1))) * masks[0]
        manual = head.out(torch.relu(head.second(h)) * masks[1])
    np.testing.assert_allclose(got.numpy(), manual.numpy(), atol=1e-6)
    assert float(got.std(0).max()) > 0  # the samples differ: the masks act
    assert set(np.unique(masks[0].numpy())) <= {0.0, np.float32(1 / 0.8)}


def test_a_rank_three_dropout_broadcasts_masks_over_the_chunk_and_exports(tmp_path):
    torch.manual_seed(0)
    head = TokenHead().eval()
    x = torch.randn(1, 4)
    layers = find_dropouts(head, (x,))
    masked = MaskedHead(head, layers)
    masks = sample_masks(layers, 0.5, 4, np.random.default_rng(0))
    with torch.inference_mode():
        got = masked(x, torch.from_numpy(masks[0]))
        tokens = head.project(x).unsqueeze(1) + head.steps
        manual = head.readout(tokens * torch.from_numpy(masks[0]).unsqueeze(1))
    assert got.shape == (4, 5, 2)
    np.testing.assert_allclose(got.numpy(), manual.numpy(), atol=1e-6)
    path = tmp_path / "head.onnx"
    torch.onnx.export(masked, (x, torch.from_numpy(masks[0])), str(path), input_names=["x", "dropout_mask_0"],
                      output_names=["actions"], dynamic_axes={"dropout_mask_0": {0: "T"}, "actions": {0: "T"}},
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    three = sample_masks(layers, 0.5, 3, np.random.default_rng(2))[0]
    out = session.run(None, {"x": x.numpy(), "dropout_mask_0": three})[0]
    with torch.inference_mode():
        expected = masked(x, torch.from_numpy(three)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_heads_that_cannot_get_masks_are_refused_with_the_reason():
    shared = nn.Dropout(0.1)
    twice = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), shared)
    with pytest.raises(PolicyError, match="runs more than once"):
        find_dropouts(twice, (torch.zeros(1, 3),))
    channel = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout2d(0.1))
    with pytest.raises(PolicyError, match="Dropout2d.*--uncertainty none"):
        find_dropouts(channel, (torch.zeros(1, 3, 4, 4),))
    mixed = find_dropouts(nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 3), nn.Dropout(0.3)), (torch.zeros(1, 3),))
    with pytest.raises(PolicyError, match="different rates"):
        check_rate(mixed, 0.1)
    layers = find_dropouts(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)), (torch.zeros(1, 3),))
    with pytest.raises(PolicyError, match="set spec.dropout_rate to 0.1"):
        check_rate(layers, None)


def test_the_reference_head_through_the_interface_computes_what_it_always_did():
    from reference_policy.model import load_head
    from reference_policy.model import sample_masks as reference_masks
    from reference_policy.policy import DropoutHead

    head = load_head()
    cfg = head.cfg
    torch.manual_seed(0)
    args = (torch.randn(1, cfg.vision_tokens, cfg.vision_channels), torch.randn(1, cfg.language_dim),
            torch.randn(1, cfg.proprio_dim))
    wrapped = DropoutHead(head)
    layers = find_dropouts(wrapped, args)
    assert [layer.width for layer in layers] == [cfg.width] * cfg.dropout_layers
    assert check_rate(layers, cfg.dropout_p) == cfg.dropout_p
    masks = [torch.from_numpy(m) for m in reference_masks(cfg, 5, np.random.default_rng(3))]
    with torch.inference_mode():
        np.testing.assert_array_equal(MaskedHead(wrapped, layers)(*args, *masks).numpy(), head(*args, *masks).numpy())
