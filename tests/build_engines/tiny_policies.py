"""Tiny policies of several shapes, built the way a user would: torch modules, a spec and a factory for
`build-engines --policy tests.build_engines.tiny_policies:<factory>`. Weights are random (seeded): the
build's contract does not depend on what a policy learned."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from build_engines.policy import Policy
from calibration.sources import CalibrationSample
from edge.inference.spec import PolicySpec

WORDS = ["[PAD]", "[UNK]", "go", "to", "the", "red", "blue", "green", "block", "ball", "cup", "pick", "up", "place"]
INSTRUCTIONS = ["go to the red block", "pick up the blue ball", "place the green cup"]


def word_tokenizer() -> Path:
    """A word-level `tokenizers` JSON (a user's own vocabulary, not the reference MiniLM one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-")) / "words.json"
    tokenizer.save(str(path))
    return path


class ConvVision(nn.Module):
    """One small conv net per camera; uint8 NHWC in, cast first; its grid cells as tokens [N, cells, 8] out."""

    def __init__(self, cameras: int):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
            for _ in range(cameras))

    def forward(self, *frames: torch.Tensor) -> torch.Tensor:
        tokens = []
        for net, frame in zip(self.nets, frames):
            x = frame.float().permute(0, 3, 1, 2) / 255.0 - 0.5
            tokens.append(net(x).flatten(2).transpose(1, 2))
        return torch.cat(tokens, dim=1)


class BagOfWords(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(len(WORDS), dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MlpHead(nn.Module):
    """Pooled tokens (+ language) (+ proprio) -> MLP with nn.Dropout -> [B, A] or [B, H, A]."""

    def __init__(self, language_dim: int, proprio_dim: int, action_dim: int, horizon: int, dropout: float | None,
                 width: int = 32):
        super().__init__()
        self.action_dim, self.horizon = action_dim, horizon
        self.language, self.proprio = language_dim > 0, proprio_dim > 0
        layers: list[nn.Module] = [nn.Linear(8 + language_dim + proprio_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, action_dim * horizon)

    def forward(self, vision: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        x = torch.cat([vision.mean(1), *rest], dim=-1)
        actions = torch.tanh(self.out(self.mlp(x)))
        if self.horizon > 1:
            return actions.reshape(actions.shape[0], self.horizon, self.action_dim)
        return actions


class ChunkTokenHead(nn.Module):
    """A different structure: a dropout on per-step tokens [1, H, width] (rank 3), then a shared readout."""

    def __init__(self, proprio_dim: int, action_dim: int, horizon: int, dropout: float, width: int = 24):
        super().__init__()
        self.horizon = horizon
        self.steps = nn.Parameter(torch.randn(horizon, width) * 0.1)
        self.project = nn.Linear(8 + proprio_dim, width)
        self.drop = nn.Dropout(dropout)
        self.readout = nn.Sequential(nn.ReLU(), nn.Linear(width, action_dim))

    def forward(self, vision: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        context = self.project(torch.cat([vision.mean(1), proprio], dim=-1))  # [B, width]
        tokens = context.unsqueeze(1) + self.steps  # [B, H, width]
        return torch.tanh(self.readout(self.drop(tokens)))


class EpisodeSource:
    """Recorded-style episodes of smooth synthetic frames (a user's calibration hook)."""

    def __init__(self, count: int, spec: PolicySpec, frames_per_episode: int = 6, seed: int = 0):
        self.count, self.spec, self.per_episode, self.seed = count, spec, frames_per_episode, seed

    def describe(self) -> dict:
        return {"kind": "synthetic-episodes", "name": "tiny policy episodes", "samples": self.count}

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for i in range(self.count):
            episode = i // self.per_episode
            base = (episode * 37) % 200
            views = {c.name: np.clip(base + rng.integers(0, 40, (c.height, c.width, 3)), 0, 255).astype(np.uint8)
                     for c in self.spec.cameras}
            first = views[self.spec.cameras[0].name]
            yield CalibrationSample(first, INSTRUCTIONS[episode % len(INSTRUCTIONS)],
                                    rng.uniform(-1, 1, self.spec.proprio.dim).astype(np.float32),
                                    episode=episode, views=views)


def make(cameras=((96, 96),), language=True, proprio=2, action=2, horizon=1, dropout: float | None = 0.1,
         kinds="velocity", head="mlp", name="tiny", proprio_sources=None, action_names=None) -> Policy:
    """A tiny policy: `proprio` values read from velocities[0..] unless `proprio_sources` names them; `kinds`
    one command kind for every channel or a list of them."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer() if language else None
    sources = list(proprio_sources) if proprio_sources is not None else [f"velocities[{i}]" for i in range(proprio)]
    spec = PolicySpec.from_dict({
        "name": name,
        "cameras": [{"name": f"cam{i}", "height": h, "width": w} for i, (h, w) in enumerate(cameras)],
        "language": {"tokenizer": str(tokenizer), "max_tokens": 8} if language else None,
        "proprio": {"names": [f"p{i}" for i in range(proprio)], "sources": sources},
        "action": {"names": list(action_names or [f"a{i}" for i in range(action)]), "horizon": horizon,
                   "kinds": [kinds] * action if isinstance(kinds, str) else list(kinds),
                   "low": [-1.0] * action, "high": [1.0] * action, "max_slew_per_s": [4.0] * action},
        "dropout_rate": dropout,
    })
    if head == "chunk-tokens":
        head_module = ChunkTokenHead(proprio, action, horizon, dropout)
    else:
        head_module = MlpHead(16 if language else 0, proprio, action, horizon, dropout)
    return Policy(spec=spec, vision=ConvVision(len(cameras)), head=head_module,
                  language=BagOfWords() if language else None, tokenizer_file=tokenizer,
                  calibration=lambda count: EpisodeSource(count, spec), instructions=INSTRUCTIONS,
                  held_out_instructions=["go to the blue cup"])


def image96():
    return make()


def image256x192_arm():
    return make(cameras=((192, 256),), language=False, proprio=7, action=7, horizon=8, kinds="position",
                head="chunk-tokens", name="arm-chunks")


def arm7_two_cameras():
    """A 7-DoF arm: six position joints and a position gripper, two cameras, no language, chunks of 8,
    proprio of 14 values (the seven measured positions, then the seven velocities)."""
    return make(cameras=((64, 64), (48, 64)), language=False, proprio=14, action=7, horizon=8, kinds="position",
                proprio_sources=[f"positions[{i}]" for i in range(7)] + [f"velocities[{i}]" for i in range(7)],
                action_names=[f"joint{i}" for i in range(6)] + ["gripper"], name="arm7-two-cameras")


def chunk_without_proprio():
    """One camera, no language, no proprio, chunks of 4 velocity actions."""
    return make(cameras=((64, 64),), language=False, proprio=0, action=3, horizon=4, name="chunk-no-proprio")


def two_cameras():
    return make(cameras=((96, 96), (64, 80)), name="two-cameras")


def no_dropout():
    return make(dropout=None, name="no-dropout")


def nine_channels():
    return make(action=9, name="nine")


def wrong_horizon():
    policy = make(name="wrong-horizon")
    raw = policy.spec.to_dict()
    raw["action"]["horizon"] = 4
    from dataclasses import replace

    return replace(policy, spec=PolicySpec.from_dict(raw))


def not_a_policy():
    return {"vision": None}


class PointArena:
    """A tiny simulator for the closed-loop gate (`--env tests.build_engines.tiny_policies:PointArena`): a
    point robot driven by wheel-like velocity actions in a 2 m arena, drawn as a dot in a 96x96 frame;
    an episode is 12 steps and succeeds when the robot ends inside the arena."""

    STEPS = 12

    def __init__(self):
        self.position = np.zeros(2, np.float32)
        self.velocity = np.zeros(2, np.float32)
        self.steps = 0
        self.done = True
        self.success = False

    def _observe(self):
        from types import SimpleNamespace

        frame = np.full((96, 96, 3), 40, np.uint8)
        x, y = (np.clip(self.position, -1, 1) * 40 + 48).astype(int)
        frame[max(y - 3, 0):y + 3, max(x - 3, 0):x + 3] = 230
        return SimpleNamespace(frame=frame, instruction=INSTRUCTIONS[0], proprio=self.velocity.copy())

    def reset(self, seed: int):
        rng = np.random.default_rng(seed)
        self.position = rng.uniform(-0.5, 0.5, 2).astype(np.float32)
        self.velocity = np.zeros(2, np.float32)
        self.steps, self.done, self.success = 0, False, False
        return self._observe()

    def step(self, action):
        self.velocity = np.clip(np.asarray(action, np.float32), -1, 1)
        self.position = self.position + 0.05 * self.velocity
        self.steps += 1
        self.done = self.steps >= self.STEPS
        self.success = self.done and bool(np.all(np.abs(self.position) <= 1.0))
        return self._observe()


class BrokenArena(PointArena):
    """An environment whose step fails, as a user's simulator may."""

    def step(self, action):
        raise RuntimeError("physics exploded")


def broken_calibration():
    from dataclasses import replace

    def fails(count):
        raise OSError("recordings drive not mounted")

    return replace(make(), calibration=fails)


def two_cameras_with_a_default_environment():
    from dataclasses import replace

    return replace(two_cameras(), environment=f"{__name__}:PointArena")


def long_known_instruction():
    from dataclasses import replace

    return replace(make(), instructions=["go to the red block and then to the blue ball and back"])


def lerobot_arm():
    """A 3-channel position arm with language and chunks of 4, for a LeRobot dataset's 'observation.images.cam0'."""
    return make(cameras=((64, 80),), proprio=3, action=3, horizon=4, kinds="position", name="lerobot-arm")
