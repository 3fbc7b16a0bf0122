"""Pre-exported ONNX graphs (``build-engines --onnx-spec policy.yaml``): load, check against the spec, and
give the head its MC-dropout mask inputs.

The YAML holds the policy spec's fields (``edge/inference/spec.py``) plus the graphs, relative to the
YAML's folder::

    graphs: {vision: vision.onnx, language: language.onnx, head: head.onnx}   # language only with language
    name: my-arm-policy
    cameras: [{name: front, height: 96, width: 96, channel_order: rgb}]
    ...

Checks, each naming the tensor and what was expected:

- vision: one uint8 input per camera (``spec.camera_input``), [H, W, 3] or [1, H, W, 3] at the camera's
  size, read only by Cast nodes; float outputs, which the head takes by name;
- language (when the spec has one): int64 ``input_ids`` and ``attention_mask`` [N, max_tokens] -> a float
  embedding [N, D], which the head takes as ``language_features``;
- head: the vision outputs, ``language_features``, ``proprio`` [1, P]; first output the actions,
  [T, A] or [T, H, A] once its Dropout nodes are masks.

Each Dropout node of the head becomes ``Mul(x, dropout_mask_<i>)`` with a new float input of shape
[T, width] (x of shape [1, width]; for x [1, ..., width] the mask is [T, 1, ..., width], shared over the
middle axes), T dynamic. A mask of ones is then exactly the inference-mode graph (ONNX Dropout is the
identity outside training) and masks of 0 and 1/(1-p) are the training-mode dropout the runtime samples.
torch removes nn.Dropout when it exports in eval mode: a head with no Dropout node is refused unless
uncertainty is 'none'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.errors import BuildError
from edge.errors import ConfigError
from edge.inference.spec import PolicySpec

logger = logging.getLogger(__name__)

UNCERTAINTIES = ("mc_dropout", "none")  # other signals come with the failure-detection issue
MASK_PREFIX = "dropout_mask_"
KEEP_DROPOUT = ("export the head with its dropout kept: put the nn.Dropout modules in train mode "
                "(head.eval(); [m.train() for m in head.modules() if isinstance(m, torch.nn.Dropout)]) and call "
                "torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, dynamo=False); "
                "or build with --uncertainty none")


class OnnxImportError(BuildError):
    """A pre-exported graph does not fit its policy spec, or its head cannot get dropout masks."""


@dataclass(frozen=True)
class DropoutMask:
    input: str  # dropout_mask_<i>
    node: str  # the Dropout node it replaces
    width: int
    shape: tuple[int | str, ...]  # ("T", width) or ("T", 1, ..., width)


@dataclass(frozen=True)
class ImportedPolicy:
    spec: PolicySpec
    graphs: Mapping[str, Any]  # role -> onnx.ModelProto; the head rewritten
    sources: Mapping[str, Path]  # role -> the user's file
    tokenizer: Path | None
    masks: tuple[DropoutMask, ...]
    uncertainty: str

    def save(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        import onnx

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for role, model in self.graphs.items():
            paths[role] = out / f"{role}.onnx"
            onnx.save(model, str(paths[role]))
        return paths


def load_onnx_spec(path: str | os.PathLike[str], *, uncertainty: str = "mc_dropout") -> ImportedPolicy:
    import onnx
    import yaml

    path = Path(path)
    if uncertainty not in UNCERTAINTIES:
        raise ConfigError(f"--uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {uncertainty!r}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"ONNX spec {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"ONNX spec {path} cannot be read as YAML ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("graphs"), dict):
        raise ConfigError(f"ONNX spec {path} must be a mapping with 'graphs: {{vision: ..., head: ...}}' (and "
                          "'language' with language) plus the policy spec's fields (docs/your-data.md)")
    fields = {k: v for k, v in raw.items() if k != "graphs"}
    try:
        spec = PolicySpec.from_dict(fields)
    except ConfigError as exc:
        raise ConfigError(f"ONNX spec {path}: {exc}") from exc
    roles = {"vision", "head"} | ({"language"} if spec.language is not None else set())
    given = set(raw["graphs"])
    if given != roles:
        extra, missing = sorted(given - roles), sorted(roles - given)
        raise ConfigError(f"ONNX spec {path}: graphs must name {sorted(roles)}"
                          + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                          + ("" if spec.language is not None else " (the spec has no language)"))
    sources = {role: (path.parent / str(raw["graphs"][role])).resolve() for role in sorted(roles)}
    models = {}
    for role, file in sources.items():
        if not file.is_file():
            raise OnnxImportError(f"{role} graph {file} (named in {path}) does not exist")
        try:
            models[role] = onnx.load(str(file))
        except Exception as exc:  # onnx raises protobuf's DecodeError or its own errors on a bad file
            raise OnnxImportError(f"{role} graph {file} is not a readable ONNX model ({exc})") from exc
    tokenizer = None
    if spec.language is not None:
        tokenizer = (path.parent / spec.language.tokenizer).resolve()
        if not tokenizer.is_file():
            raise OnnxImportError(f"tokenizer {tokenizer} (spec.language.tokenizer in {path}) does not exist")
    outputs = check_vision(models["vision"], spec, str(sources["vision"]))
    width = check_language(models["language"], spec, str(sources["language"])) if "language" in models else None
    head, masks = rewrite_dropout(models["head"], spec, str(sources["head"]), uncertainty)
    check_head(head, spec, outputs, width, str(sources["head"]))
    if masks and any(m.node for m in masks):
        plain, _ = rewrite_dropout(models["head"], spec, str(sources["head"]), "none")
        verify_masks(head, plain, masks, spec, str(sources["head"]))
    models["head"] = head
    logger.info("imported %s: %d camera(s), %d dropout mask(s)", path, len(spec.cameras), len(masks))
    return ImportedPolicy(spec=spec, graphs=models, sources=sources, tokenizer=tokenizer, masks=tuple(masks),
                          uncertainty=uncertainty)


# -- tensor descriptions ----------------------------------------------------------------------------------
def _dims(value: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    return dims


def _type(value: Any) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def _describe(value: Any) -> str:
    return f"{_type(value)} [{', '.join('?' if d is None else str(d) for d in _dims(value))}]"


def _inputs(model: Any) -> dict[str, Any]:
    initializers = {i.name for i in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in initializers}


def check_vision(model: Any, spec: PolicySpec, where: str) -> list[str]:
    """Check the vision graph's camera inputs; returns its output names."""
    inputs = _inputs(model)
    wanted = {spec.camera_input(c): c for c in spec.cameras}
    for name in inputs:
        if name not in wanted:
            raise OnnxImportError(f"vision graph {where}: input '{name}' is no camera of the spec; the spec's "
                                  f"cameras need inputs {sorted(wanted)}")
    for name, camera in wanted.items():
        expected = f"uint8 [{camera.height}, {camera.width}, 3] or [1, {camera.height}, {camera.width}, 3]"
        if name not in inputs:
            raise OnnxImportError(f"vision graph {where}: no input '{name}' for camera '{camera.name}' (expected "
                                  f"{expected}); its inputs: {sorted(inputs)}")
        value = inputs[name]
        dims = _dims(value)
        if len(dims) == 4 and (dims[0] in (1, None) or isinstance(dims[0], str)):  # batch of one
            dims = dims[1:]
        if _type(value) != "uint8" or dims != [camera.height, camera.width, 3]:
            raise OnnxImportError(f"vision graph {where}: input '{name}' is {_describe(value)}, expected {expected} "
                                  f"(camera '{camera.name}' of the spec)")
        # TensorRT: a kUINT8 network input must be converted (Cast/Identity) to float or half before any
        # other layer reads it (TensorRT NvInferRuntimeBase.h, DataType::kUINT8), so only Casts may read it.
        for node in model.graph.node:
            if name in node.input and node.op_type != "Cast":
                raise OnnxImportError(f"vision graph {where}: uint8 input '{name}' feeds {node.op_type} node "
                                      f"'{node.name}'; TensorRT requires a uint8 input to feed only a Cast to float: "
                                      "cast the image first (image.float() in torch)")
        if name in {o.name for o in model.graph.output}:
            raise OnnxImportError(f"vision graph {where}: input '{name}' is also an output")
    outputs = []
    for output in model.graph.output:
        if _type(output) not in ("float32", "float16"):
            raise OnnxImportError(f"vision graph {where}: output '{output.name}' is {_describe(output)}, expected "
                                  "float features")
        outputs.append(output.name)
    return outputs


def check_language(model: Any, spec: PolicySpec, where: str) -> int:
    """Check the language graph's token inputs; returns the embedding width D."""
    assert spec.language is not None
    inputs = _inputs(model)
    tokens = spec.language.max_tokens
    if set(inputs) != {"input_ids", "attention_mask"}:
        raise OnnxImportError(f"language graph {where}: inputs are {sorted(inputs)}, expected input_ids and "
                              f"attention_mask (int64 [N, {tokens}])")
    for name, value in inputs.items():
        dims = _dims(value)
        if _type(value) != "int64" or len(dims) != 2 or dims[1] != tokens:
            raise OnnxImportError(f"language graph {where}: input '{name}' is {_describe(value)}, expected int64 "
                                  f"[N, {tokens}] (spec.language.max_tokens)")
    output = model.graph.output[0]
    dims = _dims(output)
    if _type(output) not in ("float32", "float16") or len(dims) != 2 or not isinstance(dims[1], int):
        raise OnnxImportError(f"language graph {where}: output '{output.name}' is {_describe(output)}, expected "
                              "float [N, D] with a fixed D")
    return int(dims[1])


def check_head(model: Any, spec: PolicySpec, vision_outputs: list[str], language_width: int | None,
               where: str) -> None:
    inputs = _inputs(model)
    allowed = set(vision_outputs) | {"proprio"} | ({"language_features"} if spec.language is not None else set())
    for name in inputs:
        if name.startswith(MASK_PREFIX):
            continue
        if name not in allowed:
            raise OnnxImportError(f"head graph {where}: input '{name}' is none of the vision graph's outputs "
                                  f"{vision_outputs}, proprio" + (", language_features" if spec.language else "")
                                  + " or dropout_mask_<i>")
    checks = [("proprio", spec.proprio.dim, "spec.proprio")] if spec.proprio.dim else []
    if spec.language is not None:
        checks.append(("language_features", language_width, "the language graph's output width"))
    for name, width, what in checks:
        value = inputs.get(name)
        if value is None or _type(value) != "float32" or _dims(value)[-1:] != [width]:
            got = "missing" if value is None else _describe(value)
            raise OnnxImportError(f"head graph {where}: input '{name}' is {got}, expected float32 [1, {width}] "
                                  f"({what})")
    if not spec.proprio.dim and "proprio" in inputs:
        raise OnnxImportError(f"head graph {where}: takes 'proprio' {_describe(inputs['proprio'])} but the spec "
                              "has no proprio")
    output = model.graph.output[0]
    dims = _dims(output)
    horizon, dim = spec.action.horizon, spec.action.dim
    expected = f"[T, {horizon}, {dim}]" + (f" or [T, {dim}]" if horizon == 1 else "")
    fits = (len(dims) == 3 and dims[1:] == [horizon, dim]) or (len(dims) == 2 and horizon == 1 and dims[1] == dim)
    if not fits:
        raise OnnxImportError(f"head graph {where}: output '{output.name}' is {_describe(output)}, expected "
                              f"{expected} (spec.action horizon and channels)")


# -- dropout -> masks -------------------------------------------------------------------------------------
def _constant(model: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def rewrite_dropout(model: Any, spec: PolicySpec, where: str, uncertainty: str) -> tuple[Any, list[DropoutMask]]:
    """A copy of the head with every Dropout node a Mul by a mask input ('mc_dropout') or removed ('none')."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    head = onnx.ModelProto()
    head.CopyFrom(model)
    existing = sorted(n for n in _inputs(head) if n.startswith(MASK_PREFIX))
    dropouts = [n for n in head.graph.node if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")]
    if existing and dropouts:
        raise OnnxImportError(f"head graph {where} has both mask inputs {existing} and Dropout nodes; keep one")
    if uncertainty == "mc_dropout" and not dropouts and not existing:
        raise OnnxImportError(f"head graph {where} has no Dropout node, so MC-dropout has nothing to sample. "
                              f"torch removes nn.Dropout when exporting in eval mode: {KEEP_DROPOUT}")
    if uncertainty == "mc_dropout" and spec.dropout_rate is None:
        raise OnnxImportError(f"head graph {where} samples dropout but spec.dropout_rate is null: state the rate "
                              "the head was trained with")
    inferred = shape_inference.infer_shapes(head)
    values = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    consumers = {name for node in head.graph.node for name in node.input}
    graph_outputs = {o.name for o in head.graph.output}
    masks: list[DropoutMask] = []
    new_nodes = []
    dropout_ids = {id(n) for n in dropouts}
    for node in head.graph.node:
        if id(node) not in dropout_ids:
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        if len(node.output) > 1 and node.output[1] and (node.output[1] in consumers or node.output[1] in graph_outputs):
            raise OnnxImportError(f"head graph {where}: the mask output of Dropout node '{label}' is used; only "
                                  "the dropped-out tensor may be read")
        if uncertainty == "none":
            new_nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=f"{label}_removed"))
            continue
        _check_ratio(head, node, spec.dropout_rate, where, label)
        source = values.get(node.input[0])
        dims = _dims(source) if source is not None else []
        if source is None or _type(source) != "float32" or len(dims) < 2 or not isinstance(dims[-1], int):
            got = "unknown" if source is None else _describe(source)
            raise OnnxImportError(f"head graph {where}: Dropout node '{label}' reads '{node.input[0]}' of {got}; "
                                  "a mask needs a float32 tensor [1, width] (or [1, ..., width]) with a fixed width")
        name = f"{MASK_PREFIX}{len(masks)}"
        shape: tuple[int | str, ...] = ("T", *([1] * (len(dims) - 2)), int(dims[-1]))
        head.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        new_nodes.append(helper.make_node("Mul", [node.input[0], name], [node.output[0]], name=f"{label}_mc_mask"))
        masks.append(DropoutMask(input=name, node=label, width=int(dims[-1]), shape=shape))
    for name in existing:
        dims = _dims(_inputs(head)[name])
        masks.append(DropoutMask(input=name, node="", width=int(dims[-1]), shape=tuple(d or "T" for d in dims)))
    del head.graph.node[:]
    head.graph.node.extend(new_nodes)
    _drop_unused_constants(head)
    if dropouts:
        del head.graph.value_info[:]  # shapes downstream of a mask now carry T
        if uncertainty == "mc_dropout":
            for output in head.graph.output:
                dim = output.type.tensor_type.shape.dim
                if dim:
                    dim[0].Clear()
                    dim[0].dim_param = "T"
        try:
            head = shape_inference.infer_shapes(head, strict_mode=True)
        except shape_inference.InferenceError as exc:
            raise OnnxImportError(f"head graph {where}: shapes do not infer once the dropout masks carry T "
                                  f"samples ({exc}); the head must broadcast a batch of one to T") from exc
    try:
        onnx.checker.check_model(head)
    except onnx.checker.ValidationError as exc:
        raise OnnxImportError(f"head graph {where}: the graph with dropout masks fails onnx.checker ({exc})") from exc
    return head, masks


def verify_masks(masked: Any, plain: Any, masks: list[DropoutMask], spec: PolicySpec, where: str) -> None:
    """Run the rewritten head once: masks of ones must give exactly the head without dropout, and random
    masks must change the actions (a Dropout on a branch that never reaches them samples nothing)."""
    import onnxruntime as ort

    def session(model: Any) -> Any:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    feeds = {}
    for name, value in _inputs(plain).items():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in _dims(value)]
        feeds[name] = rng.normal(size=dims).astype(onnx_numpy_type(value))
    output = masked.graph.output[0].name
    expected = session(plain).run([output], feeds)[0]
    runner = session(masked)
    ones = {m.input: np.ones([1 if d == "T" else d for d in m.shape], np.float32) for m in masks}
    got = runner.run([output], {**feeds, **ones})[0]
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise OnnxImportError(f"head graph {where}: with dropout masks of ones the head does not reproduce its "
                              "inference-mode output; report this with the graph")
    keep = 1.0 - float(spec.dropout_rate or 0.0)
    samples = 8
    drawn = {m.input: (rng.random([samples if d == "T" else d for d in m.shape]) < keep).astype(np.float32) / keep
             for m in masks}
    sampled = runner.run([output], {**feeds, **drawn})[0]
    if sampled.shape[0] != samples or np.array_equal(sampled, np.broadcast_to(got, sampled.shape)):
        raise OnnxImportError(f"head graph {where}: {samples} random dropout masks give {list(sampled.shape)} "
                              "actions all equal to the unmasked ones; the Dropout nodes "
                              f"{[m.node for m in masks]} do not reach the actions, or the head does not "
                              "broadcast a batch of one to T samples")


def onnx_numpy_type(value: Any) -> np.dtype:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)


def _check_ratio(model: Any, node: Any, rate: float | None, where: str, label: str) -> None:
    ratio = next((a.f for a in node.attribute if a.name == "ratio"), None)  # opset < 12 keeps it an attribute
    if len(node.input) > 1 and node.input[1]:
        value = _constant(model, node.input[1])
        if value is None:
            raise OnnxImportError(f"head graph {where}: Dropout node '{label}' takes its ratio from a computed "
                                  f"tensor '{node.input[1]}'; export it with a constant rate")
        ratio = float(np.asarray(value).reshape(-1)[0])
    ratio = 0.5 if ratio is None else ratio  # the ONNX Dropout default
    if rate is not None and abs(ratio - rate) > 1e-6:
        raise OnnxImportError(f"head graph {where}: Dropout node '{label}' has ratio {ratio:g} but spec.dropout_rate "
                              f"is {rate:g}; set the spec to the rate the head was trained with")


def _drop_unused_constants(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
