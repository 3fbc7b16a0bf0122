"""Builds the firmware targets of firmware/Makefile for the tests, or says why a tool is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"


def missing_tools(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def make(target: str, build_dir: Path, timeout_s: float = 300.0, extra: list[str] | None = None) -> str:
    """`make -C firmware TARGET BUILD=build_dir [VAR=value ...]`; AssertionError with make's output on failure."""
    result = subprocess.run(["make", "-C", str(FIRMWARE_DIR), target, f"BUILD={build_dir}", *(extra or [])],
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"make {target} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout
