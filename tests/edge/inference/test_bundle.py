"""A bundle is refused when its files do not match the manifest, with the command that fixes it."""

import json
import shutil

import pytest

from edge.errors import BundleError
from edge.inference.bundle import REBUILD, Bundle


@pytest.fixture()
def bundle_copy(reference_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(reference_bundle[0], copy)
    return copy


def test_reference_bundle_verifies_and_lists_every_file(reference_bundle):
    root = reference_bundle[0]
    bundle = Bundle.load(root)
    listed = set(bundle.manifest["files"])
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in ("manifest.json", "manifest.sha256")}
    assert listed == on_disk
    for graph in ("vision", "language", "head"):
        assert bundle.graph_path(graph, "fp32").is_file()
    assert set(bundle.manifest["targets"]) >= {"cpu", "cpu-fp32", "tensorrt", "fp16"}
    assert bundle.uncertainty_threshold("cpu") > 0
    assert len(bundle.embeddings()) == len(bundle.manifest["embeddings"]["instructions"])


def test_modified_graph_is_refused(bundle_copy):
    graph = bundle_copy / "graphs" / "head_int8_cpu.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="head_int8_cpu.onnx does not match its sha256") as err:
        Bundle.load(bundle_copy)
    assert REBUILD in str(err.value)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        Bundle.load(bundle_copy)


def test_missing_manifest_and_wrong_schema(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(tmp_path / "nothing")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.load(bundle_copy)


def test_unknown_target_and_variant(reference_bundle):
    bundle = Bundle.load(reference_bundle[0], verify_hashes=False)
    with pytest.raises(BundleError, match="no target"):
        bundle.target_variants("gpu-magic")
    with pytest.raises(BundleError, match="no int4"):
        bundle.graph_path("vision", "int4")
