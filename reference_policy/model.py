"""Reference VLA policy: frozen encoders + FiLM fusion + an action head with explicit dropout masks.

Export contract (docs/architecture.md, "Contracts: Export contract"): the head takes one mask per
dropout layer, shape [T, width], values 0 or 1/(1-p). Everything before the first dropout layer is deterministic and runs once, at batch 1;
only the layers after it see the T Monte-Carlo samples. A mask of ones is the eval-mode policy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference_policy.encoders import LANGUAGE_DIM, VISION_CHANNELS, VISION_TOKENS


@dataclass(frozen=True)
class HeadConfig:
    vision_channels: int = VISION_CHANNELS
    vision_tokens: int = VISION_TOKENS
    language_dim: int = LANGUAGE_DIM
    proprio_dim: int = 2
    action_dim: int = 2
    token_dim: int = 128
    queries: int = 4
    keypoints: int = 32
    width: int = 256
    dropout_p: float = 0.2
    dropout_layers: int = 2

    @classmethod
    def from_dict(cls, raw: dict) -> HeadConfig:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def _grid_coordinates(side: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # [side*side, 2]


class PolicyHead(nn.Module):
    """(vision tokens [B,196,C], language [B,384], proprio [B,2], masks [T,width] x L) -> actions [T,2].

    Fusion: the language embedding modulates the projected vision tokens (FiLM). Two readouts keep the
    "where" information a global average pool would lose: learned and language-conditioned queries
    attend over the 14x14 grid (pooled feature + attention-weighted position each), and a spatial
    softmax turns K feature maps into K expected (x, y) keypoints, as in visuomotor policy learning
    (robot body, heading wedge and target positions become coordinates the MLP can subtract).
    B must be 1 or equal T.
    """

    def __init__(self, cfg: HeadConfig = HeadConfig()):
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
        self.proprio_mlp = nn.Sequential(nn.Linear(cfg.proprio_dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        fused = cfg.queries * (d + 2) + 2 * cfg.keypoints + 32 + 64
        self.language_proj = nn.Sequential(nn.Linear(cfg.language_dim, 64), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(fused, cfg.width), nn.ReLU())
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.ReLU()) for _ in range(cfg.dropout_layers - 1)
        )
        self.action_out = nn.Linear(cfg.width, cfg.action_dim)
        grid = int(round(cfg.vision_tokens**0.5))
        self.register_buffer("grid", _grid_coordinates(grid), persistent=False)

    def features(self, vision: torch.Tensor, language: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """The deterministic trunk: everything before the first dropout layer."""
        tokens = self.token_proj(vision) + self.position
        gamma, beta = self.film(language).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.token_mlp(self.token_norm(tokens) * (1 + gamma) + beta)
        batch = tokens.shape[0]
        queries = torch.cat(
            [self.static_queries.unsqueeze(0).expand(batch, -1, -1), self.language_query(language).unsqueeze(1)],
            dim=1,
        )
        attention = (queries @ tokens.transpose(1, 2) / self.cfg.token_dim**0.5).softmax(-1)
        pooled = torch.cat([attention @ tokens, attention @ self.grid], dim=-1).flatten(1)
        maps = self.keypoint_maps(tokens).transpose(1, 2) * self.keypoint_temperature.exp().unsqueeze(-1)
        keypoints = (maps.softmax(-1) @ self.grid).flatten(1)  # [B, 2K] expected grid coordinates
        fused = torch.cat([pooled, keypoints, self.proprio_mlp(proprio), self.language_proj(language)], dim=-1)
        return self.trunk(fused)

    def forward(
        self,
        vision: torch.Tensor,
        language: torch.Tensor,
        proprio: torch.Tensor,
        *masks: torch.Tensor,
    ) -> torch.Tensor:
        h = self.features(vision, language, proprio)
        if masks and len(masks) != self.cfg.dropout_layers:
            raise ValueError(f"expected {self.cfg.dropout_layers} dropout masks, got {len(masks)}")
        layers = [None, *self.hidden]
        for i, layer in enumerate(layers):
            if layer is not None:
                h = layer(h)
            if masks:
                h = h * masks[i]
            else:
                h = nn.functional.dropout(h, self.cfg.dropout_p, training=self.training)
        return torch.tanh(self.action_out(h))


def sample_masks(cfg: HeadConfig, samples: int, generator: np.random.Generator) -> list[np.ndarray]:
    """T Monte-Carlo dropout masks per dropout layer: 0 or 1/(1-p), float32 [T, width]."""
    keep = 1.0 - cfg.dropout_p
    return [
        ((generator.random((samples, cfg.width)) < keep).astype(np.float32) / np.float32(keep))
        for _ in range(cfg.dropout_layers)
    ]


def ones_masks(cfg: HeadConfig, samples: int = 1) -> list[np.ndarray]:
    return [np.ones((samples, cfg.width), dtype=np.float32) for _ in range(cfg.dropout_layers)]


def uncertainty_score(actions: np.ndarray, action_range: float = 2.0) -> float:
    """Spread of the MC samples [T, A]: RMS over dimensions of the per-dimension std, over the range."""
    std = actions.std(axis=0)
    return float(np.sqrt(np.mean(std**2)) / action_range)


HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def save_head(head: PolicyHead, directory: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS_FILE))
    (directory / HEAD_CONFIG_FILE).write_text(
        json.dumps({"head": asdict(head.cfg), "training": metadata or {}}, indent=2, sort_keys=True) + "\n"
    )


class CheckpointError(RuntimeError):
    """A policy checkpoint is missing or unreadable."""


def load_head(directory: Path = DEFAULT_CHECKPOINT_DIR) -> PolicyHead:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / HEAD_CONFIG_FILE, directory / HEAD_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"policy checkpoint file {path} is missing; train it with `python -m reference_policy.train`"
            )
    try:
        cfg = HeadConfig.from_dict(json.loads(config_path.read_text())["head"])
        head = PolicyHead(cfg)
        head.load_state_dict(load_file(str(weights_path)), strict=True)
    except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, RuntimeError) as exc:
        raise CheckpointError(
            f"policy checkpoint in {directory} is corrupt or does not match the head architecture ({exc}); "
            "retrain it with `python -m reference_policy.train`"
        ) from exc
    return head.eval()
