"""Train the ACT-style chunk head by imitation of the reference task's scripted expert.

Deterministic under --seed (one torch thread). The encoders are frozen, so each frame's vision features are
computed once, through an ONNX Runtime export of the encoder at this policy's input size, and cached.
Every visited state is labelled with a chunk: the expert's next H actions along its own rollout from that
state (a look-ahead copy of the world, physics only), zeros after it would reach the target. Two stages,
as the reference policy's training does:

1. expert demonstrations, half of them with perturbed execution (noisy actions are executed while the
   expert's chunk is the label, so the data shows how to recover from off-course states);
2. DAgger: the trained head drives with chunk execution (a new chunk every 2 or 4 steps), the expert
   labels the states it visits, and the head is refit on everything.

Reproduce the committed checkpoint with:  python -m examples.act_policy.train
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from examples.act_policy.model import CHECKPOINT_DIR, ActChunkHead, ActConfig, save_head
from examples.act_policy.policy import ChunkExecutor, TorchChunkPolicy
from reference_policy.train import Demonstrations, camera_frame
from reference_world.expert import expert_action
from reference_world.instructions import OBJECT_NAMES, TRAINING_TEMPLATES
from reference_world.world import TabletopWorld

logger = logging.getLogger(__name__)

EVAL_SEED_BASE = 1_000_000  # training seeds stay below it (the reference policy's convention)
TRAIN_SEED_BASE = 500_000  # away from the reference policy's training seeds (0 ...)
EXECUTED_STEPS = 4  # the first steps of a chunk are the ones chunk execution runs: they weigh more
LATER_STEP_WEIGHT = 0.3
COMMAND = "python -m examples.act_policy.train"


class OrtVision:
    """The frozen vision encoder exported once to ONNX at (height, width) and run with ONNX Runtime (FP32)."""

    def __init__(self, encoder: torch.nn.Module, height: int, width: int, workdir: Path, threads: int = 1):
        import onnxruntime as ort

        path = workdir / "vision_fp32.onnx"
        torch.onnx.export(encoder, (torch.zeros((1, height, width, 3), dtype=torch.uint8),), str(path),
                          input_names=["image"], output_names=["vision_features"],
                          dynamic_axes={"image": {0: "batch"}, "vision_features": {0: "batch"}},
                          opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": frames})[0]


def expert_chunk(world: TabletopWorld, horizon: int) -> np.ndarray:
    """The expert's next `horizon` actions along its own rollout from the world's current state, float32
    [horizon, 2]; steps after the look-ahead reaches the target are zero (stop there)."""
    ghost = copy.copy(world)  # every field a step changes is reassigned, never mutated in place
    ghost._observation = lambda: None  # physics only: the look-ahead's frames are never seen
    ghost._steps = 0  # the look-ahead is not cut short by the episode's time limit
    actions = np.zeros((horizon, 2), np.float32)
    for h in range(horizon):
        if ghost.success:
            break
        actions[h] = expert_action(ghost)
        ghost.step(actions[h])
    return actions


def collect_episode(world, seed, instruction, target, vision, cfg: ActConfig, rng, driver=None, noise=0.0,
                    max_steps=None):
    """One episode; every visited state gets the expert's chunk. `driver` (obs -> action) drives when
    given, else the expert does, with Ornstein-Uhlenbeck noise of scale `noise` on its actions."""
    obs = world.reset(seed, instruction=instruction, target=target)
    frames, proprio, labels = [], [], []
    perturbation = np.zeros(2, dtype=np.float32)
    while not world.done and (max_steps is None or world.steps < max_steps):
        frame = np.empty((cfg.image_height, cfg.image_width, 3), dtype=np.uint8)
        frames.append(camera_frame(obs.frame, frame, rng))
        proprio.append(obs.proprio.copy())
        label = expert_chunk(world, cfg.horizon)
        labels.append(label)
        if driver is not None:
            action = driver(obs)
        else:
            perturbation = 0.8 * perturbation + noise * rng.standard_normal(2).astype(np.float32)
            action = np.clip(label[0] + perturbation, -1.0, 1.0)
        obs = world.step(action)
    features = np.concatenate([vision(np.stack(frames[i:i + 32])) for i in range(0, len(frames), 32)])
    return features, np.stack(proprio), np.stack(labels), world.success


def step_weights(horizon: int) -> torch.Tensor:
    weights = torch.full((horizon,), LATER_STEP_WEIGHT)
    weights[:EXECUTED_STEPS] = 1.0
    return (weights / weights.mean()).reshape(1, horizon, 1)


def train_head(data: Demonstrations, language_table: np.ndarray, cfg: ActConfig, epochs: int, seed: int,
               head: ActChunkHead | None = None, batch: int = 256) -> ActChunkHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = head or ActChunkHead(cfg)
    head.train()
    vision, language_index, proprio, actions = data.arrays()
    table = torch.from_numpy(language_table)
    weights = step_weights(cfg.horizon)
    n_all = len(actions)
    n = int(n_all * 0.95)  # the last 5% (whole recent episodes) watch generalisation, not trained on
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, n // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    for epoch in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch:(step + 1) * batch]
            lang = table[torch.from_numpy(language_index[idx])]
            # Small noise on the sentence embedding and the proprio: no memorising exact training vectors.
            lang = torch.nn.functional.normalize(lang + 0.015 * torch.randn_like(lang), dim=-1)
            proprio_batch = torch.from_numpy(proprio[idx])
            proprio_batch = proprio_batch + 0.02 * torch.randn_like(proprio_batch)
            prediction = head(torch.from_numpy(vision[idx].astype(np.float32)), lang, proprio_batch)
            loss = (weights * (prediction - torch.from_numpy(actions[idx])) ** 2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        head.eval()
        with torch.inference_mode():
            held = slice(n, n_all)
            prediction = head(torch.from_numpy(vision[held].astype(np.float32)),
                              table[torch.from_numpy(language_index[held])], torch.from_numpy(proprio[held]))
            error = (prediction - torch.from_numpy(actions[held])) ** 2
            first = error[:, :EXECUTED_STEPS].mean().item()
        head.train()
        logger.info("epoch %d/%d  loss %.5f  held-out MSE: steps 0-%d %.5f, all %.5f", epoch + 1, epochs,
                    total / steps_per_epoch, EXECUTED_STEPS - 1, first, error.mean().item())
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint directory")
    parser.add_argument("--episodes", type=int, default=320, help="expert demonstration episodes")
    parser.add_argument("--dagger-rounds", type=int, default=1, help="DAgger rounds (0 to skip)")
    parser.add_argument("--dagger-episodes", type=int, default=100, help="policy rollouts per DAgger round")
    parser.add_argument("--dagger-max-steps", type=int, default=60, help="rollout length cap in DAgger")
    parser.add_argument("--epochs", type=int, default=18, help="epochs of the first fit")
    parser.add_argument("--dagger-epochs", type=int, default=10, help="epochs of each DAgger refit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("episodes", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # deterministic, and polite on a small shared machine
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()
    cfg = ActConfig()
    policy = TorchChunkPolicy(ActChunkHead(cfg), vision_fn=lambda frames: frames)  # encoders, tokenizer
    instructions = [(t.format(object=obj), obj) for obj in OBJECT_NAMES for t in TRAINING_TEMPLATES]
    language_table = np.concatenate([policy.embed(text) for text, _ in instructions]).astype(np.float32)

    world = TabletopWorld()
    data = Demonstrations()
    seed = TRAIN_SEED_BASE
    with tempfile.TemporaryDirectory() as workdir:
        from reference_policy.encoders import load_vision_encoder

        vision = OrtVision(load_vision_encoder(), cfg.image_height, cfg.image_width, Path(workdir))
        for episode in range(args.episodes):
            index = int(rng.integers(len(instructions)))
            text, target = instructions[index]
            noise = 0.0 if episode % 2 == 0 else 0.35
            features, proprio, labels, _ = collect_episode(world, seed, text, target, vision, cfg, rng, noise=noise)
            seed += 1
            data.add(features, index, proprio, labels)
            if (episode + 1) % 40 == 0:
                logger.info("demonstrations: %d episodes, %d frames", episode + 1, len(data))
        head = train_head(data, language_table, cfg, args.epochs, args.seed)

        policy = TorchChunkPolicy(head, vision_fn=vision)
        for round_index in range(args.dagger_rounds):
            successes = 0
            for episode in range(args.dagger_episodes):
                index = int(rng.integers(len(instructions)))
                text, target = instructions[index]
                driver = ChunkExecutor(policy.chunk, replan_every=(2, 4)[episode % 2])
                features, proprio, labels, success = collect_episode(
                    world, seed, text, target, vision, cfg, rng, driver=driver, max_steps=args.dagger_max_steps)
                seed += 1
                successes += int(success)
                data.add(features, index, proprio, labels)
            logger.info("DAgger round %d: policy reached the target in %d/%d rollouts (capped at %d steps); "
                        "%d frames in total", round_index + 1, successes, args.dagger_episodes,
                        args.dagger_max_steps, len(data))
            head = train_head(data, language_table, cfg, args.dagger_epochs, args.seed + 1 + round_index, head=head)
            policy.head = head
    if seed >= EVAL_SEED_BASE:
        raise SystemExit("training seeds reach the evaluation seeds; lower --episodes or --dagger-episodes")
    elapsed = time.monotonic() - started
    training = {
        "seed": args.seed, "episodes": args.episodes, "dagger_rounds": args.dagger_rounds,
        "dagger_episodes": args.dagger_episodes, "dagger_max_steps": args.dagger_max_steps,
        "epochs": args.epochs, "dagger_epochs": args.dagger_epochs, "frames": len(data),
        "seeds": [TRAIN_SEED_BASE, seed], "instructions": [text for text, _ in instructions],
        "label": f"expert's next {cfg.horizon} actions along its own rollout (zeros after the target)",
        "loss": f"MSE, steps 0-{EXECUTED_STEPS - 1} weight 1, later steps {LATER_STEP_WEIGHT}",
        "torch_threads": 1, "train_seconds": round(elapsed), "command": COMMAND,
    }
    save_head(head, args.out, training)
    logger.info("saved the ACT head to %s after %.0f s (%d frames)", args.out, elapsed, len(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
