"""The failure monitor (edge/control/monitor.py): its math against numpy references, the windowed alarm, and
a tiny bundle built with a monitor section, wired as `vla-edge run` wires it: in-distribution frames run,
a black frame falls back through the monitor (the bundle has no MC-dropout, so the spread cannot trip),
an instruction the policy cannot ground holds with "instruction not understood"."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge.cli.control import format_status
from edge.control.loop import Mode
from edge.control.monitor import (
    NOT_UNDERSTOOD,
    ActionConsistency,
    FailureMonitor,
    FeatureNovelty,
    InstructionNovelty,
    TimeOnTask,
    WindowConfig,
    WindowedAlarm,
)
from edge.control.uncertainty_gate import GateConfig, UncertaintyGate
from edge.errors import BundleError, ConfigError, InputError
from edge.inference.bundle import Bundle
from edge.service import wiring
from edge.service.config import config_from_dict
from edge.service.loop_control import status_reply
from tests.build_engines.tiny_policies import EpisodeSource
from tests.edge.control.doubles import PERIOD, FakeClock, FakeLink


def reference_mahalanobis(x, mean, covariance):
    diff = x - mean
    return math.sqrt(float(diff @ np.linalg.solve(covariance, diff)))


def test_feature_novelty_is_the_mahalanobis_distance_of_the_pooled_features():
    rng = np.random.default_rng(1)
    d = 6
    a = rng.normal(size=(d, d))
    covariance = a @ a.T + 0.5 * np.eye(d)
    mean = rng.normal(size=d)
    whiten = np.linalg.inv(np.linalg.cholesky(covariance))  # |W x|^2 = x' inv(C) x
    novelty = FeatureNovelty(mean.astype(np.float32), whiten.astype(np.float32))
    for _ in range(5):
        x = rng.normal(size=d) * 3
        expected = reference_mahalanobis(x, mean, covariance)
        assert novelty.score(x.astype(np.float32)[None]) == pytest.approx(expected, rel=1e-4)
    tokens = rng.normal(size=(1, 4, d)).astype(np.float32)  # token features: the mean over the token axis
    expected = reference_mahalanobis(tokens[0].mean(axis=0).astype(np.float64), mean, covariance)
    assert novelty.score(tokens) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(BundleError, match="width 5"):
        novelty.score(np.zeros((1, 5), np.float32))


def test_the_windowed_alarm_needs_k_of_the_last_n_scores_over_its_threshold():
    alarm = WindowedAlarm(1.0, WindowConfig(over=2, ticks=3))
    assert [alarm.update(s) for s in (2.0, 0.5, 0.5, 2.0, 0.5, 2.0, 2.0, 0.5, 0.5, 0.5)] == \
        [False, False, False, False, False, True, True, True, False, False]
    assert alarm.update(float("nan")) is True, "a non-finite score trips at once"
    alarm.reset()
    assert alarm.update(0.1) is False
    with pytest.raises(ConfigError, match="monitor.window.over"):
        WindowConfig(over=4, ticks=3)
    with pytest.raises(BundleError, match="threshold"):
        WindowedAlarm(0.0, WindowConfig())


def test_action_consistency_is_the_rms_change_of_the_first_action_over_the_range():
    consistency = ActionConsistency(2, action_range=2.0)
    assert consistency.score(np.array([0.0, 0.0], np.float32)) == 0.0
    assert consistency.score(np.array([0.6, 0.8], np.float32)) == pytest.approx(math.sqrt(0.5) / 2.0, rel=1e-6)
    consistency.reset()
    assert consistency.score(np.array([5.0, 5.0], np.float32)) == 0.0, "no previous action after a reset"


def test_instruction_novelty_is_the_nearest_cosine_distance_checked_once():
    known = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    novelty = InstructionNovelty(known, threshold=0.1)
    assert novelty.check("a", np.array([2.0, 0.1])) == (pytest.approx(1 - 2.0 / math.hypot(2.0, 0.1)), True)
    distance, understood = novelty.check("b", np.array([1.0, 1.0]))
    assert distance == pytest.approx(1 - math.sqrt(0.5)) and not understood
    assert novelty.check("b", np.array([1.0, 0.0]))[1] is False, "cached per instruction"


class ModelsOf:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_the_monitor_names_the_signal_that_tripped_and_releases_when_calm():
    gate = UncertaintyGate(GateConfig(threshold=1.0, hard_ceiling=5.0, enter_ticks=1, exit_ticks=1))
    models = ModelsOf(window=WindowConfig(over=2, ticks=3), features=FeatureNovelty(np.zeros(2), np.eye(2)),
                      feature_threshold=1.0, consistency_threshold=None, instructions=None, task_inferences=None)
    monitor = FailureMonitor(gate, models, action_dim=2, action_range=2.0)
    calm = ModelsOf(features=np.array([[0.1, 0.1]], np.float32), actions=np.zeros((1, 2), np.float32))
    novel = ModelsOf(features=np.array([[3.0, 0.0]], np.float32), actions=np.zeros((1, 2), np.float32))
    assert not monitor.update(0.1, calm).fallback
    assert not monitor.update(0.1, novel).fallback, "one spike does not stop the robot"
    decision = monitor.update(0.1, novel)
    assert decision.fallback and "feature_novelty" in decision.transition
    assert monitor.tripped == ("feature_novelty",)
    assert monitor.signals()["signals"]["feature_novelty"]["on"] is True
    assert monitor.update(3.0, novel).fallback and monitor.tripped == ("spread", "feature_novelty")
    monitor.update(0.1, calm)
    assert not monitor.update(0.1, calm).fallback and monitor.tripped == ()
    assert monitor.trips == {"spread": 1, "feature_novelty": 1}


def test_time_on_task_stops_a_task_that_runs_longer_than_the_successful_ones_until_a_new_task():
    gate = UncertaintyGate(GateConfig(threshold=1.0, hard_ceiling=5.0, enter_ticks=1, exit_ticks=1))
    models = ModelsOf(window=WindowConfig(), features=None, feature_threshold=None, consistency_threshold=None,
                      instructions=None, task_inferences=4.0)
    monitor = FailureMonitor(gate, models, action_dim=2, action_range=2.0)
    calm = ModelsOf(features=None, actions=np.zeros((1, 2), np.float32))
    assert [monitor.update(0.1, calm).fallback for _ in range(6)] == [False] * 4 + [True] * 2
    assert monitor.tripped == ("time_on_task",) and monitor.task_overdue
    assert monitor.signals()["signals"]["time_on_task"] == {"score": 6.0, "threshold": 4.0, "on": True, "trips": 1}
    monitor.new_task()  # a new instruction or a resume
    assert not monitor.task_overdue and not monitor.update(0.1, calm).fallback


# -- a tiny bundle with a monitor, through the runtime's wiring ---------------------------------------------


class FrameCamera:
    """Serves `frame` stamped at the clock's time."""

    def __init__(self, clock, frame):
        self.clock, self.frame, self.count = clock, frame, 0

    def read_into(self, out):
        self.count += 1
        np.copyto(out, self.frame)
        return self.clock(), self.count


_MONITORED = {}


def monitored_bundle(tmp_path_factory):
    """The tiny language policy without dropout, its monitor at a rate its 8 held-out samples support."""
    if "root" not in _MONITORED:
        from build_engines import cli
        from tests.edge.tiny_bundles import FAST, POLICIES

        out = tmp_path_factory.mktemp("monitored") / "bundle"
        code = cli.main(["--policy", f"{POLICIES}:no_dropout", "--out", str(out), *FAST, "--uncertainty", "none",
                         "--monitor-rate", "0.12"])
        assert code == 0
        _MONITORED["root"] = out
    return _MONITORED["root"]


@pytest.fixture()
def tiny(tmp_path_factory):
    root = monitored_bundle(tmp_path_factory)
    bundle = Bundle.load(root)
    config = config_from_dict({
        "bundle": str(root), "motor": {"port": "/dev/null", "channels": 2},
        "cameras": {"cam0": {"source": "/dev/video0"}},
        "policy": {"target": "cpu", "mc_samples": 1},
        "uncertainty": {"threshold": 1.0, "hard_ceiling": 2.0},
        "loop": {"rate_hz": 1.0 / PERIOD},
    })
    clock = FakeClock()
    # A frame of the policy's own calibration source, from an episode in the middle of its brightness range
    # (the tiny bundle's threshold comes from only 8 held-out samples: the darkest episodes sit near it).
    samples = list(EpisodeSource(30, bundle.spec))
    frame = samples[4 * 6].views["cam0"].copy()
    camera = FrameCamera(clock, frame)
    link = FakeLink(clock, 2)
    pipeline = wiring.build_pipeline(bundle, config)
    pipeline.activate()
    loop = wiring.build_loop(pipeline, camera, link, bundle, config, clock=clock, sleep=clock.advance,
                             frame_shape=frame.shape)
    try:
        yield bundle, clock, camera, loop, pipeline
    finally:
        loop.close()
        pipeline.close()


def run_ticks(loop, clock, count):
    rows = []
    for _ in range(count):
        rows.append(loop.tick().copy())
        clock.advance(PERIOD)
    return np.array(rows)


def test_a_tiny_bundle_gets_a_monitor_that_passes_its_frames_and_stops_on_a_black_frame(tiny):
    bundle, clock, camera, loop, pipeline = tiny
    section = bundle.manifest["monitor"]
    assert section["false_alarm_rate"] == 0.12 and "conformal" in section["method"]
    assert "action_consistency" in section["skipped"], "6 consecutive pairs cannot support 12%"
    assert {"feature_novelty", "instruction_novelty"} <= set(section["signals"])
    assert isinstance(loop.gate, FailureMonitor) and "feature_novelty" in loop.gate.alarms
    loop.set_instruction(bundle.manifest["monitor"]["signals"]["instruction_novelty"]["instructions"][0])
    pipeline.cache.encode_now(loop.instruction)
    rows = run_ticks(loop, clock, 10)
    assert (rows["mode"] == Mode.NOMINAL).all(), rows["mode"]
    assert pipeline.features.shape[-1] == section["signals"]["feature_novelty"]["dim"]
    assert not pipeline.features.flags.writeable
    camera.frame = np.zeros_like(camera.frame)  # the camera goes black
    rows = run_ticks(loop, clock, 6)
    fallback = np.flatnonzero(rows["mode"] == Mode.FALLBACK)
    assert len(fallback) and fallback[0] <= 2, rows["mode"]  # the window: 3 of the last 5
    status = loop.status()
    assert status.monitor["tripped"] == ["feature_novelty"], status.monitor
    assert "tripped: feature_novelty" in status.line()
    # The control socket's reply and `vla-edge status` show the same: which signal, its score and threshold.
    reply = json.loads(json.dumps(status_reply(status)))
    assert reply["monitor"]["tripped"] == ["feature_novelty"]
    novelty = reply["monitor"]["signals"]["feature_novelty"]
    assert novelty["on"] and novelty["score"] > novelty["threshold"]
    assert math.isfinite(reply["monitor"]["signals"]["spread"]["score"])
    text = format_status({"ok": True, **reply})
    assert "monitor      TRIPPED by feature_novelty" in text and "feature_novelty " in text and " ON" in text
    pytest.importorskip("prometheus_client")
    from edge.service.metrics import PREFIX, LoopCollector

    families = {family.name: family for family in LoopCollector(loop).collect()}
    alarms = {sample.labels["signal"]: sample.value for sample in families[f"{PREFIX}_monitor_alarm"].samples}
    assert alarms == {"spread": 0.0, "feature_novelty": 1.0, "instruction_novelty": 0.0}, alarms
    assert status.mode == "fallback"


def test_an_instruction_the_policy_cannot_ground_holds_with_a_clear_status(tiny):
    bundle, clock, _, loop, pipeline = tiny
    text = "place the green cup"
    vector = pipeline.cache.encode_now(text)
    # The known instructions as the monitor sees them, replaced by one opposite to this instruction's
    # embedding: its nearest cosine distance is 2, far beyond any threshold.
    unit = (vector / np.linalg.norm(vector)).reshape(1, -1)
    loop.gate.models.instructions = InstructionNovelty(-unit, threshold=0.5)
    loop.set_instruction(text)
    rows = run_ticks(loop, clock, 3)
    assert (rows["mode"] == Mode.HOLD).all() and (rows["command"] == 0).all()
    status = loop.status()
    assert status.hold_reason.startswith(NOT_UNDERSTOOD) and text in status.hold_reason
    assert status.monitor["signals"]["instruction_novelty"]["on"] is True
    loop.gate.models.instructions = InstructionNovelty(unit, threshold=0.5)  # now it is a known one
    loop.set_instruction(text)  # a new instruction ends the hold
    rows = run_ticks(loop, clock, 3)
    assert (rows["mode"] == Mode.NOMINAL).all(), rows["mode"]
    assert loop.status().hold_reason is None


def test_a_bundle_without_a_monitor_section_runs_with_the_spread_alone(tiny_bundle_dir):
    from edge.control.monitor import load_models

    # 8 held-out samples cannot support 1% of ticks: the tiny bundle's build leaves the per-tick signals out
    bundle = Bundle.load(tiny_bundle_dir("no_uncertainty"))
    assert set(bundle.manifest["monitor"]["signals"]) == {"instruction_novelty"}
    assert set(bundle.manifest["monitor"]["skipped"]) == {"feature_novelty", "action_consistency"}
    del bundle.manifest["monitor"]
    assert load_models(bundle, "cpu") is None
    monitor = FailureMonitor(UncertaintyGate(GateConfig(threshold=1.0, hard_ceiling=2.0)), None, 2, 2.0)
    assert monitor.alarms == {} and monitor.instruction_hold("anything", np.ones(4)) is None
    assert not monitor.update(0.5, None).fallback


def test_the_config_can_leave_a_signal_out_and_names_an_unknown_one(tiny):
    bundle, clock, camera, _, _ = tiny
    raw = {"bundle": str(bundle.root), "motor": {"port": "/dev/null", "channels": 2},
           "cameras": {"cam0": {"source": "/dev/video0"}}, "policy": {"target": "cpu", "mc_samples": 1},
           "uncertainty": {"threshold": 1.0, "hard_ceiling": 2.0}, "loop": {"rate_hz": 1.0 / PERIOD},
           "monitor": {"disable": ["feature_novelty"]}}
    monitor = wiring.failure_monitor(bundle, config_from_dict(raw))
    assert "feature_novelty" not in monitor.alarms and monitor.models.features is None
    assert monitor.models.instructions is not None, "the other signals stay"
    black = ModelsOf(features=np.full((1, bundle.manifest["monitor"]["signals"]["feature_novelty"]["dim"]), 50.0,
                                      np.float32), actions=np.zeros((1, 2), np.float32))
    assert not any(monitor.update(0.1, black).fallback for _ in range(5)), "a signal left out cannot stop it"
    for bad, fragment in ((["spread"], "the spread is set in uncertainty"), (["novelty"], "unknown signal"),
                          ("feature_novelty", "must be a list")):
        with pytest.raises(ConfigError, match=fragment):
            config_from_dict({**raw, "monitor": {"disable": bad}})


def test_a_task_out_of_time_stops_in_fallback_and_resume_or_a_new_instruction_go_on(tiny):
    bundle, clock, _, loop, pipeline = tiny
    text = bundle.manifest["monitor"]["signals"]["instruction_novelty"]["instructions"][0]
    loop.gate.alarms["time_on_task"] = TimeOnTask(3)  # as a bundle calibrated on 3-inference tasks has it
    loop.set_instruction(text)
    pipeline.cache.encode_now(text)
    rows = run_ticks(loop, clock, 6)
    assert list(rows["mode"]) == [Mode.NOMINAL] * 3 + [Mode.FALLBACK] * 3, rows["mode"]
    assert (rows["command"][-1] == 0).all() and loop.status().monitor["tripped"] == ["time_on_task"]
    loop.resume()  # the operator saw it stop and says go on: the clock starts again
    assert (run_ticks(loop, clock, 3)["mode"] == Mode.NOMINAL).all()
    assert run_ticks(loop, clock, 1)["mode"][0] == Mode.FALLBACK
    loop.set_instruction(text)  # so does a new instruction, the same text included
    assert (run_ticks(loop, clock, 3)["mode"] == Mode.NOMINAL).all()
    with pytest.raises(InputError, match="nothing to resume"):
        loop.resume()  # neither held nor out of time
