"""The offline build end to end (small settings): bundle contents, layouts, reference data, the gate
refusing a deliberately broken graph, atomic output and CLI errors."""

import json

import numpy as np
import onnx
import pytest

from build_engines import build, cli, quantize
from build_engines.build import BuildError, BuildOptions, GateRefused, Tolerances, run_build
from build_engines.layout import verify_cpu_layout, verify_tensorrt_layout
from build_engines.polygraphy_io import load_inputs, load_outputs
from edge.inference.bundle import Bundle


def test_bundle_has_every_graph_and_report(reference_bundle):
    root, summary = reference_bundle
    bundle = Bundle.load(root)
    files = bundle.manifest["graphs"]
    assert set(files["vision"]["variants"]) == {"fp32", "int8-tensorrt", "int8-cpu", "fp16"}
    assert set(files["head"]["variants"]) == {"fp32", "int8-tensorrt", "int8-cpu", "fp16"}
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


def test_tensorrt_graphs_have_the_symmetric_per_channel_layout(reference_bundle):
    root, _ = reference_bundle
    for graph in ("vision", "head"):
        verify_tensorrt_layout(root / f"graphs/{graph}_int8_tensorrt.onnx", root / f"graphs/{graph}_fp32.onnx")
        verify_cpu_layout(root / f"graphs/{graph}_int8_cpu.onnx")
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
            session = ort.InferenceSession(str(bundle.graph_path(graph, variant)), session_options(ort),
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


def test_gate_refuses_a_deliberately_broken_int8_graph(tmp_path, monkeypatch):
    real = quantize.quantize_for_cpu

    def broken(fp32_model, ranges, out_path, *args, **kwargs):
        real(fp32_model, ranges, out_path, *args, **kwargs)
        if "vision" in str(out_path):  # scramble the weights of the CPU vision graph
            model = onnx.load(str(out_path))
            rng = np.random.default_rng(0)
            for init in model.graph.initializer:
                array = onnx.numpy_helper.to_array(init)
                if array.dtype == np.int8 and array.ndim == 4:
                    init.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(array.ravel()).reshape(array.shape),
                                                               init.name))
            onnx.save(model, str(out_path))

    monkeypatch.setattr(quantize, "quantize_for_cpu", broken)
    out = tmp_path / "bundle"
    with pytest.raises(GateRefused) as refused:
        run_build(_small(out))
    assert any(f.startswith("vision int8-cpu: feature cosine") for f in refused.value.report["failures"])
    assert "vision int8-cpu" in str(refused.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.*"))  # no half-written bundle left behind


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
