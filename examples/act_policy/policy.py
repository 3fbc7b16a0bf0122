"""The ACT-style example policy through the build's public interface, and its PyTorch chunk policy.

    build-engines --int8 --policy examples.act_policy.policy:make_policy --out artifacts/bundle-act

It reuses the reference policy's frozen pretrained encoders (EfficientNet-Lite0 vision, MiniLM language),
as a user reuses pretrained encoders, but at its own input size (256 x 192, the camera's 4:3 aspect) and
with its own head, which returns a chunk of H = 16 wheel commands.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge.inference.frames import resize_into
from edge.inference.spec import PolicySpec
from edge.inference.tokenizer import InstructionTokenizer
from examples.act_policy.model import CHECKPOINT_DIR, ActChunkHead, ActConfig, load_head
from reference_policy.encoders import MAX_TOKENS, load_language_encoder, load_vision_encoder, tokenizer_path

ENVIRONMENT = "reference_world.world:TabletopWorld"  # the simulator of the reference task

VisionFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N, height, width, 3] -> float32 [N, tokens, C]


def act_spec(cfg: ActConfig) -> PolicySpec:
    return PolicySpec.from_dict({
        "name": "act-chunks",
        "cameras": [{"name": "front", "height": cfg.image_height, "width": cfg.image_width, "channel_order": "bgr"}],
        "language": {"tokenizer": "tokenizer.json", "max_tokens": MAX_TOKENS},
        "proprio": {"names": ["left_wheel_vel", "right_wheel_vel"][: cfg.proprio_dim],
                    "sources": [f"velocities[{i}]" for i in range(cfg.proprio_dim)]},
        "action": {"names": ["left_wheel", "right_wheel"][: cfg.action_dim], "horizon": cfg.horizon,
                   "kinds": ["velocity"] * cfg.action_dim, "low": [-1.0] * cfg.action_dim,
                   "high": [1.0] * cfg.action_dim, "max_slew_per_s": [4.0] * cfg.action_dim},
        "dropout_rate": cfg.dropout_p,
    })


def make_policy(checkpoint: Path | None = None):
    """`build-engines --policy examples.act_policy.policy:make_policy` (``--checkpoint DIR`` for another head)."""
    from build_engines.policy import Policy
    from reference_policy.calibration_data import ReferenceWorldSource
    from reference_world.instructions import OBJECT_NAMES, TRAINING_TEMPLATES

    directory = Path(checkpoint) if checkpoint is not None else CHECKPOINT_DIR
    head = load_head(directory)
    return Policy(
        spec=act_spec(head.cfg),
        vision=load_vision_encoder(),
        language=load_language_encoder(),
        head=head,
        tokenizer_file=tokenizer_path(),
        calibration=ReferenceWorldSource,
        environment=ENVIRONMENT,
        instructions=[t.format(object=o) for o in OBJECT_NAMES for t in TRAINING_TEMPLATES],
        held_out_instructions=["could you make your way over to the red block", "approach the blue ball please"],
        checkpoint=directory,
    )


class TorchChunkPolicy:
    """Frame + instruction + proprio -> the deterministic chunk [H, action_dim], in PyTorch (FP32).

    Used by training (DAgger rollouts) and the offline evaluation; the runtime runs the exported graphs."""

    def __init__(self, head: ActChunkHead, vision_fn: VisionFn | None = None):
        self.head = head.eval()
        cfg = head.cfg
        self._vision_module = None if vision_fn is not None else load_vision_encoder()
        self._vision_fn = vision_fn or self._torch_vision
        self.language = load_language_encoder()
        self.tokenizer = InstructionTokenizer(tokenizer_path())
        self._embeddings: dict[str, np.ndarray] = {}
        self._frame = np.zeros((1, cfg.image_height, cfg.image_width, 3), dtype=np.uint8)

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

    def chunk(self, observation) -> np.ndarray:
        resize_into(observation.frame, self._frame[0])
        vision = self._vision_fn(self._frame)
        with torch.inference_mode():
            out = self.head(torch.from_numpy(np.ascontiguousarray(vision, dtype=np.float32)),
                            torch.from_numpy(self.embed(observation.instruction)),
                            torch.from_numpy(np.asarray(observation.proprio, np.float32).reshape(1, -1)))
        return out.numpy()[0]


class ChunkExecutor:
    """obs -> action: a new chunk every `replan_every` steps, its steps executed in between (a policy for
    reference_world.episodes.run_episode). An observation of step 0 starts a new episode (so does reset())."""

    def __init__(self, chunk_fn: Callable[[object], np.ndarray], replan_every: int):
        if replan_every < 1:
            raise ValueError(f"replan_every must be >= 1, got {replan_every}")
        self.chunk_fn = chunk_fn
        self.replan_every = replan_every
        self.replans = 0
        self.reset()

    def reset(self) -> None:
        self._chunk: np.ndarray | None = None
        self._index = 0

    def __call__(self, observation) -> np.ndarray:
        new_episode = getattr(observation, "step", None) == 0
        if new_episode or self._chunk is None or self._index >= min(self.replan_every, len(self._chunk)):
            self._chunk = np.asarray(self.chunk_fn(observation), np.float32)
            self._index = 0
            self.replans += 1
        action = self._chunk[self._index]
        self._index += 1
        return action
