"""Shared fixtures. A small but real policy bundle is built once per test session from the committed
reference policy (few calibration samples and gate episodes, so it takes about a minute)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def reference_bundle(tmp_path_factory):
    from build_engines.build import BuildOptions, run_build

    out = tmp_path_factory.mktemp("bundle") / "reference"
    logging.getLogger("build_engines").setLevel(logging.WARNING)
    summary = run_build(BuildOptions(out=out, calib_samples=32, min_calib_samples=16, heldout_samples=16,
                                     gate_seeds=3, monitor_check_seeds=2, tensorrt="off",
                                     # a 3-episode gate measures nothing about success drops
                                     tolerances=_lenient()))
    return out, summary


def _lenient():
    from build_engines.build import Tolerances

    return Tolerances(max_success_drop=1.0)
