"""Tiny bundles of shapes other than the reference policy's, for runtime tests: built once per test session
through the public `build-engines --policy module:factory` interface from the factories of
tests/build_engines/tiny_policies.py (random seeded weights, few calibration samples: a few seconds each).

    arm7            2 cameras (64x64, 48x64), no language, chunks of 8, 6 position joints + a position
                    gripper, proprio of 14 (positions[0..6], velocities[0..6]), MC-dropout
    chunk           1 camera, no language, no proprio, chunks of 4 velocity actions, MC-dropout
    no_uncertainty  1 camera with language, single-step, a head without dropout (--uncertainty none)

The fixtures are in tests/edge/conftest.py: `tiny_bundle_dir(name)` builds on first use.
"""

from __future__ import annotations

from pathlib import Path

POLICIES = "tests.build_engines.tiny_policies"
# name -> (factory in tiny_policies, extra build-engines arguments)
SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "arm7": ("arm7_two_cameras", ()),
    "chunk": ("chunk_without_proprio", ()),
    "no_uncertainty": ("no_dropout", ("--uncertainty", "none")),
}
FAST = ("--int8", "--no-fp16", "--calib-samples", "32", "--heldout-samples", "8", "--tensorrt", "off",
        "--env", "none", "--log-level", "WARNING")


def build_tiny_bundle(out: Path, name: str) -> Path:
    """Build the tiny bundle `name` (a key of SHAPES) into `out`; raise with the build's exit code on failure."""
    from build_engines import cli

    factory, extra = SHAPES[name]
    code = cli.main(["--policy", f"{POLICIES}:{factory}", "--out", str(out), *FAST, *extra])
    if code != 0:
        raise RuntimeError(f"build-engines --policy {POLICIES}:{factory} exited {code}")
    return out
