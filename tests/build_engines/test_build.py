"""The offline build end to end (small settings): bundle contents, layouts, reference data, the gate
refusing a deliberately broken graph, atomic output and CLI errors."""

import json

import numpy as np
import onnx
import pytest

from build_engines import build, cli, quantize
from build_engines.build import BuildError, BuildOptions, GateRefused, Tolerances, run_build
from build_engines.cpu_candidates import CANDIDATES, REDUCED_WEIGHT_MAX
from build_engines.layout import verify_cpu_layout, verify_tensorrt_layout
from build_engines.polygraphy_io import load_inputs, load_outputs
from edge.inference.bundle import Bundle


def test_bundle_has_every_graph_and_report(reference_bundle):
    root, summary = reference_bundle
    bundle = Bundle.load(root)
    files = bundle.manifest["graphs"]
    # the CPU INT8 candidates the gate passed (test_the_cpu_int8_candidates_are_their_own_gated_targets)
    shipped = {bundle.manifest["targets"][c.target]["vision"] for c in CANDIDATES
               if c.target in bundle.manifest["targets"]}
    int8 = {"int8-tensorrt", "int8-cpu", *shipped}
    assert set(files["vision"]["variants"]) == {"fp32", "fp16", *int8}
    assert set(files["head"]["variants"]) == {"fp32", "fp16", *int8}
    assert set(files["language"]["variants"]) == {"fp32", "int8-cpu", "fp16"}
    for graph in files.values():
        for entry in graph["variants"].values():
            onnx.checker.check_model(str(root / entry["path"]))
    head_inputs = {s["name"]: s for s in files["head"]["inputs"]}
    assert head_inputs["dropout_mask_0"]["shape"] == [-1, 256]  # dynamic T
    assert head_inputs["vision_features"]["shape"] == [1, 196, 112]
    assert files["vision"]["inputs"][0] == {"name": "image", "dtype": "uint8", "shape": [-1, 224, 224, 3]}
    report = json.loads((root / "reports" / "accuracy.json").read_text())
    assert report["passed"] and report["graphs"]["vision"]["int8-cpu"]["cosine_mean"] > 0.95
    assert (root / "reports" / "accuracy.md").read_text().startswith("# Accuracy report")
    assert bundle.manifest["engines"] == []  # no TensorRT here
    uncertainty = bundle.manifest["uncertainty"]
    assert "quantile" in uncertainty["method"] and uncertainty["threshold"]["cpu"] > 0
    assert summary["report"]["latency_ms"]["vision"]["int8-cpu"] > 0


def test_the_cpu_int8_candidates_are_their_own_gated_targets(reference_bundle):
    """Each candidate either ships (its target, graphs with their measured accuracy and latency, session
    config, reference outputs, threshold) or is recorded as left out with the gate's reason and no file."""
    root, summary = reference_bundle
    manifest = Bundle.load(root).manifest
    report = json.loads((root / "reports" / "accuracy.json").read_text())
    dropped = {d["target"]: d for d in manifest["gate"]["dropped_targets"]}
    assert report["dropped_targets"] == manifest["gate"]["dropped_targets"]
    assert manifest["gate"]["optional_targets"] == [c.target for c in CANDIDATES]
    tolerances = build.Tolerances()
    for candidate in CANDIDATES:
        variant = candidate.variant
        expected_targets = {"vision": variant, "language": "int8-cpu", "head": variant}
        if candidate.target in dropped:
            record = dropped[candidate.target]
            assert candidate.target not in manifest["targets"] and record["variants"] == expected_targets
            assert record["reasons"] and record["stage"] in ("held-out accuracy", "closed loop", "open-loop replay")
            if record["stage"] == "held-out accuracy":  # the measured rows that failed are kept in the record
                assert record["accuracy"]["vision"][variant]["cosine_mean"] < tolerances.min_vision_cosine \
                    or record["accuracy"]["head"][variant]["action_error_mean"] > tolerances.max_head_action_error
            assert not list(root.rglob(f"*{variant.replace('-', '_')}.onnx"))
            assert candidate.target not in manifest["uncertainty"]["threshold"]
            continue
        assert manifest["targets"][candidate.target] == expected_targets
        assert candidate.target in manifest["uncertainty"]["threshold"]
        for graph in ("vision", "head"):
            entry = manifest["graphs"][graph]["variants"][variant]
            assert entry.get("ort_session", {}) == dict(candidate.ort_session)
            assert entry["accuracy_vs_fp32"] == report["graphs"][graph][variant]
            assert summary["report"]["latency_ms"][graph][variant] > 0
            assert variant in manifest["reference"][graph]["outputs"]
            assert f"{graph}_{variant}" in manifest["calibration"]["layout_checks"]
        assert report["graphs"]["vision"][variant]["cosine_mean"] >= tolerances.min_vision_cosine
    for graph in ("vision", "head"):  # the default CPU variant keeps the runtime's defaults
        assert "ort_session" not in manifest["graphs"][graph]["variants"]["int8-cpu"]


def test_tensorrt_graphs_have_the_symmetric_per_channel_layout(reference_bundle):
    root, _ = reference_bundle
    for graph in ("vision", "head"):
        verify_tensorrt_layout(root / f"graphs/{graph}_int8_tensorrt.onnx", root / f"graphs/{graph}_fp32.onnx")
        verify_cpu_layout(root / f"graphs/{graph}_int8_cpu.onnx")
        for candidate in CANDIDATES:  # those the gate passed
            path = root / f"graphs/{graph}_{candidate.variant.replace('-', '_')}.onnx"
            if path.exists():
                verify_cpu_layout(path, max_weight=REDUCED_WEIGHT_MAX if candidate.reduce_range else None)
    qop = root / "graphs/vision_int8_cpu_qop.onnx"
    if qop.exists():
        ops = {n.op_type for n in onnx.load(str(qop)).graph.node}
        assert "QLinearConv" in ops and "Conv" not in ops  # QOperator: no float Conv between Q/DQ pairs
    model = onnx.load(str(root / "graphs/vision_int8_tensorrt.onnx"))
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)


def test_reference_data_replays_through_onnxruntime(reference_bundle):
    import onnxruntime as ort

    from edge.inference.backends.onnxruntime import session_options

    root, _ = reference_bundle
    bundle = Bundle.load(root)
    for graph, entry in bundle.manifest["reference"].items():
        feeds = load_inputs(root / entry["inputs"])[0]
        for variant, outputs_file in entry["outputs"].items():
            expected = next(iter(load_outputs(root / outputs_file).values()))[0]
            options = session_options(ort, 0, bundle.session_config(graph, variant))  # as the runtime does
            session = ort.InferenceSession(str(bundle.graph_path(graph, variant)), options,
                                           providers=["CPUExecutionProvider"])
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, atol=1e-5)
    raw = json.loads((root / "reference/vision_inputs.json").read_text())
    assert raw[0]["image"]["polygraphy_class"] == "ndarray"


def _small(out, **overrides):
    base = dict(out=out, calib_samples=16, min_calib_samples=16, heldout_samples=8, gate_seeds=1, monitor_check_seeds=0, fp16=False,
                tensorrt="off", tolerances=Tolerances(max_success_drop=1.0))
    base.update(overrides)
    return BuildOptions(**base)


def _scramble_conv_weights(path) -> None:
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.dtype == np.int8 and array.ndim == 4:
            init.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(array.ravel()).reshape(array.shape),
                                                       init.name))
    onnx.save(model, str(path))


def test_gate_refuses_a_deliberately_broken_int8_graph(tmp_path, monkeypatch):
    real = quantize.quantize_for_cpu

    def broken(fp32_model, ranges, out_path, *args, **kwargs):
        real(fp32_model, ranges, out_path, *args, **kwargs)
        if "vision" in str(out_path):  # scramble the weights of every CPU vision graph
            _scramble_conv_weights(out_path)

    monkeypatch.setattr(quantize, "quantize_for_cpu", broken)
    out = tmp_path / "bundle"
    with pytest.raises(GateRefused) as refused:
        run_build(_small(out))
    assert any(f.startswith("vision int8-cpu: feature cosine") for f in refused.value.report["failures"])
    assert "vision int8-cpu" in str(refused.value)
    # the optional candidates failed too: recorded as left out, but the required cpu target refuses the bundle
    assert {d["target"] for d in refused.value.report["dropped_targets"]} == {"cpu-qoperator", "cpu-reduce-range"}
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.*"))  # no half-written bundle left behind


def test_a_cpu_candidate_that_fails_the_gate_is_left_out_and_recorded(tmp_path, monkeypatch, caplog):
    real = quantize.quantize_for_cpu

    def broken(fp32_model, ranges, out_path, *args, **kwargs):
        real(fp32_model, ranges, out_path, *args, **kwargs)
        if kwargs.get("reduce_range") and "vision" in str(out_path):  # only the reduce-range vision graph
            _scramble_conv_weights(out_path)

    monkeypatch.setattr(quantize, "quantize_for_cpu", broken)
    out = tmp_path / "bundle"
    with caplog.at_level("WARNING", logger="build_engines.cpu_candidates"):
        run_build(BuildOptions(out=out, policy="tests.build_engines.tiny_policies:image96", calib_samples=32,
                               heldout_samples=8, fp16=False, tensorrt="off", env="none"))
    bundle = Bundle.load(out)  # hashes, schema: the bundle is complete without the candidate
    manifest = bundle.manifest
    assert set(manifest["targets"]) == {"cpu-fp32", "cpu", "cpu-qoperator", "tensorrt"}
    for graph in ("vision", "head"):  # the head's reduce-range graph is left out with its target too
        assert "int8-cpu-rr" not in manifest["graphs"][graph]["variants"]
        assert "int8-cpu-rr" not in manifest["reference"][graph]["outputs"]
        assert f"{graph}_int8-cpu-rr" not in manifest["calibration"]["layout_checks"]
    assert not [p for p in manifest["files"] if "int8_cpu_rr" in p]
    assert not list(out.rglob("*int8_cpu_rr*"))
    assert "cpu-reduce-range" not in manifest["uncertainty"]["threshold"]
    [dropped] = manifest["gate"]["dropped_targets"]
    assert dropped["target"] == "cpu-reduce-range" and dropped["stage"] == "held-out accuracy"
    assert dropped["variants"] == {"vision": "int8-cpu-rr", "language": "int8-cpu", "head": "int8-cpu-rr"}
    assert dropped["reasons"][0].startswith("vision int8-cpu-rr: feature cosine")
    assert dropped["accuracy"]["vision"]["int8-cpu-rr"]["cosine_mean"] < 0.98
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert report["passed"] and report["dropped_targets"] == [dropped]
    assert "optional target cpu-reduce-range left out" in (out / "reports" / "accuracy.md").read_text()
    assert any("cpu-reduce-range left out" in r.getMessage() for r in caplog.records)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_dynamic_int8", interrupt)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        run_build(_small(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_errors(tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert cli.main(["--int8", "--out", str(existing)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["--int8", "--out", str(tmp_path / "b"), "--calib-samples", "4"]) == 1
    assert "--calib-samples 4 is below the minimum" in capsys.readouterr().err
    assert cli.main(["--int8", "--out", str(tmp_path / "c"), "--calib-source", str(tmp_path / "nope")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BuildError, match="cannot create the output's parent directory"):
        build.check_output_location(BuildOptions(out=blocker / "sub" / "bundle"))
