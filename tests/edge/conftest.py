"""Fixtures of the runtime tests: tiny bundles of other shapes (tests/edge/tiny_bundles.py), each built
once per session, on first use."""

from __future__ import annotations

import pytest

from tests.edge.tiny_bundles import SHAPES, build_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """`tiny_bundle_dir(name)` -> the directory of the tiny bundle `name` (a key of tiny_bundles.SHAPES)."""
    built = {}

    def get(name: str):
        if name not in SHAPES:
            raise KeyError(f"no tiny bundle {name!r}; there are {sorted(SHAPES)}")
        if name not in built:
            built[name] = build_tiny_bundle(tmp_path_factory.mktemp("tiny") / name, name)
        return built[name]

    return get


@pytest.fixture(scope="session", params=sorted(SHAPES))
def shaped_bundle(request, tiny_bundle_dir):
    """Each tiny bundle in turn, loaded (edge.inference.bundle.Bundle)."""
    from edge.inference.bundle import Bundle

    return Bundle.load(tiny_bundle_dir(request.param))
