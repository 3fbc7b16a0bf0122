"""`build-engines --engines-only BUNDLE`: engines for this GPU from a finished bundle, on a machine
without torch (the robot), against the fake TensorRT and CUDA; refused in one line without TensorRT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from build_engines.engines_only import build_engines_only
from build_engines.errors import BuildError, EngineBuildError
from edge.inference.bundle import MANIFEST, Bundle
from edge.service.wiring import engine_fit
from tests.fakes.conftest_fakes import fake_gpu

ROOT = Path(__file__).resolve().parents[2]

# Runs the CLI with torch unimportable (a finder that refuses it, as on the robot's venv) and, unless
# told otherwise, the fake TensorRT and CUDA runtime installed as the modules `tensorrt` and
# `cuda.bindings.runtime`.
SHIM = textwrap.dedent("""
    import importlib.abc, sys, types

    BLOCKED = {"torch"} | ({"tensorrt"} if sys.argv[2] == "no-tensorrt" else set())

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Refuse())
    if sys.argv[2] == "fake":
        from tests.fakes.fake_cuda import FakeCudaRuntime
        from tests.fakes.fake_tensorrt import make_fake_tensorrt

        runtime = FakeCudaRuntime()
        package, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        package.bindings, bindings.runtime = bindings, runtime
        sys.modules.update({"cuda": package, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime,
                            "tensorrt": make_fake_tensorrt("10.3.0", cudart=runtime)})
    from build_engines.cli import main

    code = main(["--engines-only", sys.argv[1]] if sys.argv[2] != "full-build" else ["--out", sys.argv[1]])
    assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"
    sys.exit(code)
""")


def run_cli(tmp_path: Path, bundle: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "engines_only_shim.py"
    script.write_text(SHIM)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), str(bundle), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def bundle(reference_bundle, tmp_path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(reference_bundle[0], root)
    return root


def test_engines_only_builds_verifies_and_installs_engines_without_torch(bundle, tmp_path):
    before = json.loads((bundle / MANIFEST).read_text())
    result = run_cli(tmp_path, bundle, "fake")
    assert result.returncode == 0, result.stderr
    assert "5 engines verified and installed" in result.stdout
    loaded = Bundle.load(bundle)  # every hash, the engines' included, agrees with the files
    assert {(e.graph, e.variant) for e in loaded.engines} == {
        ("vision", "int8-tensorrt"), ("head", "int8-tensorrt"), ("vision", "fp16"), ("head", "fp16"), ("language", "fp16")}
    after = json.loads((bundle / MANIFEST).read_text())
    unchanged = {k: v for k, v in after["files"].items() if not k.startswith("engines/")}
    assert unchanged == before["files"]  # only the engines were added
    for target in ("tensorrt", "fp16"):
        assert all(fit.problem is None for fit in engine_fit(loaded, target, "10.3.0", "8.7"))
    assert not [p for p in bundle.iterdir() if p.name.startswith(".engines-")]  # staging removed


def test_engines_only_is_refused_in_one_line_without_tensorrt(bundle, tmp_path):
    before = (bundle / MANIFEST).read_bytes()
    result = run_cli(tmp_path, bundle, "no-tensorrt")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("build-engines: error: TensorRT's Python bindings are not importable")
    assert "python3-libnvinfer" in lines[0]
    assert (bundle / MANIFEST).read_bytes() == before and not (bundle / "engines").exists()


def test_a_failed_engine_leaves_the_bundle_as_it_was(bundle):
    trt, cudart = fake_gpu("10.3.0")
    before = (bundle / MANIFEST).read_bytes()
    trt.fake.build_failure = "Error Code 2: OutOfMemory (Requested size was 2147483648 bytes.)"
    with pytest.raises(EngineBuildError, match="OutOfMemory"):
        build_engines_only(bundle, trt=trt, cudart=cudart)
    assert (bundle / MANIFEST).read_bytes() == before
    assert not (bundle / "engines").exists() and not [p for p in bundle.iterdir() if p.name.startswith(".engines-")]


def test_engines_for_another_gpu_are_replaced_by_a_rerun(bundle):
    trt_a, cuda_a = fake_gpu("10.3.0", compute_capability=(7, 2))
    build_engines_only(bundle, trt=trt_a, cudart=cuda_a)
    loaded = Bundle.load(bundle)
    problems = [fit.problem for fit in engine_fit(loaded, "tensorrt", "10.3.0", "8.7")]
    assert all(p and "GPU compute capability: engine 7.2, required 8.7" in p for p in problems)
    trt_b, cuda_b = fake_gpu("10.3.0")
    build_engines_only(bundle, trt=trt_b, cudart=cuda_b)
    assert all(fit.problem is None for fit in engine_fit(Bundle.load(bundle), "tensorrt", "10.3.0", "8.7"))


def test_an_old_tensorrt_is_refused_before_anything_is_built(bundle):
    from tests.fakes.fake_tensorrt import make_fake_tensorrt

    trt8 = make_fake_tensorrt("8.6.2")
    with pytest.raises(EngineBuildError, match=r"JetPack 6.1\+"):
        build_engines_only(bundle, trt=trt8, cudart=fake_gpu()[1])
    assert not (bundle / "engines").exists()


def test_the_full_build_without_torch_names_what_to_install_in_one_line(tmp_path):
    result = run_cli(tmp_path, tmp_path / "out", "full-build")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build-engines: error: the full build needs torch"), result.stderr
    assert "build-engines --engines-only BUNDLE" in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_bundle_that_cannot_be_written_is_refused_naming_the_owner(bundle):
    trt, cudart = fake_gpu("10.3.0")
    bundle.chmod(0o555)
    try:
        with pytest.raises(BuildError, match="cannot write engines into .*sudo -u vla-edge"):
            build_engines_only(bundle, trt=trt, cudart=cudart)
    finally:
        bundle.chmod(0o755)
