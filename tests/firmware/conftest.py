"""Fixtures of the firmware tests: the core built for the host, once per session."""

from __future__ import annotations

import pytest

from tests.firmware import build, host_core


@pytest.fixture(scope="session")
def fwlib(tmp_path_factory):
    missing = build.missing_tools("make", "cc")
    if missing:
        pytest.skip(f"building the firmware core for the host needs {', '.join(missing)} (apt-get install gcc make)")
    out = tmp_path_factory.mktemp("firmware-host")
    build.make("host", out)
    return host_core.load(out / "host" / "libfwcore.so")


@pytest.fixture
def firmware(fwlib):
    """The reference robot's layout: two velocity channels, 300 ms watchdog, 20 ms telemetry."""
    return host_core.HostFirmware(fwlib)
