"""MC-dropout for any torch head: every ``nn.Dropout`` becomes a multiplication by an explicit mask input.

The exported head graph takes one mask per dropout layer, ``dropout_mask_<i>`` float32 [T, width]
(values 0 or 1/(1-p); ones give the deterministic policy), in the order the layers run. The layers are
found by a forward pass that records each dropout's input, so the user's head needs no change.

Everything before the first dropout runs once at batch 1; the mask's leading T dimension broadcasts the
activations to T Monte-Carlo samples. A mask [T, width] drops units of the last (feature) dimension;
for an activation with more dimensions ([1, S, width], e.g. a chunk of H steps or tokens) the same
units are dropped across the middle dimensions of one sample.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from build_engines.errors import PolicyError


@dataclass(frozen=True)
class DropoutLayer:
    module: str  # qualified name in the head
    width: int
    rate: float

    def to_dict(self) -> dict:
        return {"module": self.module, "width": self.width, "rate": self.rate}


# Dropout variants whose mask is not elementwise over the feature dimension: a [T, width] mask would not
# reproduce them, so they are refused rather than approximated.
_UNSUPPORTED = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def find_dropouts(head: nn.Module, args: tuple[torch.Tensor, ...]) -> list[DropoutLayer]:
    """The head's nn.Dropout layers in call order, with the width of their input (one forward pass)."""
    for name, module in head.named_modules():
        if isinstance(module, _UNSUPPORTED):
            raise PolicyError(f"head module {name} is {type(module).__name__}; only nn.Dropout (elementwise) "
                              "can become an MC-dropout mask input: use nn.Dropout or --uncertainty none")
    calls: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in head.named_modules():
        if type(module) is nn.Dropout:
            hooks.append(module.register_forward_hook(
                lambda mod, inputs, output, name=name: calls.append((name, tuple(inputs[0].shape)))))
    try:
        with torch.inference_mode():
            head.eval()(*args)
    finally:
        for hook in hooks:
            hook.remove()
    modules = dict(head.named_modules())
    seen = set()
    layers = []
    for name, shape in calls:
        if name in seen:
            raise PolicyError(f"head dropout {name} runs more than once per forward pass; give each use its "
                              "own nn.Dropout so that each gets its own mask")
        seen.add(name)
        if len(shape) < 2 or shape[0] != 1:
            raise PolicyError(f"head dropout {name} sees an input of shape {shape}; MC-dropout needs [1, ..., "
                              "width] (batch 1 before the first dropout)")
        layers.append(DropoutLayer(name, int(shape[-1]), float(modules[name].p)))
    return layers


class MaskDropout(nn.Module):
    """``x * mask`` with the mask broadcast over x's middle dimensions: [1, ..., W] -> [T, ..., W]."""

    def __init__(self, owner: MaskedHead, index: int):
        super().__init__()
        self.index = index
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._owner.current_masks[self.index]
        if x.ndim > 2:
            mask = mask.reshape(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])
        return x * mask


class MaskedHead(nn.Module):
    """A copy of the user's head whose dropouts read their masks from the extra trailing inputs."""

    def __init__(self, head: nn.Module, layers: list[DropoutLayer]):
        super().__init__()
        self.head = copy.deepcopy(head).eval()
        self.inputs = None
        self.current_masks: tuple[torch.Tensor, ...] = ()
        self.layers = layers
        for index, layer in enumerate(layers):
            parent_name, _, child = layer.module.rpartition(".")
            parent = self.head.get_submodule(parent_name) if parent_name else self.head
            setattr(parent, child, MaskDropout(self, index))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        count = len(self.layers)
        inputs, masks = args[: len(args) - count], args[len(args) - count:]
        self.current_masks = masks
        try:
            return self.head(*inputs)
        finally:
            self.current_masks = ()


def check_rate(layers: list[DropoutLayer], spec_rate: float | None) -> float:
    rates = sorted({layer.rate for layer in layers})
    if len(rates) != 1:
        raise PolicyError(f"head dropouts have different rates {rates}; MC-dropout masks use one rate "
                          "(spec.dropout_rate): give every nn.Dropout the same p")
    if spec_rate is None or abs(spec_rate - rates[0]) > 1e-9:
        raise PolicyError(f"head dropouts have rate {rates[0]} but spec.dropout_rate is {spec_rate}; set "
                          f"spec.dropout_rate to {rates[0]}")
    return rates[0]


def sample_masks(layers: list[DropoutLayer], rate: float, samples: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """T Monte-Carlo masks per layer: 0 or 1/(1-p), float32 [T, width]."""
    keep = np.float32(1.0 - rate)
    return [(rng.random((samples, layer.width)) < keep).astype(np.float32) / keep for layer in layers]
