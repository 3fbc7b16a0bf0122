"""Pre-exported ONNX graphs as the first step of a build: `build-engines --onnx-spec policy.yaml`.

`onnx_import.load_onnx_spec` checks the graphs against the spec and rewrites the head's Dropout nodes
into mask inputs. This module gives the checked graphs the bundle's export contract (build_engines/
export.py), so that every later step (calibration, quantization, layout checks, gate, engines) is the
one a `--policy` factory goes through, and the runtime sees the same tensor names:

- vision: one uint8 input per camera, [N, H, W, 3] with N dynamic (a graph exported at batch 1 is
  relaxed to any N and checked at N = 2 against single runs); its one output renamed vision_features;
- language: input_ids / attention_mask [N, max_tokens] (N relaxed the same way), its output renamed
  language_features;
- head: vision_features, language_features, proprio at batch 1; every mask input [T, width] (a mask
  that broadcasts over middle axes, [T, 1, ..., width], is reshaped to that inside the graph); its
  first output renamed actions, [T, A] or [T, H, A] (T = 1 without masks).

Each rewrite is checked by running the graph with ONNX Runtime; what cannot be given the contract is
refused naming the graph, the tensor and how to export it instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.export import GraphSpec
from build_engines.mc_dropout import DropoutLayer
from build_engines.onnx_import import MASK_PREFIX, OnnxImportError, load_onnx_spec
from build_engines.policy import Policy
from edge.inference.backends.base import TensorSpec

logger = logging.getLogger(__name__)

# The build's own producer of the policy, for the manifest's policy.factory (a "module:function").
FACTORY = "build_engines.onnx_import:load_onnx_spec"
DYNAMIC_BATCH = ("export it with a dynamic batch axis, e.g. torch.onnx.export(..., dynamic_axes={'<input>': "
                 "{0: 'batch'}, '<output>': {0: 'batch'}})")


@dataclass(frozen=True)
class ImportedGraphs:
    """The imported policy, in the bundle's contract, ready for the rest of the build."""

    policy: Policy  # spec and tokenizer; no torch modules
    graphs: dict[str, Any]  # role -> onnx.ModelProto
    specs: dict[str, GraphSpec]
    layers: list[DropoutLayer]
    rate: float
    spec_file: str  # the YAML's file name
    provenance: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (YAML, graphs, tokenizer)

    def manifest_entry(self) -> dict[str, Any]:
        return {"name": self.policy.spec.name, "factory": FACTORY, "onnx_spec": self.spec_file,
                "checkpoint": None, "checkpoint_sha256": dict(self.provenance)}


def load_imported(path: str | os.PathLike[str], uncertainty: str) -> ImportedGraphs:
    """Load and check `path` (see onnx_import) and give its graphs the export contract."""
    from edge.inference.bundle import file_sha256

    path = Path(path)
    imported = load_onnx_spec(path, uncertainty="mc_dropout" if uncertainty == "mc-dropout" else "none")
    spec = imported.spec
    if uncertainty == "none" and imported.masks:
        raise OnnxImportError(f"head graph {imported.sources['head'].name} has dropout mask inputs "
                              f"{[m.input for m in imported.masks]} but --uncertainty is none: build with "
                              "--uncertainty mc-dropout, or export the head without its mask inputs")
    graphs = {role: _copy(model) for role, model in imported.graphs.items()}
    where = {role: str(file.name) for role, file in imported.sources.items()}

    vision = graphs["vision"]
    outputs = [o.name for o in vision.graph.output]
    if len(outputs) != 1:
        raise OnnxImportError(f"vision graph {where['vision']} has {len(outputs)} outputs {outputs}; a bundle carries "
                              "one feature tensor from vision to head: concatenate them inside the vision graph")
    if _elem_type(vision.graph.output[0]) != "float32":
        raise OnnxImportError(f"vision graph {where['vision']}: output '{outputs[0]}' is "
                              f"{_elem_type(vision.graph.output[0])}; the head takes float32 features: export "
                              "the vision graph in FP32 (the build makes the FP16 and INT8 variants)")
    head = graphs["head"]
    if outputs[0] not in {i.name for i in head.graph.input}:
        raise OnnxImportError(f"head graph {where['head']} does not read the vision graph's output "
                              f"'{outputs[0]}'")
    for model in (vision, head):
        _rename(model, outputs[0], "vision_features", where["vision"])
    if "language" in graphs:
        language = graphs["language"]
        _keep_first_output(language)
        # the head takes it as language_features already (onnx_import.check_head)
        _rename(language, language.graph.output[0].name, "language_features", where["language"])
    _keep_first_output(head)
    _rename(head, head.graph.output[0].name, "actions", where["head"])
    layers = _square_masks(head, imported.masks, float(spec.dropout_rate or 0.0))

    rng = np.random.default_rng(0)
    camera_inputs = {spec.camera_input(c): (c.height, c.width) for c in spec.cameras}
    for value in vision.graph.input:
        if value.name in camera_inputs and len(value.type.tensor_type.shape.dim) != 4:
            raise OnnxImportError(f"vision graph {where['vision']}: input '{value.name}' has no batch axis "
                                  f"([H, W, 3]); the bundle's vision graph takes uint8 [N, H, W, 3]: "
                                  f"{DYNAMIC_BATCH}")
    vision_out = _relax_batch(vision, where["vision"], lambda n: {
        name: rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) for name, (h, w) in camera_inputs.items()})
    specs = {"vision": GraphSpec("vision", tuple(TensorSpec(name, "uint8", (-1, h, w, 3))
                                                 for name, (h, w) in camera_inputs.items()),
                                 (TensorSpec("vision_features", "float32", (-1, *vision_out.shape[1:])),))}
    head_inputs = {"vision_features": vision_out[:1]}
    if "language" in graphs:
        tokens = spec.language.max_tokens
        language_out = _relax_batch(graphs["language"], where["language"], lambda n: {
            "input_ids": rng.integers(0, 2, (n, tokens), dtype=np.int64),
            "attention_mask": np.ones((n, tokens), np.int64)})
        specs["language"] = GraphSpec(
            "language", (TensorSpec("input_ids", "int64", (-1, tokens)),
                         TensorSpec("attention_mask", "int64", (-1, tokens))),
            (TensorSpec("language_features", "float32", (-1, *language_out.shape[1:])),))
        head_inputs["language_features"] = language_out[:1].astype(np.float32)
    if spec.proprio.dim:
        head_inputs["proprio"] = rng.normal(size=(1, spec.proprio.dim)).astype(np.float32)
    specs["head"] = _head_spec(head, head_inputs, layers, spec, where["head"])
    for role, model in graphs.items():
        _declare(model, specs[role])
    tokenizer = imported.tokenizer
    files = [path, *imported.sources.values(), *([tokenizer] if tokenizer is not None else [])]
    policy = Policy(spec=spec, vision=None, head=None, tokenizer_file=tokenizer)
    logger.info("imported graphs of %s in the bundle contract: vision features %s, %d mask input(s)", path.name,
                list(vision_out.shape[1:]), len(layers))
    return ImportedGraphs(policy=policy, graphs=graphs, specs=specs, layers=layers,
                          rate=float(spec.dropout_rate or 0.0) if layers else 0.0, spec_file=path.name,
                          provenance={Path(f).name: file_sha256(Path(f)) for f in files})


def save_graphs(imported: ImportedGraphs, folder: Path) -> dict[str, dict[str, Any]]:
    """Write the FP32 graphs as the export step does: role -> {path, spec, max_abs_error}."""
    import onnx

    exported = {}
    for role in ("vision", "language", "head"):
        if role not in imported.graphs:
            continue
        path = folder / f"{role}_fp32.onnx"
        onnx.save(imported.graphs[role], str(path))
        exported[role] = {"path": path, "spec": imported.specs[role], "max_abs_error": 0.0}
    return exported


# -- rewrites ---------------------------------------------------------------------------------------------
def _copy(model: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _elem_type(value: Any) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def _rename(model: Any, old: str, new: str, where: str) -> None:
    """Rename tensor `old` to `new` everywhere in the graph (nodes, inputs, outputs, shapes)."""
    if old == new:
        return
    graph = model.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.initializer} \
        | {v.name for v in (*graph.input, *graph.output)}
    if new in taken:
        raise OnnxImportError(f"graph {where} already has a tensor named '{new}' besides '{old}'; rename it (the "
                              f"bundle's contract names this tensor '{new}')")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _keep_first_output(model: Any) -> None:
    """The bundle reads one output per graph; the rest (attention maps, logits...) are dropped."""
    graph = model.graph
    while len(graph.output) > 1:
        graph.output.pop()


def _square_masks(head: Any, masks, rate: float) -> list[DropoutLayer]:
    """Every mask input as [T, width]; a broadcast mask [T, 1, ..., width] is reshaped inside the graph."""
    from onnx import TensorProto, helper, numpy_helper

    layers = []
    wanted = [f"{MASK_PREFIX}{i}" for i in range(len(masks))]
    if sorted(m.input for m in masks) != sorted(wanted):
        raise OnnxImportError(f"head mask inputs must be named {wanted} (one per dropout, numbered from 0); "
                              f"the head has {sorted(m.input for m in masks)}")
    for mask in sorted(masks, key=lambda m: int(m.input[len(MASK_PREFIX):])):
        value = next(v for v in head.graph.input if v.name == mask.input)
        if len(mask.shape) > 2:
            broadcast = f"{mask.input}_broadcast"
            for node in head.graph.node:
                for i, name in enumerate(node.input):
                    if name == mask.input:
                        node.input[i] = broadcast
            shape = numpy_helper.from_array(np.asarray([-1, *mask.shape[1:]], np.int64), f"{broadcast}_shape")
            head.graph.initializer.append(shape)
            head.graph.node.insert(0, helper.make_node("Reshape", [mask.input, shape.name], [broadcast],
                                                       name=f"{broadcast}_reshape"))
        value.CopyFrom(helper.make_tensor_value_info(mask.input, TensorProto.FLOAT, ["T", mask.width]))
        layers.append(DropoutLayer(module=mask.node or mask.input, width=mask.width, rate=rate))
    del head.graph.value_info[:]  # shapes downstream of a reshaped mask are inferred again by the runtime
    return layers


def _session(model: Any, where: str) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph errors
        raise OnnxImportError(f"graph {where} does not load in ONNX Runtime once given the bundle's tensor names "
                              f"({exc})") from exc


def _relax_batch(model: Any, where: str, feeds) -> np.ndarray:
    """Make the leading axis of every input and output dynamic; check batch 2 against two single runs.
    Returns the output at batch 2 (its shape after the batch axis is what the graph gives)."""
    initializers = {i.name for i in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name in initializers:
            continue
        if not dims:
            raise OnnxImportError(f"graph {where}: '{value.name}' has no shape; {DYNAMIC_BATCH}")
        dims[0].Clear()
        dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    session = _session(model, where)
    two = feeds(2)
    output = model.graph.output[0].name
    try:
        batch = session.run([output], two)[0]
        singles = [session.run([output], {k: v[i:i + 1] for k, v in two.items()})[0] for i in range(2)]
    except Exception as exc:  # a Reshape with a fixed batch of one fails at run time
        raise OnnxImportError(f"graph {where} runs only at batch 1 ({type(exc).__name__}: {exc}); the build "
                              f"calibrates and checks it in batches: {DYNAMIC_BATCH}") from exc
    single = np.concatenate(singles)
    if batch.shape != single.shape or not np.allclose(batch, single, rtol=1e-4, atol=1e-5):
        raise OnnxImportError(f"graph {where}: at batch 2 its output differs from two runs at batch 1 (a fixed batch "
                              f"of one inside the graph?); {DYNAMIC_BATCH}")
    return batch


def _head_spec(head: Any, feeds: dict[str, np.ndarray], layers: list[DropoutLayer], spec, where: str) -> GraphSpec:
    """The head's contract, from a run at T = 3 (masks of ones) that must give the spec's action shape."""
    names = [i.name for i in head.graph.input if i.name not in {x.name for x in head.graph.initializer}]
    declared = {}
    for value in head.graph.input:
        if value.name in names and not value.name.startswith(MASK_PREFIX):
            dims = value.type.tensor_type.shape.dim
            if value.name not in feeds:
                raise OnnxImportError(f"head graph {where}: input '{value.name}' is not fed by the bundle "
                                      "(vision_features, language_features, proprio, dropout_mask_<i>)")
            want = feeds[value.name].shape
            got = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            if len(got) != len(want) or any(g not in (None, w) for g, w in zip(got[1:], want[1:])):
                raise OnnxImportError(f"head graph {where}: input '{value.name}' is {got}, the bundle feeds it "
                                      f"{list(want)} (from the other graphs and the spec)")
            dims[0].Clear()
            dims[0].dim_value = 1
            declared[value.name] = TensorSpec(value.name, "float32", tuple(want))
    samples = 3 if layers else 1
    run_feeds = {n: feeds[n] for n in names if n in feeds}
    run_feeds.update({f"{MASK_PREFIX}{i}": np.ones((samples, layer.width), np.float32)
                      for i, layer in enumerate(layers)})
    del head.graph.value_info[:]
    try:
        actions = _session(head, where).run(["actions"], run_feeds)[0]
    except OnnxImportError:
        raise
    except Exception as exc:
        raise OnnxImportError(f"head graph {where} fails on the bundle's inputs ({type(exc).__name__}: {exc})") from exc
    horizon, dim = spec.action.horizon, spec.action.dim
    wanted = (samples, dim) if horizon == 1 else (samples, horizon, dim)
    if actions.shape not in (wanted, (samples, horizon, dim)):
        raise OnnxImportError(f"head graph {where}: with {samples} dropout samples it returns actions "
                              f"{list(actions.shape)}, expected {list(wanted)} (T first, then the spec's chunk)")
    inputs = [declared[n] if n in declared else TensorSpec(n, "float32", (-1, layers[int(n[len(MASK_PREFIX):])].width))
              for n in names]
    out = TensorSpec("actions", "float32", (-1 if layers else 1, *actions.shape[1:]))
    return GraphSpec("head", tuple(inputs), (out,))


def _declare(model: Any, graph_spec: GraphSpec) -> None:
    """Write the contract's shapes into the graph's IO, as the export step does (export._declare_shapes)."""
    declared = {s.name: s for s in (*graph_spec.inputs, *graph_spec.outputs)}
    axis = "T" if graph_spec.name == "head" else "batch"
    for value in (*model.graph.input, *model.graph.output):
        tensor = declared.get(value.name)
        if tensor is None:
            continue
        dims = value.type.tensor_type.shape.dim
        while len(dims) < len(tensor.shape):
            dims.add()
        for dim, size in zip(dims, tensor.shape):
            dim.Clear()
            if size == -1:
                dim.dim_param = axis
            else:
                dim.dim_value = size

