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


# --- schema v2: digest, schema, version ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from build_engines import cli

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    assert cli.main(["--policy", "tests.build_engines.tiny_policies:image96", "--out", str(out), "--int8",
                     "--no-fp16", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off",
                     "--log-level", "WARNING"]) == 0
    return out


def edited(source, tmp_path, change):
    from edge.inference.bundle import write_manifest_digest

    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    write_manifest_digest(copy)  # a deliberate edit: only the schema can refuse it now
    return copy


def test_a_v2_bundle_carries_its_spec_and_a_manifest_digest(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    assert bundle.manifest["schema_version"] == 2 and bundle.spec.name == "tiny"
    assert bundle.manifest["spec"]["language"]["tokenizer"] == "tokenizer.json"  # not the build machine's path
    digest = (tiny_bundle / "manifest.sha256").read_text().split()
    assert digest[1] == "manifest.json" and len(digest[0]) == 64


def test_an_edited_manifest_without_its_digest_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["uncertainty"]["threshold"]["cpu"] = 0.5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match manifest.sha256") as err:
        Bundle.load(copy)
    assert REBUILD in str(err.value)
    (copy / "manifest.sha256").unlink()
    with pytest.raises(BundleError, match="has no manifest.sha256"):
        Bundle.load(copy)


@pytest.mark.parametrize("change, where", [
    (lambda m: m["uncertainty"]["threshold"].update(cpu=1e9), "uncertainty/threshold/cpu"),
    (lambda m: m["files"].update({"/tmp/build-1234/graphs/x.onnx": "0" * 64}), "files"),
    (lambda m: m["graphs"]["head"]["variants"]["fp32"].update(path="../outside.onnx"), "graphs/head/variants/fp32/path"),
    (lambda m: m["spec"]["action"].update(low=[-1.0, float("-1e12")]), "spec/action/low/1"),
    (lambda m: m["targets"].update(cpu={"vision": "int8_cpu"}), "targets/cpu/vision"),
    (lambda m: m.pop("dropout"), "(top level)"),
])
def test_the_schema_refuses_out_of_range_or_misplaced_values(tiny_bundle, tmp_path, change, where):
    copy = edited(tiny_bundle, tmp_path, change)
    with pytest.raises(BundleError, match="does not follow the bundle schema v2") as err:
        Bundle.load(copy, verify_hashes=False)
    assert f"at {where}" in str(err.value)


def test_a_v1_bundle_is_refused_naming_the_rebuild_command(tiny_bundle, tmp_path):
    copy = edited(tiny_bundle, tmp_path, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match="schema version 1; this runtime reads version 2") as err:
        Bundle.load(copy)
    assert "build-engines --int8 --out" in str(err.value)


def test_the_rebuild_command_names_the_policy_the_bundle_was_built_from(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    (copy / "graphs" / "head_fp32.onnx").write_bytes(b"not the graph")
    with pytest.raises(BundleError, match="head_fp32.onnx does not match its sha256") as err:
        Bundle.load(copy)
    # rebuilt without --policy, a user's bundle would silently become the reference policy's
    assert f"{REBUILD} --policy tests.build_engines.tiny_policies:image96" in str(err.value)


def test_every_policy_shape_of_schema_v2_is_runnable():
    from edge.inference.bundle import runtime_gaps
    from edge.inference.spec import PolicySpec

    def spec(**changes):
        raw = {"name": "p", "cameras": [{"name": "a", "height": 32, "width": 32}, {"name": "b", "height": 16, "width": 24}],
               "language": None, "proprio": {"names": [], "sources": []},
               "action": {"names": ["j0", "grip"], "horizon": 8, "kinds": ["position", "position"],
                          "low": [-1, 0], "high": [1, 1], "max_slew_per_s": [1, 1]}, "dropout_rate": None}
        raw.update(changes)
        return PolicySpec.from_dict(raw)

    assert runtime_gaps(spec(), "none") == [] and runtime_gaps(spec(dropout_rate=0.1), "mc-dropout") == []
    assert runtime_gaps(spec(), "deep-ensemble") == [
        "the uncertainty signal 'deep-ensemble' (this runtime computes mc-dropout or none)"]


# --- per-variant ONNX Runtime session config (ort_session) --------------------------------------------------


def _session_entry(backend, key: str) -> str:
    return backend._session.get_session_options().get_session_config_entry(key)


@pytest.mark.parametrize("isa", ["AVX2 without VNNI", "AVX-512 VNNI"])
def test_each_cpu_target_loads_with_the_session_config_its_variants_recorded(tiny_bundle, monkeypatch, isa):
    from edge.inference.backends import onnxruntime as backend
    from edge.inference.cpu_isa import x64_quant_precision
    from edge.inference.pipeline import PolicyPipeline

    # The exact INT8 path only where the fast kernels saturate (x86 without VNNI); with VNNI they are exact.
    default = x64_quant_precision(isa)
    assert default == ("1" if isa == "AVX2 without VNNI" else "0")
    monkeypatch.setattr(backend, "_X64_QUANT_PRECISION", lambda: default)
    bundle = Bundle.load(tiny_bundle)
    assert bundle.session_config("vision", "int8-cpu-rr") == {"session.x64quantprecision": "0"}
    assert bundle.session_config("head", "int8-cpu-rr") == {"session.x64quantprecision": "0"}
    assert bundle.session_config("vision", "int8-cpu") == {} == bundle.session_config("head", "int8-cpu-qop")
    expected = {"cpu": default, "cpu-qoperator": default, "cpu-reduce-range": "0", "cpu-fp32": default}
    for target, precision in expected.items():
        with PolicyPipeline(bundle, target=target, mc_samples=4) as pipeline:
            for graph in ("vision", "head"):
                assert _session_entry(pipeline.backends[graph], "session.x64quantprecision") == precision, target
            # the language graph keeps its dynamic INT8 (full-range weights) and so the CPU's default
            assert _session_entry(pipeline.backends["language"], "session.x64quantprecision") == default
            assert pipeline.cache.encode_now("pick up the blue ball").shape[0] == 1


@pytest.mark.parametrize("config, message", [
    ({"session.intra_op.allow_spinning": "0"}, "sets 'session.intra_op.allow_spinning', which this runtime does "
                                               "not apply"),
    ({"session.x64quantprecision": "2"}, "sets session.x64quantprecision to '2'; allowed: '0', '1'"),
])
def test_a_session_config_outside_the_allow_list_is_refused_naming_it(tiny_bundle, tmp_path, config, message):
    copy = edited(tiny_bundle, tmp_path, lambda m: m["graphs"]["vision"]["variants"]["int8-cpu-rr"].update(
        ort_session=config))
    with pytest.raises(BundleError, match="graphs.vision.variants.int8-cpu-rr.ort_session") as err:
        Bundle.load(copy, verify_hashes=False)
    assert message in str(err.value) and REBUILD in str(err.value)
    copy = edited(tiny_bundle, tmp_path / "2", lambda m: m["graphs"]["head"]["variants"]["int8-cpu"].update(
        ort_session={"session.x64quantprecision": 0}))  # not a string: the schema refuses it
    with pytest.raises(BundleError, match="graphs/head/variants/int8-cpu/ort_session"):
        Bundle.load(copy, verify_hashes=False)
