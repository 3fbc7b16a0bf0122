"""TensorRT engines for the reference bundle, built and verified on the fake TensorRT 10 and 11 APIs,
then driven by the runtime pipeline: the same outputs as ONNX Runtime on the same graphs."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from build_engines.build import BuildOptions
from build_engines.layout import TensorRTGraphError, verify_tensorrt_graph
from build_engines.manifest import write_manifest
from build_engines.tensorrt_engines import build_all
from edge.errors import BackendError, BundleError
from edge.inference.backends.base import TensorSpec
from edge.inference.bundle import Bundle
from edge.inference.pipeline import PolicyPipeline
from edge.service.config import config_from_dict
from edge.service.wiring import backend_factory
from reference_world.world import TabletopWorld
from tests.fakes.conftest_fakes import fake_gpu


def _engine_bundle(reference_bundle, tmp_path, version):
    root = tmp_path / "bundle"
    shutil.copytree(reference_bundle[0], root)
    bundle = Bundle.load(root)
    files = {g: {v: root / p for v, p in e.files.items()} for g, e in bundle.graphs.items()}
    exported = {g: {"spec": SimpleNamespace(name=g, inputs=e.inputs, outputs=e.outputs)}
                for g, e in bundle.graphs.items()}
    reference_inputs = {}
    for graph in files:
        with np.load(root / "reference" / f"{graph}_inputs.npz") as data:
            reference_inputs[graph] = {k: data[k] for k in data.files}
    trt, cudart = fake_gpu(version)
    options = BuildOptions(out=root, max_mc_samples=bundle.dropout["max_samples"],
                           default_mc_samples=bundle.dropout["default_samples"])
    entries = build_all(root, options, files, exported, None, reference_inputs, trt=trt, cudart=cudart)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["engines"] = entries
    write_manifest(root, manifest)
    return root, entries, trt, cudart


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_engines_built_verified_and_keyed(reference_bundle, tmp_path, version):
    root, entries, _, _ = _engine_bundle(reference_bundle, tmp_path, version)
    built = {(e["graph"], e["variant"]) for e in entries}
    assert built == {("vision", "int8-tensorrt"), ("head", "int8-tensorrt"), ("vision", "fp16"), ("head", "fp16"),
                     ("language", "fp16")}
    for entry in entries:
        assert (root / entry["path"]).is_file()
        assert (root / (entry["path"] + ".key.json")).is_file()
        assert entry["tensorrt_version"] == version and entry["compute_capability"] == "8.7"
    assert len(Bundle.load(root).engines) == len(entries)


def test_runtime_on_tensorrt_engines_matches_onnxruntime(reference_bundle, tmp_path):
    root, _, trt, cudart = _engine_bundle(reference_bundle, tmp_path, "10.3.0")
    bundle = Bundle.load(root)
    config = config_from_dict({"bundle": str(root), "camera": {"source": 0}, "motor": {"port": "loop://"},
                               "policy": {"target": "tensorrt", "backend": "tensorrt"}})
    obs = TabletopWorld().reset(77)
    outputs = {}
    for name, factory in (("tensorrt", backend_factory(bundle, config, trt=trt, cudart=cudart)), ("ort", None)):
        with PolicyPipeline(bundle, target="tensorrt", mc_samples=8, mask_seed=3, backend_factory=factory) as p:
            embedding = p.cache.encode_now(obs.instruction)
            out = p.infer(obs.frame, obs.proprio, embedding)
            outputs[name] = (out.action.copy(), out.score)
    np.testing.assert_allclose(outputs["tensorrt"][0], outputs["ort"][0], atol=1e-4)
    assert outputs["tensorrt"][1] == pytest.approx(outputs["ort"][1], abs=1e-4)


def test_engine_from_another_gpu_is_refused(reference_bundle, tmp_path):
    root, _, _, _ = _engine_bundle(reference_bundle, tmp_path, "10.3.0")
    bundle = Bundle.load(root)
    config = config_from_dict({"bundle": str(root), "camera": {"source": 0}, "motor": {"port": "loop://"},
                               "policy": {"target": "tensorrt", "backend": "tensorrt"}})
    trt, cudart = fake_gpu("10.3.0", compute_capability=(8, 9))  # same TensorRT, another GPU
    make = backend_factory(bundle, config, trt=trt, cudart=cudart)
    entry = bundle.graphs["head"]
    backend = make("head", "int8-tensorrt", entry.inputs, entry.outputs, 32)
    with pytest.raises((BundleError, BackendError), match="build-engines --engines-only"):
        backend.activate()
    with pytest.raises(BundleError, match="no TensorRT engine for the fp32 head graph"):
        make("head", "fp32", entry.inputs, entry.outputs, 32)
    assert isinstance(entry.inputs[0], TensorSpec)


def _parser_errors(trt, path) -> list[str]:
    logger = trt.Logger(trt.Logger.WARNING)
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    parser.parse(path.read_bytes(), str(path))
    return [f"{parser.get_error(i).node_operator()}: {parser.get_error(i).desc()}" for i in range(parser.num_errors)]


def _old_preprocessing_order(model):
    """The vision graph as the encoder exported it before: uint8 frame -> Transpose -> Gather -> Cast."""
    nodes = list(model.graph.node)
    frame = model.graph.input[0].name
    cast = next(n for n in nodes if n.op_type == "Cast" and n.input[0] == frame)
    transpose = next(n for n in nodes if n.op_type == "Transpose" and n.input[0] == cast.output[0])
    gather = next(n for n in nodes if n.op_type == "Gather" and n.input[0] == transpose.output[0])
    gathered = gather.output[0]
    transpose.input[0], gather.output[0] = frame, "gathered_uint8"
    cast.input[0], cast.output[0] = "gathered_uint8", gathered
    order = [n for n in nodes if n is not cast]
    order.insert(order.index(gather) + 1, cast)
    del model.graph.node[:]
    model.graph.node.extend(order)
    del model.graph.value_info[:]  # the types recorded for the new order; shape inference gives the old ones
    return model


def test_the_bundles_tensorrt_graphs_pass_the_strict_parser_and_the_old_vision_order_fails(reference_bundle,
                                                                                            tmp_path):
    import onnx

    bundle = Bundle.load(reference_bundle[0])
    trt, _ = fake_gpu("10.3.0")
    for target in ("tensorrt", "fp16"):
        for graph, variant in sorted(bundle.target_variants(target).items()):
            assert _parser_errors(trt, bundle.graph_path(graph, variant)) == [], (graph, variant)
    # the CPU layout is not for TensorRT: uint8 activations and int32 biases are types it refuses
    cpu_errors = set(_parser_errors(trt, bundle.graph_path("vision", "int8-cpu")))
    assert "QuantizeLinear: TensorRT does not support UINT8 types for intermediate tensors!" in cpu_errors
    assert any(e.startswith("DequantizeLinear: DequantizeLinear does not support input") and "of type INT32" in e
               for e in cpu_errors)
    for variant in ("int8-tensorrt", "fp16"):
        old = tmp_path / f"vision_{variant}_old.onnx"
        onnx.save(_old_preprocessing_order(onnx.load(str(bundle.graph_path("vision", variant)))), str(old))
        onnx.checker.check_model(str(old))  # a valid ONNX graph: onnxruntime would run it
        assert _parser_errors(trt, old)[0] == "Transpose: TensorRT does not support UINT8 types for intermediate " \
                                              "tensors!"
        with pytest.raises(TensorRTGraphError, match="uint8 input 'image' feeds Transpose"):
            verify_tensorrt_graph(old)  # and the build names it before TensorRT is reached
