"""Start-up checks of issue 15 against tiny bundles of other shapes (tests/edge/tiny_bundles.py): every
spec camera has a camera config, policy.replan_every lies within 1..H, and run's wiring opens one camera
per spec camera."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError
from edge.inference.bundle import Bundle
from edge.service import startup, wiring
from edge.service.config import config_from_dict

MOTOR = {"port": "/dev/null"}


def config(bundle_dir, channels: int, **sections):
    return config_from_dict({"bundle": str(bundle_dir), "motor": {**MOTOR, "channels": channels}, **sections})


def keys(problems, fatal=True):
    return [p.key for p in problems if p.fatal == fatal]


@pytest.fixture(scope="module")
def arm7(tiny_bundle_dir):
    root = tiny_bundle_dir("arm7")
    return root, Bundle.load(root)


@pytest.fixture(scope="module")
def chunk(tiny_bundle_dir):
    root = tiny_bundle_dir("chunk")
    return root, Bundle.load(root)


def test_two_camera_policy_with_one_camera_section_names_what_is_missing(arm7):
    root, bundle = arm7
    cfg = config(root, 7, camera={"source": "/dev/video0"})
    problems = startup.camera_problems(bundle, cfg)
    names = [c.name for c in bundle.spec.cameras]
    assert keys(problems) == [f"cameras.{n}" for n in names]
    assert "takes 2 cameras" in problems[0].message and "cameras:" in problems[0].fix
    with pytest.raises(ConfigError, match="cameras"):
        wiring.check_startup(bundle, cfg)


def test_cameras_by_spec_name_pass_and_an_unused_one_warns(arm7):
    root, bundle = arm7
    names = [c.name for c in bundle.spec.cameras]
    cameras = {n: {"source": f"/dev/video{i}"} for i, n in enumerate(names)}
    cfg = config(root, 7, cameras=cameras)
    assert startup.camera_problems(bundle, cfg) == []
    built = wiring.build_cameras(bundle, cfg)
    assert list(built) == names and [c.config.source for c in built.values()] == ["/dev/video0", "/dev/video1"]
    assert not any(c.is_connected for c in built.values()), "wiring opens no device"
    extra = config(root, 7, cameras={**cameras, "side": {"source": "/dev/video9"}})
    problems = startup.camera_problems(bundle, extra)
    assert keys(problems) == [] and keys(problems, fatal=False) == ["cameras.side"]
    missing = config(root, 7, cameras={names[0]: {"source": "/dev/video0"}})
    assert keys(startup.camera_problems(bundle, missing)) == [f"cameras.{names[1]}"]
    with pytest.raises(ConfigError, match=f"cameras.{names[1]}|{names[1]!r}"):
        wiring.build_cameras(bundle, missing)


@pytest.mark.parametrize(("replan_every", "fatal"), [(None, False), (1, False), (4, False), (8, False), (9, True)])
def test_replan_every_must_lie_within_the_horizon(arm7, replan_every, fatal):
    root, bundle = arm7
    cameras = {c.name: {"source": "/dev/video0"} for c in bundle.spec.cameras}
    cfg = config(root, 7, cameras=cameras, policy={"replan_every": replan_every})
    problems = startup.chunk_problems(bundle, cfg)
    assert keys(problems) == (["policy.replan_every"] if fatal else [])
    if fatal:
        assert "out of 1..8" in problems[0].message and "at most 8" in problems[0].fix
        assert "policy.replan_every" in " ".join(keys(startup.policy_problems(bundle, cfg)))


def test_chunk_keys_on_a_one_step_policy_warn_that_they_do_nothing(tiny_bundle_dir):
    root = tiny_bundle_dir("no_uncertainty")
    bundle = Bundle.load(root)
    assert bundle.spec.action.horizon == 1
    cfg = config(root, bundle.spec.action.dim, camera={"source": "/dev/video0"},
                 policy={"replan_every": 2, "temporal_ensemble": 0.01})
    problems = startup.chunk_problems(bundle, cfg)
    assert keys(problems) == [] and keys(problems, fatal=False) == ["policy.replan_every", "policy.temporal_ensemble"]


def test_the_loop_built_for_a_chunk_bundle_executes_chunks_with_the_configured_settings(chunk):
    root, bundle = chunk
    cfg = config(root, bundle.spec.action.dim, camera={"source": "/dev/video0"},
                 policy={"replan_every": 2, "temporal_ensemble": 0.05})
    pipeline = wiring.build_pipeline(bundle, cfg)
    safety = wiring.safety_config(bundle, cfg)
    assert safety.kinds == tuple(bundle.spec.action.kinds)

    class NoCamera:
        frame_shape = (64, 64, 3)

        def read_into(self, out):
            return None

    loop = wiring.build_loop(pipeline, NoCamera(), None, bundle, cfg)
    assert loop.chunks.replan_every == 2 and loop.chunks.scheduler.temporal_ensemble == 0.05
    assert loop.chunks.scheduler.horizon == bundle.spec.action.horizon
    assert loop.status().chunks.replans == 0 and not loop.status().language
    loop.close()


def test_an_initial_instruction_for_a_policy_without_language_is_refused(chunk):
    root, bundle = chunk
    assert bundle.spec.language is None
    cfg = config(root, bundle.spec.action.dim, camera={"source": "/dev/video0"},
                 instruction={"initial": "go to the red block"})
    problems = startup.language_problems(bundle, cfg)
    assert keys(problems) == ["instruction.initial"] and "takes no instruction" in problems[0].message
    with pytest.raises(ConfigError, match="instruction.initial"):
        wiring.check_startup(bundle, cfg)
