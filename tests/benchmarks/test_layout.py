"""The benchmark package stays a set of small modules, and its helper programs are real modules."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def test_every_benchmark_module_is_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "benchmarks").glob("*.py")}
    assert "latency.py" in sizes and len(sizes) > 5
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_program_is_run_from_a_string():
    offenders = [p.name for p in (REPO / "benchmarks").glob("*.py") if '"-c"' in p.read_text()]
    assert offenders == []


def test_helper_programs_run_as_modules_and_explain_their_usage():
    for module in ("benchmarks.burn", "benchmarks.runtime_child"):
        done = subprocess.run([sys.executable, "-m", module], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and f"usage: python -m {module}" in done.stderr, (module, done.stderr)
