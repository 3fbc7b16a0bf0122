"""Train the reference policy's fusion + action head by imitation of the scripted expert.

Deterministic under --seed. The encoders are frozen, so their features are computed once per frame
(through an ONNX Runtime export of the same vision module, several times faster than eager PyTorch
on a small CPU) and the head trains on them. Two stages:

1. expert demonstrations, part of them with perturbed execution (the expert's label is kept while
   noisy actions are executed, so the data shows how to recover from off-course states);
2. DAgger: the trained policy drives, the expert labels the states it visits, and the head is
   retrained on everything.

Reproduce the committed checkpoint with:  python -m reference_policy.train
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from edge.inference.frames import resize_into
from edge.inference.tokenizer import InstructionTokenizer
from reference_policy.encoders import (
    IMAGE_SIZE_PX,
    VisionEncoder,
    load_language_encoder,
    load_vision_encoder,
    tokenizer_path,
)
from reference_policy.model import (
    DEFAULT_CHECKPOINT_DIR,
    HeadConfig,
    PolicyHead,
    save_head,
)
from reference_policy.policy import TorchPolicy
from reference_world.expert import expert_action
from reference_world.instructions import OBJECT_NAMES, TRAINING_TEMPLATES
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)

# Seeds below this are training episodes; evaluation uses seeds at and above it.
EVAL_SEED_BASE = 1_000_000
JPEG_QUALITY = 90  # the simulated camera streams MJPEG at this quality


class OrtVision:
    """The frozen vision encoder exported once to ONNX and run with ONNX Runtime (FP32)."""

    def __init__(self, encoder: VisionEncoder, workdir: Path, threads: int = 0):
        import onnxruntime as ort

        path = workdir / "vision_fp32.onnx"
        dummy = torch.zeros((1, IMAGE_SIZE_PX, IMAGE_SIZE_PX, 3), dtype=torch.uint8)
        torch.onnx.export(
            encoder,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["vision_features"],
            dynamic_axes={"image": {0: "batch"}, "vision_features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": frames})[0]


@dataclass
class Demonstrations:
    vision: list[np.ndarray] = field(default_factory=list)  # float16 [n, 196, C] per episode
    language: list[np.ndarray] = field(default_factory=list)  # int indices into the instruction table
    proprio: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)

    def add(self, vision, language_index, proprio, actions) -> None:
        self.vision.append(vision.astype(np.float16))
        self.language.append(np.full(len(actions), language_index, dtype=np.int64))
        self.proprio.append(np.asarray(proprio, dtype=np.float32))
        self.actions.append(np.asarray(actions, dtype=np.float32))

    def __len__(self) -> int:
        return sum(len(a) for a in self.actions)

    def arrays(self):
        return (
            np.concatenate(self.vision),
            np.concatenate(self.language),
            np.concatenate(self.proprio),
            np.concatenate(self.actions),
        )


def camera_frame(frame: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the runtime will see: half the time through a JPEG round trip (the MJPEG camera path)."""
    if rng.random() < 0.5:
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if ok:
            frame = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return resize_into(frame, out)


def collect_episode(world, seed, instruction_index, instruction, vision, rng, driver=None, noise=0.0,
                    max_steps=None):
    """Run one episode; the expert labels every visited state. `driver` (obs -> action) drives when
    given, else the expert drives, with Ornstein-Uhlenbeck noise of scale `noise` on its actions.
    `max_steps` cuts rollouts short: a lost policy circling for the whole time limit adds little."""
    obs = world.reset(seed, instruction=instruction, target=instruction_target(instruction))
    frames, proprio, labels = [], [], []
    perturbation = np.zeros(2, dtype=np.float32)
    while not world.done and (max_steps is None or world.steps < max_steps):
        frame = np.empty((IMAGE_SIZE_PX, IMAGE_SIZE_PX, 3), dtype=np.uint8)
        frames.append(camera_frame(obs.frame, frame, rng))
        proprio.append(obs.proprio.copy())
        label = expert_action(world)
        labels.append(label)
        if driver is not None:
            action = driver(obs)
        else:
            perturbation = 0.8 * perturbation + noise * rng.standard_normal(2).astype(np.float32)
            action = np.clip(label + perturbation, -1.0, 1.0)
        obs = world.step(action)
    features = np.concatenate([vision(np.stack(frames[i : i + 32])) for i in range(0, len(frames), 32)])
    return features, np.stack(proprio), np.stack(labels), world.success


_TARGETS: dict[str, str] = {}


def instruction_target(instruction: str) -> str:
    return _TARGETS[instruction]


def train_head(
    data: Demonstrations,
    language_table: np.ndarray,
    cfg: HeadConfig,
    epochs: int,
    seed: int,
    head: PolicyHead | None = None,
) -> PolicyHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = head or PolicyHead(cfg)
    head.train()
    vision, language_index, proprio, actions = data.arrays()
    table = torch.from_numpy(language_table)
    # The last 5% of frames (whole recent episodes) are held out to watch generalisation, not trained on.
    n_all = len(actions)
    n = int(n_all * 0.95)
    validation = slice(n, n_all)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, n // 256)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=2e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    for epoch in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * 256 : (step + 1) * 256]
            lang = table[torch.from_numpy(language_index[idx])]
            # Small noise on the sentence embedding: the head must not memorise exact vectors of the
            # training templates, or paraphrases would fall between them.
            lang = torch.nn.functional.normalize(lang + 0.015 * torch.randn_like(lang), dim=-1)
            proprio_batch = torch.from_numpy(proprio[idx])
            proprio_batch = proprio_batch + 0.02 * torch.randn_like(proprio_batch)
            prediction = head(torch.from_numpy(vision[idx].astype(np.float32)), lang, proprio_batch)
            loss = torch.nn.functional.mse_loss(prediction, torch.from_numpy(actions[idx]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        head.eval()
        with torch.inference_mode():
            val_prediction = head(torch.from_numpy(vision[validation].astype(np.float32)),
                                  table[torch.from_numpy(language_index[validation])],
                                  torch.from_numpy(proprio[validation]))
            val_loss = torch.nn.functional.mse_loss(val_prediction, torch.from_numpy(actions[validation])).item()
        head.train()
        logger.info("epoch %d/%d  loss %.5f  held-out loss %.5f", epoch + 1, epochs, total / steps_per_epoch,
                    val_loss)
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT_DIR, help="checkpoint directory")
    parser.add_argument("--episodes", type=int, default=600, help="expert demonstration episodes")
    parser.add_argument("--dagger-rounds", type=int, default=2, help="DAgger rounds (0 to skip)")
    parser.add_argument("--dagger-episodes", type=int, default=100, help="policy rollouts per DAgger round")
    parser.add_argument("--dagger-max-steps", type=int, default=60, help="rollout length cap in DAgger")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the first fit")
    parser.add_argument("--dagger-epochs", type=int, default=20, help="epochs of each DAgger refit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()

    tokenizer = InstructionTokenizer(tokenizer_path())
    language = load_language_encoder()
    instructions = [(t.format(object=obj), obj) for obj in OBJECT_NAMES for t in TRAINING_TEMPLATES]
    for text, target in instructions:
        _TARGETS[text] = target
    with torch.inference_mode():
        rows = []
        for text, _ in instructions:
            ids, mask = tokenizer.encode(text)
            rows.append(language(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0])
    language_table = np.stack(rows).astype(np.float32)
    index_of = {text: i for i, (text, _) in enumerate(instructions)}

    world = TabletopWorld()
    cfg = HeadConfig()
    data = Demonstrations()
    with tempfile.TemporaryDirectory() as workdir:
        vision = OrtVision(load_vision_encoder(), Path(workdir))
        seed_counter = 0
        for episode in range(args.episodes):
            text = instructions[int(rng.integers(len(instructions)))][0]
            noise = 0.0 if episode % 2 == 0 else 0.35
            features, proprio, labels, _ = collect_episode(world, seed_counter, index_of[text], text, vision, rng,
                                                           noise=noise)
            seed_counter += 1
            data.add(features, index_of[text], proprio, labels)
            if (episode + 1) % 40 == 0:
                logger.info("demonstrations: %d episodes, %d frames", episode + 1, len(data))
        head = train_head(data, language_table, cfg, args.epochs, args.seed)

        policy = TorchPolicy(head=head, vision_fn=vision)
        for round_index in range(args.dagger_rounds):
            successes = 0
            for episode in range(args.dagger_episodes):
                text = instructions[int(rng.integers(len(instructions)))][0]
                features, proprio, labels, success = collect_episode(
                    world, seed_counter, index_of[text], text, vision, rng, driver=policy.act,
                    max_steps=args.dagger_max_steps,
                )
                seed_counter += 1
                successes += int(success)
                data.add(features, index_of[text], proprio, labels)
                if (episode + 1) % 25 == 0:
                    logger.info("DAgger round %d: %d rollouts, %d reached the target", round_index + 1,
                                episode + 1, successes)
            logger.info("DAgger round %d: policy success %d/%d (capped at %d steps); %d frames in total",
                        round_index + 1, successes, args.dagger_episodes, args.dagger_max_steps, len(data))
            head = train_head(data, language_table, cfg, args.dagger_epochs, args.seed + 1 + round_index, head=head)
            policy.head = head
        if seed_counter >= EVAL_SEED_BASE:
            raise SystemExit("training seeds overlap the evaluation seeds; lower --episodes")

    metadata = {
        "seed": args.seed,
        "episodes": args.episodes,
        "dagger_rounds": args.dagger_rounds,
        "dagger_episodes": args.dagger_episodes,
        "dagger_max_steps": args.dagger_max_steps,
        "epochs": args.epochs,
        "dagger_epochs": args.dagger_epochs,
        "frames": len(data),
        "instructions": [text for text, _ in instructions],
        "command": "python -m reference_policy.train",
    }
    save_head(head, args.out, metadata)
    logger.info("saved head to %s after %.0f s", args.out, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
