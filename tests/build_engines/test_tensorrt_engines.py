"""TensorRT engines for the reference bundle, built and verified on the fake TensorRT 10 and 11 APIs,
then driven by the runtime pipeline: the same outputs as ONNX Runtime on the same graphs."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from build_engines.build import BuildOptions
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
    with pytest.raises((BundleError, BackendError), match="build-engines --int8"):
        backend.activate()
    with pytest.raises(BundleError, match="no TensorRT engine for the fp32 head graph"):
        make("head", "fp32", entry.inputs, entry.outputs, 32)
    assert isinstance(entry.inputs[0], TensorSpec)
