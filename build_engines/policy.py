"""The policy interface of the build: `build-engines --policy my_package.my_module:make_policy`.

A policy factory is a function ``make_policy(checkpoint: Path | None = None) -> Policy`` (``--checkpoint``
is passed on when given). The reference policy is one such factory (``DEFAULT_POLICY``); the build knows
nothing else about it. docs/bring-your-own-policy.md describes the contract; in short:

- ``vision``: a torch module taking one uint8 frame tensor [N, H, W, 3] per camera (in ``spec.cameras``
  order, each at that camera's height and width and channel order) and returning one float tensor
  [N, ...]. Preprocessing (cast, normalisation, layout) belongs inside it, cast first: TensorRT wants the
  uint8 input to feed a Cast.
- ``language`` (only when ``spec.language`` is set): ``(input_ids, attention_mask)`` int64
  [N, max_tokens] -> embedding [N, D].
- ``head``: ``(vision_features, [language_features,] [proprio])`` -> actions [B, action_dim] (H = 1) or
  [B, H, action_dim]; language_features only with a language encoder, proprio only when the spec
  names proprio. Every ``nn.Dropout`` in it becomes an MC-dropout mask input of the head graph.
- ``spec``: the PolicySpec (edge/inference/spec.py).
- optional hooks: ``calibration(count) -> CalibrationSource`` (the default data to calibrate and gate
  on when no --calib-source is given), ``environment`` ("module:factory" of the default simulator for
  the closed-loop gate), ``instructions`` (known instructions whose embeddings ship in the bundle),
  ``checkpoint`` (a file or folder hashed into the manifest).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.errors import PolicyError
from edge.inference.spec import PolicySpec
from edge.io.protocol import MAX_CHANNELS

DEFAULT_POLICY = "reference_policy.policy:make_policy"


@dataclass(frozen=True)
class Policy:
    spec: PolicySpec
    vision: Any  # torch.nn.Module
    head: Any  # torch.nn.Module
    language: Any = None  # torch.nn.Module, required when spec.language is set
    tokenizer_file: Path | None = None  # the tokenizers JSON spec.language.tokenizer names, on this machine
    calibration: Callable[[int], Any] | None = None  # count -> CalibrationSource
    environment: str | None = None  # "module:factory" of the default closed-loop environment
    instructions: Sequence[str] = ()  # known instructions: their embeddings are precomputed into the bundle
    checkpoint: Path | None = None  # hashed into the manifest (provenance)
    held_out_instructions: Sequence[str] = ()  # paraphrases for the language graph's accuracy check


def resolve(reference: str, what: str) -> Any:
    """`module.path:attribute` -> the attribute, with an error naming the option on any failure."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise PolicyError(f"{what} {reference!r} must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"{what} {reference!r}: cannot import {module_name} ({exc}); is the package "
                          "installed in this environment (pip install -e .) or on PYTHONPATH?") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise PolicyError(f"{what} {reference!r}: module {module_name} has no {attribute!r}") from None


def load_policy(reference: str = DEFAULT_POLICY, checkpoint: Path | None = None) -> Policy:
    """Call the factory and check what it returned (types, spec, module signatures) before any work."""
    factory = resolve(reference, "--policy")
    if not callable(factory):
        raise PolicyError(f"--policy {reference!r} is not callable; it must name a function returning a Policy")
    kwargs = {}
    if checkpoint is not None:
        if "checkpoint" not in inspect.signature(factory).parameters:
            raise PolicyError(f"--checkpoint was given but the factory {reference} takes no 'checkpoint' argument")
        kwargs["checkpoint"] = Path(checkpoint)
    try:
        policy = factory(**kwargs)
    except PolicyError:
        raise
    except Exception as exc:  # a user's factory may fail in any way: one line naming it, not a traceback
        raise PolicyError(f"policy factory {reference} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(policy, Policy) and policy.tokenizer_file is None and isinstance(policy.spec, PolicySpec) \
            and policy.spec.language is not None:
        policy = replace(policy, tokenizer_file=Path(policy.spec.language.tokenizer))  # the spec's own path
    check_policy(policy, reference)
    return policy


def check_policy(policy: Any, reference: str = "the policy") -> Policy:
    import torch

    if not isinstance(policy, Policy):
        raise PolicyError(f"{reference} returned {type(policy).__name__}; it must return "
                          "build_engines.policy.Policy")
    if not isinstance(policy.spec, PolicySpec):
        raise PolicyError(f"{reference}: Policy.spec must be an edge.inference.spec.PolicySpec "
                          "(PolicySpec.from_dict(...) validates one)")
    spec = policy.spec
    for name in ("vision", "head") + (("language",) if spec.language else ()):
        if not isinstance(getattr(policy, name), torch.nn.Module):
            raise PolicyError(f"{reference}: Policy.{name} must be a torch.nn.Module, got "
                              f"{type(getattr(policy, name)).__name__}")
    if spec.language is None and policy.language is not None:
        raise PolicyError(f"{reference}: a language encoder was given but spec.language is null; set "
                          "spec.language (tokenizer, max_tokens) or drop the encoder")
    if spec.language is not None:
        if policy.tokenizer_file is None or not Path(policy.tokenizer_file).is_file():
            raise PolicyError(f"{reference}: spec.language needs Policy.tokenizer_file, an existing tokenizers "
                              f"JSON; got {policy.tokenizer_file}")
    if spec.action.dim > MAX_CHANNELS:
        raise PolicyError(f"{reference}: spec.action has {spec.action.dim} channels; the serial protocol "
                          f"carries at most {MAX_CHANNELS} (edge.io.protocol.MAX_CHANNELS)")
    if policy.environment is not None and not isinstance(policy.environment, str):
        raise PolicyError(f"{reference}: Policy.environment must be a 'module:factory' string")
    return policy


def camera_frames(spec: PolicySpec, batch: int = 1, value: int = 0) -> list[np.ndarray]:
    return [np.full((batch, c.height, c.width, 3), value, np.uint8) for c in spec.cameras]


def probe(policy: Policy) -> tuple[dict[str, tuple[int, ...]], tuple]:
    """One forward pass on neutral inputs: the feature shapes the graphs are declared with, checked
    against the spec (action dimension and horizon), and the head's inputs of that pass."""
    import torch

    spec = policy.spec
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with torch.inference_mode():
            features = policy.vision.eval()(*(torch.from_numpy(f) for f in camera_frames(spec, 1, 128)))
            _tensor("vision", features)
            shapes["vision_features"] = tuple(features.shape)
            head_args = [features]
            if spec.language is not None:
                ids = torch.zeros((1, spec.language.max_tokens), dtype=torch.int64)
                mask = torch.ones((1, spec.language.max_tokens), dtype=torch.int64)
                embedding = policy.language.eval()(ids, mask)
                _tensor("language", embedding)
                if embedding.ndim != 2 or embedding.shape[0] != 1:
                    raise PolicyError(f"the language encoder must return [N, D], got {tuple(embedding.shape)}")
                shapes["language_features"] = tuple(embedding.shape)
                head_args.append(embedding)
            if spec.proprio.dim:
                head_args.append(torch.zeros((1, spec.proprio.dim)))
            actions = policy.head.eval()(*head_args)
    except PolicyError:
        raise
    except Exception as exc:  # shape mismatches inside user modules surface as RuntimeError and friends
        raise PolicyError(f"a forward pass of the policy on neutral inputs failed ({type(exc).__name__}: {exc}); "
                          f"check that its modules take the inputs the spec describes (cameras "
                          f"{[(c.name, c.height, c.width) for c in spec.cameras]}, proprio {spec.proprio.dim}, "
                          f"language {'yes' if spec.language else 'no'})") from exc
    _tensor("head", actions)
    expected = (1, spec.action.dim) if spec.action.horizon == 1 else (1, spec.action.horizon, spec.action.dim)
    if tuple(actions.shape) != expected:
        raise PolicyError(f"the head returned actions of shape {tuple(actions.shape)}; the spec (action dim "
                          f"{spec.action.dim}, horizon {spec.action.horizon}) needs {expected}")
    shapes["actions"] = tuple(actions.shape)
    return shapes, tuple(head_args)


def _tensor(name: str, value: Any) -> None:
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise PolicyError(f"the {name} module must return one float tensor, got {type(value).__name__}")
