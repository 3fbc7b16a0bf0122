"""The CPU side of `make gpu-check` (tests/gpu_check.py): each step against the fake CUDA runtime and
TensorRT, and ONNX Runtime's CPU provider standing in for its CUDA one; the skip without a GPU."""

from __future__ import annotations

import json

import onnxruntime as ort

from edge.inference.bundle import Bundle
from tests import gpu_check
from tests.fakes.conftest_fakes import fake_gpu
from tests.fakes.fake_cuda import FakeCudaRuntime, cudaError_t


def test_the_cuda_layer_step_copies_and_replays_a_graph_on_the_fake():
    result = gpu_check.check_cuda_layer(FakeCudaRuntime())
    assert result.status == "ok", result.detail
    assert {"round_trip_ms", "round_trip_gb_per_s", "graph_replay_ms"} <= set(result.numbers)


def test_a_cuda_failure_is_reported_with_its_name():
    rt = FakeCudaRuntime()
    rt.fail("cudaMemcpyAsync", cudaError_t.cudaErrorIllegalAddress)
    (result,) = gpu_check.run_all(cudart=rt, ort=None, trt=None, bundle_dir=None, budget_s=60)[:1]
    assert result.status == "fail" and "cudaErrorIllegalAddress" in result.detail


def test_onnxruntime_and_tensorrt_steps_on_the_reference_bundle(reference_bundle):
    bundle = Bundle.load(reference_bundle[0])
    results = gpu_check.check_onnxruntime(ort, bundle, provider="CPUExecutionProvider", device="cpu")
    assert {r.step for r in results} == {f"onnxruntime {g}/{v}" for g in ("head", "language", "vision")
                                         for v in ("fp32", "fp16")}
    assert all(r.status == "ok" for r in results), [r.detail for r in results]
    missing = gpu_check.check_onnxruntime(ort, bundle)  # no CUDAExecutionProvider in CI
    assert missing[0].status == "fail" and "install onnxruntime-gpu" in missing[0].detail

    trt, cudart = fake_gpu("10.3.0")
    engines = gpu_check.check_tensorrt(trt, cudart, reference_bundle[0])
    assert len(engines) == 5 and all(r.status == "ok" and r.numbers["median_ms"] > 0 for r in engines)
    assert not (reference_bundle[0] / "engines").exists()  # built in a copy


def test_the_budget_skips_the_steps_left(tmp_path):
    ticks = iter([0.0, 0.0, 1000.0, 1000.0])
    results = gpu_check.run_all(cudart=FakeCudaRuntime(), ort=ort, trt=None, bundle_dir=tmp_path, budget_s=10,
                                clock=lambda: next(ticks))
    assert [(r.step, r.status) for r in results] == [("cuda layer", "ok"), ("onnxruntime", "skip"),
                                                      ("tensorrt", "skip")]
    assert "budget" in results[1].detail
    table = gpu_check.format_table(results)
    assert table.splitlines()[0].startswith("step") and "SKIP" in table


def test_without_a_gpu_it_skips_in_one_line(capsys, tmp_path):
    code = gpu_check.main(["--json", str(tmp_path / "out.json")], runtime=lambda: (None, "no CUDA GPU is visible"))
    assert code == 0 and capsys.readouterr().out == "gpu-check: skipped: no CUDA GPU is visible\n"
    assert not (tmp_path / "out.json").exists()


def test_with_a_gpu_it_prints_the_table_and_writes_json(capsys, tmp_path):
    out = tmp_path / "out.json"
    code = gpu_check.main(["--json", str(out), "--bundle", str(tmp_path / "none")],
                          runtime=lambda: (FakeCudaRuntime(), None))
    assert code == 0
    written = json.loads(out.read_text())
    assert written["device"] == "Orin (fake)" and written["results"][0]["status"] == "ok"
    assert "cuda layer" in capsys.readouterr().out
