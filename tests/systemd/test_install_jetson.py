"""install.sh's dependency handling: on a faked Jetson root (an /etc/nv_tegra_release under --prefix) JetPack's
TensorRT, OpenCV and numpy are kept and onnxruntime-gpu comes only from the Jetson index; on a plain
Debian root everything comes from pip as before."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.test_unit import INSTALL, REPO, _actions, _run_script, _snapshot

# /etc/nv_tegra_release of JetPack 6.2 (L4T R36.4.3) and JetPack 6.0 (R36.3.0)
JETPACK_6_2 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
               "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n")
JETPACK_6_0 = ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
               "DATE: Mon May  6 17:34:21 UTC 2024\n")
PIP_FORBIDDEN_ON_JETSON = ("numpy", "opencv-python", "opencv-python-headless", "onnxruntime")


@pytest.fixture()
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vla-edge-jetson-root-"))
    try:
        path.chmod(0o755)
        (path / "etc").mkdir()
        (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        (path / "etc/group").write_text("root:x:0:\ndialout:x:20:\nvideo:x:44:\nrender:x:105:\n")
        yield path
    finally:
        shutil.rmtree(path)


def _pip_installs(actions: list[list[str]], venv_python: str) -> list[list[str]]:
    return [a for a in actions if a[:4] == [venv_python, "-m", "pip", "install"]]


def _requirement_names(install: list[str]) -> set[str]:
    names = set()
    for word in install[4:]:
        if word.startswith("-") or "/" in word:
            continue
        name = word
        for stop in "<>=!~[; ":
            name = name.split(stop)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def test_a_jetson_root_keeps_jetpacks_opencv_numpy_and_tensorrt(root):
    (root / "etc/nv_tegra_release").write_text(JETPACK_6_2)
    before = _snapshot(root)
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(root))
    assert result.returncode == 0, result.stderr
    assert _snapshot(root) == before
    assert f"Jetson: L4T R36.4.3 ({root}/etc/nv_tegra_release)" in result.stdout
    assert "WARNING" not in result.stdout
    actions = _actions(result.stdout)
    venv_python = f"{root}/opt/vla-edge/venv/bin/python"
    venv = next(a for a in actions if a[1:3] == ["-m", "venv"])
    assert "--system-site-packages" in venv
    installs = _pip_installs(actions, venv_python)
    package = next(a for a in installs if a[-1] == str(REPO))
    assert "--no-deps" in package  # pip cannot pull PyPI's opencv, numpy or onnxruntime back in
    for install in installs:
        assert not _requirement_names(install) & set(PIP_FORBIDDEN_ON_JETSON), install
    ort = [a for a in installs if "onnxruntime-gpu" in _requirement_names(a)]
    assert len(ort) == 1 and "--no-deps" in ort[0]
    assert ort[0][ort[0].index("--index-url") + 1] == "https://pypi.jetson-ai-lab.io/jp6/cu126"
    others = {name for a in installs if a is not ort[0] for name in _requirement_names(a)}
    assert {"pyserial", "tokenizers", "pyyaml", "cobs", "cuda-python", "onnx"} <= others  # onnx: --engines-only
    # a PyPI copy left from an earlier install would shadow JetPack's
    uninstall = next(a for a in actions if a[:4] == [venv_python, "-m", "pip", "uninstall"])
    assert set(PIP_FORBIDDEN_ON_JETSON) <= set(uninstall)
    assert "python3-libnvinfer is installed with apt if it cannot import tensorrt" in result.stdout


def test_the_jetson_index_can_be_changed(root):
    (root / "etc/nv_tegra_release").write_text(JETPACK_6_2)
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(root), "--jetson-index",
                         "https://example.invalid/jp6/cu126")
    assert result.returncode == 0, result.stderr
    assert "--index-url https://example.invalid/jp6/cu126" in result.stdout


def test_jetpack_6_0_is_warned_about(root):
    (root / "etc/nv_tegra_release").write_text(JETPACK_6_0)
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(root))
    assert result.returncode == 0, result.stderr
    assert "L4T R36.3.0 is older than JetPack 6.1" in result.stdout


def test_an_unreadable_release_file_is_an_error(root):
    (root / "etc/nv_tegra_release").write_text("garbage\n")
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(root))
    assert result.returncode != 0 and "cannot read the L4T release" in result.stderr


def test_a_plain_debian_root_installs_from_pip_with_the_extras(root):
    result = _run_script(INSTALL, "--dry-run", "--prefix", str(root))
    assert result.returncode == 0, result.stderr
    assert "not a Jetson" in result.stdout
    actions = _actions(result.stdout)
    installs = _pip_installs(actions, f"{root}/opt/vla-edge/venv/bin/python")
    assert [a[-1] for a in installs] == [f"{REPO}[gpu]"]
    assert "--no-deps" not in installs[0] and "--index-url" not in installs[0]
