"""Language instructions of the reference task: "go to the {object}" and its paraphrases.

Training templates are the only wording a policy sees while it learns. Held-out paraphrases are
worded differently on purpose (no held-out template equals or contains a training one), so an
evaluation on them measures whether the language encoder generalises rather than memorises.
"""

from __future__ import annotations

import numpy as np

# The object catalogue is part of the task's vocabulary; the world re-exports it.
OBJECT_NAMES: tuple[str, ...] = ("red block", "blue ball", "green triangle", "yellow star")

TRAINING_TEMPLATES: tuple[str, ...] = (
    "go to the {object}",
    "drive to the {object}",
    "move to the {object}",
    "navigate to the {object}",
    "go towards the {object}",
    "head to the {object}",
)

HELDOUT_PARAPHRASES: tuple[str, ...] = (
    "could you make your way over to the {object}",
    "approach the {object} please",
    "find the {object} and stop next to it",
    "your goal is the {object}",
    "get close to the {object}",
    "travel over to the {object}",
)


def _check_object(obj: str) -> str:
    # Any non-empty phrase is allowed (not only catalogue names): OOD scenes describe the target
    # with a colour that is not in the catalogue, e.g. "purple block".
    if not isinstance(obj, str) or not obj.strip():
        raise ValueError(f"object must be a non-empty string such as {OBJECT_NAMES[0]!r}, got {obj!r}")
    return obj.strip()


def _pick(templates: tuple[str, ...], obj: str, rng: np.random.Generator) -> str:
    obj = _check_object(obj)
    index = int(rng.integers(len(templates)))
    return templates[index].format(object=obj)


def training_instruction(obj: str, rng: np.random.Generator) -> str:
    """A training-template instruction naming `obj`, template drawn from `rng`."""
    return _pick(TRAINING_TEMPLATES, obj, rng)


def heldout_instruction(obj: str, rng: np.random.Generator) -> str:
    """A held-out paraphrase naming `obj`, template drawn from `rng`."""
    return _pick(HELDOUT_PARAPHRASES, obj, rng)


def all_training_instructions(objects: tuple[str, ...] = OBJECT_NAMES) -> list[str]:
    """Every training template x object, in a stable order (used to precompute embeddings)."""
    return [template.format(object=_check_object(obj)) for obj in objects for template in TRAINING_TEMPLATES]


def all_heldout_instructions(objects: tuple[str, ...] = OBJECT_NAMES) -> list[str]:
    """Every held-out paraphrase x object, in a stable order."""
    return [template.format(object=_check_object(obj)) for obj in objects for template in HELDOUT_PARAPHRASES]
