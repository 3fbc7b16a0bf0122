"""The layout's rules hold: the import-linter contracts in pyproject.toml (edge's layers; no torch, onnx
or build code in the runtime) and the size limits that keep each module one concern."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = {"edge": 500, "benchmarks": 400}  # no module over this many lines, per package


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail(f"{lint} is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path):
    # The contracts can fail: a copy of edge whose io layer imports the service breaks the layers contract.
    import shutil

    copy = tmp_path / "edge"
    shutil.copytree(REPO / "edge", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "io" / "camera.py").write_text((copy / "io" / "camera.py").read_text()
                                           + "\nfrom edge.service import run as _run  # noqa\n")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = edge\n\n[importlinter:contract:layers]\nname = layers\ntype = layers\n"
        "containers = edge\nlayers =\n    cli\n    service\n    control\n    io | inference\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "edge.io.camera -> edge.service.run" in result.stdout


@pytest.mark.parametrize("package", sorted(MAX_LINES))
def test_no_module_is_over_its_size_limit(package):
    limit = MAX_LINES[package]
    too_long = {str(path.relative_to(REPO)): n for path in sorted((REPO / package).rglob("*.py"))
                if (n := len(path.read_text().splitlines())) > limit}
    assert not too_long, f"modules over {limit} lines in {package}/: {too_long}"
