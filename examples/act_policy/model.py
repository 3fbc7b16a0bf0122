"""The ACT-style chunk head: frozen-encoder features in, a chunk of H actions [B, H, action_dim] out.

Vision tokens (a 16 x 12 grid at 256 x 192 frames) are modulated by the instruction (FiLM) and read out
in two ways that keep "where" information: language-conditioned attention queries (pooled feature plus
the attended grid position) and a spatial softmax over keypoint maps. The fused context is decoded into
H steps by learned step queries, as ACT's decoder does with its action queries; each step token passes
two dropout layers (nn.Dropout, which the build turns into MC-dropout mask inputs) and a shared readout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from reference_policy.encoders import LANGUAGE_DIM, VISION_CHANNELS

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head.safetensors"


@dataclass(frozen=True)
class ActConfig:
    image_width: int = 256
    image_height: int = 192
    vision_stride: int = 16  # the encoder's feature stage: one token per 16 x 16 pixels
    vision_channels: int = VISION_CHANNELS
    language_dim: int = LANGUAGE_DIM
    proprio_dim: int = 2
    action_dim: int = 2
    horizon: int = 16
    token_dim: int = 64
    queries: int = 4
    keypoints: int = 32
    width: int = 192
    dropout_p: float = 0.1

    @property
    def grid(self) -> tuple[int, int]:
        """(columns, rows) of the vision token grid."""
        return self.image_width // self.vision_stride, self.image_height // self.vision_stride

    @property
    def vision_tokens(self) -> int:
        columns, rows = self.grid
        return columns * rows

    @classmethod
    def from_dict(cls, raw: dict) -> ActConfig:
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown ACT head config keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**raw)


def grid_coordinates(columns: int, rows: int) -> torch.Tensor:
    """Token centres in [-1, 1] (x over the width, y over the height), row-major like the tokens: [N, 2]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows), torch.linspace(-1, 1, columns), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


class ActChunkHead(nn.Module):
    """(vision tokens [B, N, C], language [B, 384], proprio [B, P]) -> action chunk [B, H, action_dim]."""

    def __init__(self, cfg: ActConfig = ActConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.token_dim
        self.token_proj = nn.Linear(cfg.vision_channels, d)
        self.position = nn.Parameter(torch.zeros(cfg.vision_tokens, d))
        self.film = nn.Linear(cfg.language_dim, 2 * d)
        self.token_norm = nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.static_queries = nn.Parameter(torch.randn(cfg.queries - 1, d) * 0.1)
        self.language_query = nn.Linear(cfg.language_dim, d)
        self.keypoint_maps = nn.Linear(d, cfg.keypoints)
        self.keypoint_temperature = nn.Parameter(torch.zeros(cfg.keypoints))
        self.proprio_mlp = nn.Sequential(nn.Linear(cfg.proprio_dim, 32), nn.ReLU())
        self.language_proj = nn.Sequential(nn.Linear(cfg.language_dim, 64), nn.ReLU())
        fused = cfg.queries * (d + 2) + 2 * cfg.keypoints + 32 + 64
        self.context = nn.Sequential(nn.Linear(fused, cfg.width), nn.ReLU(), nn.Linear(cfg.width, cfg.width))
        self.step_queries = nn.Parameter(torch.randn(cfg.horizon, cfg.width) * 0.1)
        self.drop_in = nn.Dropout(cfg.dropout_p)
        self.step_mlp = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.ReLU())
        self.drop_out = nn.Dropout(cfg.dropout_p)
        self.readout = nn.Linear(cfg.width, cfg.action_dim)
        self.register_buffer("grid", grid_coordinates(*cfg.grid), persistent=False)

    def forward(self, vision: torch.Tensor, language: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        tokens = self.token_proj(vision) + self.position
        gamma, beta = self.film(language).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.token_mlp(self.token_norm(tokens) * (1 + gamma) + beta)
        batch = tokens.shape[0]
        queries = torch.cat([self.static_queries.unsqueeze(0).expand(batch, -1, -1),
                             self.language_query(language).unsqueeze(1)], dim=1)
        attention = (queries @ tokens.transpose(1, 2) / cfg.token_dim**0.5).softmax(-1)
        pooled = torch.cat([attention @ tokens, attention @ self.grid], dim=-1).flatten(1)
        maps = self.keypoint_maps(tokens).transpose(1, 2) * self.keypoint_temperature.exp().unsqueeze(-1)
        keypoints = (maps.softmax(-1) @ self.grid).flatten(1)
        fused = torch.cat([pooled, keypoints, self.proprio_mlp(proprio), self.language_proj(language)], dim=-1)
        steps = torch.relu(self.context(fused).unsqueeze(1) + self.step_queries)  # [B, H, width]
        h = self.drop_out(self.step_mlp(self.drop_in(steps)))
        return torch.tanh(self.readout(h))


class CheckpointError(RuntimeError):
    """The ACT head's checkpoint is missing or does not match the architecture."""


def save_head(head: ActChunkHead, directory: Path, training: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(
        json.dumps({"head": asdict(head.cfg), "training": training or {}}, indent=2, sort_keys=True) + "\n")


def load_head(directory: Path = CHECKPOINT_DIR) -> ActChunkHead:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for path in (directory / CONFIG_FILE, directory / WEIGHTS_FILE):
        if not path.is_file():
            raise CheckpointError(f"ACT head checkpoint file {path} is missing; train it with "
                                  "`python -m examples.act_policy.train`")
    try:
        cfg = ActConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text())["head"])
        head = ActChunkHead(cfg)
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"ACT head checkpoint in {directory} is corrupt or does not match the head "
                              f"({exc}); retrain it with `python -m examples.act_policy.train`") from exc
    return head.eval()
