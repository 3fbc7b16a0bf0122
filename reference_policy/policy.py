"""The reference policy called directly in PyTorch (FP32): the seeds' way, and the accuracy baseline.

Used by training (DAgger rollouts), evaluation and the offline build's accuracy gate. The runtime
path (`edge/`) runs the exported graphs instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge.inference.frames import resize_into
from edge.inference.tokenizer import InstructionTokenizer
from reference_policy.encoders import (
    IMAGE_SIZE_PX,
    load_language_encoder,
    load_vision_encoder,
    tokenizer_path,
)
from reference_policy.model import DEFAULT_CHECKPOINT_DIR, PolicyHead, load_head, ones_masks, sample_masks

VisionFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N,224,224,3] -> float32 [N,196,C]


class TorchPolicy:
    """Frame + instruction + proprio -> normalised wheel-velocity targets, with MC-dropout on demand."""

    def __init__(
        self,
        checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
        head: PolicyHead | None = None,
        vision_fn: VisionFn | None = None,
        mask_seed: int = 0,
    ):
        self.head = head if head is not None else load_head(checkpoint_dir)
        self.head.eval()
        self._vision_module = None if vision_fn is not None else load_vision_encoder()
        self._vision_fn = vision_fn or self._torch_vision
        self.language = load_language_encoder()
        self.tokenizer = InstructionTokenizer(tokenizer_path())
        self._embeddings: dict[str, np.ndarray] = {}
        self._frame = np.zeros((1, IMAGE_SIZE_PX, IMAGE_SIZE_PX, 3), dtype=np.uint8)
        self._rng = np.random.default_rng(mask_seed)
        self._ones = [torch.from_numpy(m) for m in ones_masks(self.head.cfg)]

    def _torch_vision(self, frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._vision_module(torch.from_numpy(frames)).numpy()

    def embed(self, instruction: str) -> np.ndarray:
        cached = self._embeddings.get(instruction)
        if cached is None:
            ids, mask = self.tokenizer.encode(instruction)
            with torch.inference_mode():
                cached = self.language(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            self._embeddings[instruction] = cached
        return cached

    def vision_features(self, frame: np.ndarray) -> np.ndarray:
        resize_into(frame, self._frame[0])
        return self._vision_fn(self._frame)

    def _head(self, vision: np.ndarray, language: np.ndarray, proprio: np.ndarray, masks) -> np.ndarray:
        with torch.inference_mode():
            out = self.head(
                torch.from_numpy(np.ascontiguousarray(vision, dtype=np.float32)),
                torch.from_numpy(language),
                torch.from_numpy(np.asarray(proprio, dtype=np.float32).reshape(1, -1)),
                *masks,
            )
        return out.numpy()

    def act(self, observation) -> np.ndarray:
        """Deterministic action (all-ones masks == eval mode), float32 (action_dim,)."""
        vision = self.vision_features(observation.frame)
        return self._head(vision, self.embed(observation.instruction), observation.proprio, self._ones)[0]

    def act_mc(self, observation, samples: int) -> np.ndarray:
        """T Monte-Carlo samples in one batch: float32 [samples, action_dim]."""
        vision = self.vision_features(observation.frame)
        masks = [torch.from_numpy(m) for m in sample_masks(self.head.cfg, samples, self._rng)]
        return self._head(vision, self.embed(observation.instruction), observation.proprio, masks)

    __call__ = act


# -- the reference policy through the build's public interface (build_engines.policy) -------------------

REFERENCE_ENVIRONMENT = "reference_world.world:TabletopWorld"


class DropoutHead(torch.nn.Module):
    """The reference head with its MC-dropout written as ``nn.Dropout`` modules, as a user's head has it.

    Same weights and the same operations as ``PolicyHead`` called with masks (the build turns each
    nn.Dropout back into ``h * mask``), so the exported graph and its numerics are unchanged."""

    def __init__(self, head: PolicyHead):
        super().__init__()
        self.head = head
        self.dropouts = torch.nn.ModuleList(torch.nn.Dropout(head.cfg.dropout_p)
                                            for _ in range(head.cfg.dropout_layers))

    def forward(self, vision: torch.Tensor, language: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        h = self.head.features(vision, language, proprio)
        for i, layer in enumerate([None, *self.head.hidden]):
            if layer is not None:
                h = layer(h)
            h = self.dropouts[i](h)
        return torch.tanh(self.head.action_out(h))


def reference_spec(head: PolicyHead):
    from edge.inference.spec import PolicySpec

    cfg = head.cfg
    return PolicySpec.from_dict({
        "name": "reference-vla",
        "cameras": [{"name": "front", "height": IMAGE_SIZE_PX, "width": IMAGE_SIZE_PX, "channel_order": "bgr"}],
        "language": {"tokenizer": "tokenizer.json", "max_tokens": 32},
        "proprio": {"names": ["left_wheel_vel", "right_wheel_vel"][: cfg.proprio_dim],
                    "sources": [f"velocities[{i}]" for i in range(cfg.proprio_dim)]},
        "action": {"names": ["left_wheel", "right_wheel"][: cfg.action_dim], "horizon": 1,
                   "kinds": ["velocity"] * cfg.action_dim, "low": [-1.0] * cfg.action_dim,
                   "high": [1.0] * cfg.action_dim, "max_slew_per_s": [4.0] * cfg.action_dim},
        "dropout_rate": cfg.dropout_p,
    })


def make_policy(checkpoint: Path | None = None):
    """The reference VLA policy as a `build-engines --policy` factory (the build's default)."""
    from build_engines.policy import Policy
    from reference_policy.calibration_data import ReferenceWorldSource
    from reference_world.instructions import OBJECT_NAMES, TRAINING_TEMPLATES

    directory = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT_DIR
    head = load_head(directory)
    return Policy(
        spec=reference_spec(head),
        vision=load_vision_encoder(),
        language=load_language_encoder(),
        head=DropoutHead(head),
        tokenizer_file=tokenizer_path(),
        calibration=ReferenceWorldSource,
        environment=REFERENCE_ENVIRONMENT,
        instructions=[t.format(object=o) for o in OBJECT_NAMES for t in TRAINING_TEMPLATES],
        held_out_instructions=["could you make your way over to the red block", "approach the blue ball please"],
        checkpoint=directory,
    )
