"""A tiny chunk policy built through `build-engines --policy` runs in the loop closed through the real
parts (the simulated controller on a pty, its MJPEG camera, ONNX Runtime), wired as `vla-edge run` wires
it: chunks of 4 from the inference worker, replanned every 2 ticks, no language, proprio from telemetry."""

from __future__ import annotations

import numpy as np
import pytest

from edge.control.loop import Mode
from edge.errors import InputError
from tests.edge.control.closed_loop import closed_loop, run_for
from tests.edge.tiny_bundles import FAST

HORIZON = 4


def wheel_chunks():
    """The controller's two wheel channels: one camera, no language, proprio of the two measured wheel
    velocities, chunks of 4 velocity actions (a factory for build-engines --policy)."""
    from tests.build_engines.tiny_policies import make

    return make(cameras=((64, 64),), language=False, proprio=2, action=2, horizon=HORIZON, name="wheel-chunks")


@pytest.fixture(scope="module")
def chunk_bundle(tmp_path_factory):
    from build_engines import cli

    out = tmp_path_factory.mktemp("chunk-loop") / "bundle"
    factory = f"{__name__}:wheel_chunks"
    assert cli.main(["--policy", factory, "--out", str(out), *FAST]) == 0
    return out


def test_a_chunk_bundle_drives_the_simulated_robot_through_the_worker(chunk_bundle):
    with closed_loop(chunk_bundle, uncertainty={"threshold": 1.0, "hard_ceiling": 2.0},
                     policy={"replan_every": 2}) as (controller, loop):
        assert loop.chunks is not None and loop.chunks.replan_every == 2
        with pytest.raises(InputError, match="takes no instruction"):
            loop.set_instruction("go to the red block")
        run_for(loop, 6.0, until=lambda: loop.status().chunks.replans >= 12)
        stats = loop.status().chunks
        records = loop.recorder.latest()
        truth = controller.ground_truth()
    assert stats.replans >= 12, f"only {stats.replans} chunks in 6 s at one request per 2 ticks"
    assert stats.worker_errors == 0 and loop.counters["inference_errors"] == 0
    assert stats.entry_index is not None and 0 <= stats.entry_index < HORIZON
    assert sum(stats.entries.values()) >= 1 and all(d >= 0 for d in stats.mean_delay_s.values())
    nominal = records["mode"] == Mode.NOMINAL
    assert nominal.sum() > 10, "the policy drives (no instruction needed)"
    assert records["delivered"].all()
    assert np.abs(records["command"]).max() <= 1.0
    # Every command is within one tick's slew (4.0 per s) of the one before it.
    steps = np.abs(np.diff(records["command"], axis=0)).max(axis=1)
    dt = np.diff(records["start_s"])
    assert (steps <= 4.0 * np.clip(dt, 0, 0.3) + 1e-5).all()
    assert truth.last_command_seq > 0 and not truth.watchdog_tripped
