"""The graph IO a bundle's spec implies (docs/architecture.md, "Export contract"), checked once when a
pipeline is built, so that a hand-made or edited bundle is refused with what is wrong instead of failing
inside the first tick:

- vision:   one uint8 input per camera [N, H, W, 3] (``PolicySpec.camera_input``) -> vision_features [N, ...]
- language: input_ids, attention_mask int64 [N, max_tokens] -> language_features [N, D] (with language only)
- head:     vision_features [1, ...], language_features [1, D] (with language), proprio [1, P] (P > 0),
            the manifest's dropout mask inputs [T, ..., width] -> actions [T, A] or [T, H, A]
            (T is 1 and there are no masks for a bundle without uncertainty)

The backends check the graph files against the manifest's IO (`backends.base.check_io`); this module
checks the manifest's IO against the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.errors import BundleError
from edge.inference.backends.base import TensorSpec
from edge.inference.bundle import Bundle, rebuild_hint


@dataclass(frozen=True)
class PolicyIO:
    masks: tuple[TensorSpec, ...]  # the head's dropout mask inputs, in the manifest's order
    vision_features: tuple[int, ...]  # the vision output's shape after the batch dimension
    language_dim: int  # 0 without language


def _dims(shape, dynamic: str) -> str:
    return "[" + ", ".join(dynamic if d == -1 else str(d) for d in shape) + "]"


def _shape(spec: TensorSpec, dynamic: str = "N") -> str:
    """`spec` as e.g. `uint8 [N, 96, 96, 3]` (N the encoders' batch, T the head's samples)."""
    return f"{spec.dtype} {_dims(spec.shape, dynamic)}"


class _Problems:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        self.lines.append(text)

    def raise_if_any(self) -> None:
        if self.lines:
            raise BundleError(f"bundle {self.bundle.root} ({self.bundle.spec.name}): its graphs do not match its "
                              f"spec: {'; '.join(self.lines)}. Rebuild it with: {rebuild_hint(self.bundle.manifest)}")


def _by_name(problems: _Problems, graph: str, kind: str, specs: tuple[TensorSpec, ...],
             expected: list[str]) -> dict[str, TensorSpec]:
    found = {s.name: s for s in specs}
    missing = [n for n in expected if n not in found]
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.add(f"the {graph} graph has no {kind} {', '.join(missing)}")
    if extra:
        problems.add(f"the {graph} graph has unexpected {kind}s {', '.join(extra)} (expected {', '.join(expected)})")
    return found


def _batched(problems: _Problems, graph: str, spec: TensorSpec | None, dtype: str, rest: tuple[int, ...] | None,
             batch: tuple[int, ...] = (-1, 1)) -> None:
    """`spec` is dtype [batch, *rest] (rest None: any trailing shape of at least one dimension)."""
    if spec is None:
        return
    ok = spec.dtype == dtype and len(spec.shape) >= 2 and spec.shape[0] in batch
    if rest is not None:
        ok = ok and tuple(spec.shape[1:]) == rest
    if not ok:
        wanted = "..." if rest is None else ", ".join(map(str, rest))
        lead = "T" if batch == (-1,) else ("1" if batch == (1,) else "N")
        problems.add(f"{graph} {spec.name} is {_shape(spec, 'T' if graph == 'head' else 'N')}, expected {dtype} "
                     f"[{lead}, {wanted}]")


def check_policy_io(bundle: Bundle) -> PolicyIO:
    """Raise BundleError listing every way the bundle's graph IO differs from what its spec implies."""
    spec = bundle.spec
    problems = _Problems(bundle)
    expected_graphs = {"vision", "head"} | ({"language"} if spec.language is not None else set())
    if set(bundle.graphs) != expected_graphs:
        problems.add(f"it has the graphs {sorted(bundle.graphs)}, its spec needs {sorted(expected_graphs)} "
                     f"({'with' if spec.language is not None else 'without'} language)")
        problems.raise_if_any()

    vision = bundle.graphs["vision"]
    inputs = _by_name(problems, "vision", "input", vision.inputs, [spec.camera_input(c) for c in spec.cameras])
    for camera in spec.cameras:
        _batched(problems, "vision", inputs.get(spec.camera_input(camera)), "uint8", (camera.height, camera.width, 3))
    outputs = _by_name(problems, "vision", "output", vision.outputs, ["vision_features"])
    _batched(problems, "vision", outputs.get("vision_features"), "float32", None)
    features = tuple(outputs["vision_features"].shape[1:]) if "vision_features" in outputs else ()

    language_dim = 0
    if spec.language is not None:
        language = bundle.graphs["language"]
        inputs = _by_name(problems, "language", "input", language.inputs, ["input_ids", "attention_mask"])
        for name in ("input_ids", "attention_mask"):
            _batched(problems, "language", inputs.get(name), "int64", (spec.language.max_tokens,))
        outputs = _by_name(problems, "language", "output", language.outputs, ["language_features"])
        found = outputs.get("language_features")
        _batched(problems, "language", found, "float32", None)
        if found is not None and len(found.shape) == 2:
            language_dim = found.shape[1]

    head = bundle.graphs["head"]
    masks = [str(m) for m in bundle.dropout.get("mask_inputs", [])]
    widths = [int(w) for w in bundle.dropout.get("widths", [])]
    if bundle.has_uncertainty and not masks:
        problems.add("its uncertainty signal is mc-dropout but the head has no dropout mask inputs")
    if not bundle.has_uncertainty and masks:
        problems.add(f"its uncertainty signal is none but the manifest lists dropout masks {masks}")
    if len(widths) != len(masks):
        problems.add(f"dropout lists {len(masks)} mask inputs but {len(widths)} widths")
    expected = ["vision_features"] + (["language_features"] if spec.language is not None else [])
    expected += (["proprio"] if spec.proprio.dim else []) + masks
    inputs = _by_name(problems, "head", "input", head.inputs, expected)
    _batched(problems, "head", inputs.get("vision_features"), "float32", features or None, batch=(1,))
    if spec.language is not None:
        _batched(problems, "head", inputs.get("language_features"), "float32", (language_dim,) if language_dim else None,
                 batch=(1,))
    if spec.proprio.dim:
        _batched(problems, "head", inputs.get("proprio"), "float32", (spec.proprio.dim,), batch=(1,))
    for name, width in zip(masks, widths):
        mask = inputs.get(name)
        _batched(problems, "head", mask, "float32", None, batch=(-1,))
        if mask is not None and mask.shape[-1] != width:
            problems.add(f"head {name} is {_shape(mask, 'T')}, its last dimension must be the dropout width {width}")
    outputs = _by_name(problems, "head", "output", head.outputs, ["actions"])
    samples = -1 if masks else 1
    action = spec.action
    chunk = (action.horizon, action.dim)
    allowed = [(samples, *chunk)] + ([(samples, action.dim)] if action.horizon == 1 else [])
    found = outputs.get("actions")
    if found is not None and (found.dtype != "float32" or tuple(found.shape) not in allowed):
        problems.add(f"head actions is {_shape(found, 'T')}, expected float32 {_dims(allowed[-1], 'T')} "
                     f"(spec.action: horizon {action.horizon}, {action.dim} channels)")
    problems.raise_if_any()
    return PolicyIO(masks=tuple(inputs[name] for name in masks), vision_features=features, language_dim=language_dim)
