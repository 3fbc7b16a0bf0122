"""One error root for the build: every step's error is an EdgeError carrying its exit code, each step
raises its own, and `build-engines` ends every failure in one line on stderr, never a traceback."""

import logging
import re
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from build_engines import build, cli, errors, layout, quantize, tensorrt_builder
from build_engines.build import BuildOptions
from build_engines.errors import (
    BuildError,
    CalibrationError,
    EngineBuildError,
    ExportError,
    GateRefused,
    LayoutError,
    QuantizationError,
)
from edge.errors import BundleError, EdgeError, InputError
from edge.inference import cuda
from edge.inference.backends.base import TensorSpec
from tests.fakes.conftest_fakes import fake_gpu, mlp_model

STEP_ERRORS = [
    (BuildError("output exists"), 1),
    (ExportError("vision: ONNX output differs from PyTorch"), 1),
    (CalibrationError("calibrating vision failed"), 1),
    (QuantizationError("the graph fails onnx.checker"), 1),
    (LayoutError("vision_int8_trt.onnx", "TensorRT", ["zero point 3", "per-tensor weight"]), 1),
    (EngineBuildError("TensorRT failed to build vision_fp16.onnx"), 1),
    (GateRefused("accuracy gate refused the bundle: vision int8_cpu", {}), 3),
]
IDS = [type(error).__name__ for error, _ in STEP_ERRORS]


def _refusal_report() -> dict:
    return {"passed": False, "failures": ["vision int8_cpu: feature cosine 0.5000 < 0.98"], "heldout_samples": 8,
            "graphs": {}, "closed_loop": {}}


def _stderr_line(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0], captured.out


@pytest.mark.parametrize(("error", "code"), STEP_ERRORS, ids=IDS)
def test_every_step_error_is_an_edge_error_with_its_exit_code(error, code):
    assert isinstance(error, BuildError) and isinstance(error, EdgeError)
    assert type(error).exit_code == code
    assert type(error).__doc__  # says when it is raised


def test_layout_error_stays_a_bundle_error():
    # The same check applies to a bundle's graphs outside the build.
    assert issubclass(LayoutError, BundleError)


def test_old_import_paths_give_the_one_definition():
    from build_engines import export

    assert build.BuildError is errors.BuildError and build.GateRefused is errors.GateRefused
    assert tensorrt_builder.BuildError is errors.BuildError
    assert layout.LayoutError is errors.LayoutError and export.ExportError is errors.ExportError


@pytest.mark.parametrize(("error", "code"), STEP_ERRORS[:-1], ids=IDS[:-1])
def test_cli_maps_each_build_error_to_its_code_in_one_line(tmp_path, capsys, monkeypatch, error, code):
    def failing(options):
        raise error

    monkeypatch.setattr(cli, "run_build", failing)
    assert cli.main(["--out", str(tmp_path / "bundle")]) == code
    line, _ = _stderr_line(capsys)
    assert line.startswith("build-engines: error: ")
    if isinstance(error, LayoutError):  # its violations, listed over several lines, all in the one line
        assert "zero point 3" in line and "per-tensor weight" in line and "rebuild the INT8 graphs" in line


def test_gate_refusal_still_exits_3_with_the_report_beside_the_output(tmp_path, capsys, monkeypatch):
    def refused(options):
        raise GateRefused("accuracy gate refused the bundle: vision int8_cpu: feature cosine 0.5000 < 0.98",
                          _refusal_report())

    monkeypatch.setattr(cli, "run_build", refused)
    assert cli.main(["--out", str(tmp_path / "bundle")]) == 3
    line, out = _stderr_line(capsys)
    report = tmp_path / "bundle.refused.json"
    assert line == (f"build-engines: refused: accuracy gate refused the bundle: vision int8_cpu: feature cosine "
                    f"0.5000 < 0.98 (report: {report})")
    assert report.is_file() and "Verdict: REFUSED" in out


def test_runtime_errors_end_in_one_line_too(tmp_path, capsys, monkeypatch):
    def bad_data(options):
        raise InputError("calibration source image folder x gave 3 samples; at least 64 are needed")

    monkeypatch.setattr(cli, "run_build", bad_data)
    assert cli.main(["--out", str(tmp_path / "bundle")]) == 1
    line, _ = _stderr_line(capsys)
    assert line == "build-engines: error: calibration source image folder x gave 3 samples; at least 64 are needed"


def test_interrupt_exits_130_in_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_build", interrupted)
    assert cli.main(["--out", str(tmp_path / "bundle")]) == 130
    line, _ = _stderr_line(capsys)
    assert line == "build-engines: interrupted"


def test_help_lists_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    epilog = capsys.readouterr().out.split("Exit codes:", 1)[1]
    for code in (0, BuildError.exit_code, GateRefused.exit_code, cli.EXIT_INTERRUPTED):
        assert re.search(rf"^\s+{code}\s+\S", epilog, re.MULTILINE), code
    assert cli.EXIT_CODES in cli.__doc__  # the module docstring and --help say the same


def test_failed_tensorrt_engine_build_exits_1_in_one_line(tmp_path, capsys, monkeypatch):
    """The real CLI, run_build and engine step on a fake TensorRT whose builder returns no engine, as
    TensorRT reports a failed build; the earlier steps are replaced by one tiny graph to build."""
    trt, cudart = fake_gpu("10.3.0")
    trt.fake.build_failure = "Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(cuda, "load_runtime", lambda: cudart)

    def only_the_engine_step(root, options, plan):
        files = {"vision": {"fp16": mlp_model(root / "vision_fp16.onnx")}}
        spec = SimpleNamespace(name="vision", inputs=(TensorSpec("x", "float32", (-1, 4)),),
                               outputs=(TensorSpec("y", "float32", (-1, 3)),))
        with build.step("TensorRT engines"):
            build._tensorrt_engines(root, options, files, {"vision": {"spec": spec}},
                                    {"vision": {"x": np.zeros((1, 4), np.float32)}})
        raise AssertionError("the engine build was expected to fail")

    monkeypatch.setattr(build, "plan_build", lambda options: None)  # policy and data are not this test's subject
    monkeypatch.setattr(build, "_build_into", only_the_engine_step)
    out = tmp_path / "bundle"
    assert cli.main(["--out", str(out), "--tensorrt", "auto"]) == 1
    line, _ = _stderr_line(capsys)
    assert line.startswith("build-engines: error: TensorRT 10.3.0 failed to build vision_fp16.onnx (fp16): ")
    assert "OutOfMemory" in line
    assert trt.fake.call_names().count("Builder.build_serialized_network") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no bundle, no half-built directory


def test_each_step_raises_its_own_error(tmp_path):
    from build_engines import export

    with pytest.raises(ExportError, match="differs from PyTorch"):
        export._compare("head", np.zeros(2, np.float32), np.ones(2, np.float32), atol=1e-4)
    with pytest.raises(CalibrationError, match="--calib-method must be one of"):
        build.run_build(BuildOptions(out=tmp_path / "b", calib_method="median"))
    with pytest.raises(QuantizationError, match="fails onnx.checker"):
        quantize._write_checked(onnx.ModelProto(), tmp_path / "broken.onnx")
    with pytest.raises(LayoutError, match="no Conv/Gemm/MatMul has quantized inputs"):
        layout.verify_cpu_layout(mlp_model(tmp_path / "fp32.onnx"))
    trt, _ = fake_gpu("10.3.0")
    with pytest.raises(EngineBuildError, match="does not exist"):
        tensorrt_builder.build_engine(tmp_path / "none.onnx", precision="fp32", profile={}, timing_cache_path=None,
                                      trt=trt)
    assert not (tmp_path / "broken.onnx").exists() and not (tmp_path / "b").exists()


def test_onnx_runtime_quantization_info_lines_are_dropped_but_its_warnings_and_ours_kept():
    # Issue 13, finding 13: ONNX Runtime's quantization INFO lines were 124 of 220 lines of a build log.
    import importlib

    from build_engines.cli import QuietOnnxRuntimeInfo

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package shadows the name

    def record(name, level, pathname):
        return logging.LogRecord(name, level, pathname, 1, "message", None, None)

    quiet = QuietOnnxRuntimeInfo()
    assert not quiet.filter(record("root", logging.INFO, ort_quantize.__file__))
    assert quiet.filter(record("root", logging.WARNING, ort_quantize.__file__))
    assert quiet.filter(record("build_engines.quantize", logging.INFO, __file__))
    assert quiet.filter(record("root", logging.INFO, __file__))  # someone else's root INFO line stays
