"""The failure monitor's build side (build_engines/monitor.py): the Mahalanobis model against numpy, the
split-conformal threshold, and the manifest's `monitor` section as the runtime's schema checks it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from build_engines.accuracy_gate import EpisodeTrace
from build_engines.errors import GateError
from build_engines.monitor import (
    closed_loop_thresholds,
    conformal_threshold,
    first_action_changes,
    fit_mahalanobis,
    mahalanobis,
    pool,
    shrunk_covariance,
    windowed_statistic,
)
from edge.control.monitor import ActionConsistency, FeatureNovelty, WindowConfig, WindowedAlarm
from edge.control.uncertainty_gate import GateConfig, GateMode, UncertaintyGate
from edge.errors import BundleError
from edge.inference.bundle import SCHEMA_FILE, validate_manifest


def test_the_model_is_the_mahalanobis_distance_under_the_shrunk_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 3.0
    covariance, shrinkage = shrunk_covariance(x)
    assert 0.0 <= shrinkage <= 1.0
    sample = np.cov(x, rowvar=False, bias=True)
    target = np.trace(sample) / 5 * np.eye(5)
    np.testing.assert_allclose(covariance, (1 - shrinkage) * sample + shrinkage * target, rtol=1e-10)
    model = fit_mahalanobis(x)
    probe = rng.normal(size=(4, 5)) * 2 + 3.0
    expected = [math.sqrt(float((p - x.mean(0)) @ np.linalg.solve(covariance, p - x.mean(0)))) for p in probe]
    np.testing.assert_allclose(mahalanobis(probe, model), expected, rtol=1e-4)
    runtime = FeatureNovelty(model["mean"], model["whiten"])  # the runtime's buffers give the same distance
    assert [runtime.score(p.astype(np.float32)[None]) for p in probe] == pytest.approx(expected, rel=1e-4)


def test_fewer_samples_than_features_still_give_a_finite_distance():
    rng = np.random.default_rng(1)
    model = fit_mahalanobis(rng.normal(size=(10, 32)))
    assert np.isfinite(mahalanobis(rng.normal(size=(3, 32)), model)).all()
    with pytest.raises(GateError, match="at least 2"):
        fit_mahalanobis(np.zeros((1, 4)))


def test_token_features_are_pooled_over_every_axis_but_the_last():
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    np.testing.assert_allclose(pool(x), x.mean(axis=1))


def test_the_conformal_threshold_is_the_ceil_n_plus_1_quantile():
    scores = np.arange(1, 100, dtype=np.float64)  # 1..99
    assert conformal_threshold(scores[::-1], 0.05) == (95.0, 0.05)  # ceil(100 * 0.95) = 95th smallest
    threshold, supported = conformal_threshold(np.arange(1.0, 11.0), 0.01)  # 11 * 0.99 > 10
    assert threshold == 10.0 and supported == pytest.approx(1 / 11)
    with pytest.raises(GateError, match="finite"):
        conformal_threshold(np.array([1.0, np.nan]), 0.1)


def test_the_conformal_threshold_keeps_its_false_alarm_rate_on_new_samples():
    rng = np.random.default_rng(2)
    rates = []
    for _ in range(200):
        threshold, _ = conformal_threshold(rng.normal(size=199), 0.05)
        rates.append(np.mean(rng.normal(size=2000) > threshold))
    assert 0.035 < np.mean(rates) <= 0.055


def _manifest_with(monitor):
    """The smallest manifest the schema checks the monitor section of (other sections' errors ignored)."""
    return {"monitor": monitor}


def _monitor_errors(monitor):
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [e for e in validator.iter_errors(_manifest_with(monitor)) if list(e.absolute_path)[:1] == ["monitor"]]


def test_the_schema_checks_the_monitor_section():
    good = {"method": "split conformal", "false_alarm_rate": 0.01, "window": {"over": 3, "ticks": 5},
            "signals": {"feature_novelty": {"path": "monitor/features.npz", "threshold": {"cpu": 2.5}, "dim": 8,
                                            "calibration_samples": 32, "heldout_samples": 8}}}
    assert _monitor_errors(good) == []
    bad_rate = {**good, "false_alarm_rate": 1.5}
    assert _monitor_errors(bad_rate)
    no_threshold = json.loads(json.dumps(good))
    del no_threshold["signals"]["feature_novelty"]["threshold"]
    assert _monitor_errors(no_threshold)
    unknown = json.loads(json.dumps(good))
    unknown["signals"]["probe"] = {}
    assert _monitor_errors(unknown)


def test_a_built_bundle_with_a_broken_monitor_section_is_refused(tmp_path):
    from build_engines import cli
    from tests.edge.tiny_bundles import FAST, POLICIES

    root = tmp_path / "chunk"
    assert cli.main(["--policy", f"{POLICIES}:chunk_without_proprio", "--out", str(root), *FAST,
                     "--monitor-rate", "0.15"]) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    validate_manifest(manifest, root / "manifest.json")
    signals = manifest["monitor"]["signals"]
    assert set(signals) == {"feature_novelty", "action_consistency"}, "no language: no instruction novelty"
    assert manifest["files"][signals["feature_novelty"]["path"]], "the model is hashed like every file"
    assert manifest["monitor"]["camera_jpeg"] == [95, 85, 75], "fitted on frames as JPEG cameras deliver them"
    manifest["monitor"]["window"]["over"] = 0
    with pytest.raises(BundleError, match="monitor/window/over"):
        validate_manifest(manifest, root / "manifest.json")


# --- windowed thresholds on the closed loop ------------------------------------------------------------------


@pytest.mark.parametrize(("over", "ticks"), [(3, 5), (1, 1), (2, 2), (4, 7)])
def test_the_windowed_statistic_exceeds_a_threshold_exactly_when_the_runtime_alarm_is_on(over, ticks):
    rng = np.random.default_rng(over * 10 + ticks)
    for _ in range(40):
        scores, threshold = rng.random(30), float(rng.uniform(0.05, 0.95))
        alarm = WindowedAlarm(threshold, WindowConfig(over, ticks))
        assert list(windowed_statistic(scores, over, ticks) > threshold) == [alarm.update(s) for s in scores]


def test_the_spread_statistic_matches_the_gate_entering_after_its_ticks_in_a_row():
    rng = np.random.default_rng(7)
    for _ in range(40):
        scores, threshold = rng.random(40), float(rng.uniform(0.2, 0.8))
        gate = UncertaintyGate(GateConfig(threshold=threshold, hard_ceiling=math.inf, enter_ticks=3))
        entered = [gate.update(s).transition is not None and gate.mode is GateMode.FALLBACK for s in scores]
        stat = windowed_statistic(scores, 3, 3) > threshold
        first = next((i for i, e in enumerate(entered) if e), None)
        assert first == next((i for i, s in enumerate(stat) if s), None)  # the gate's first entry, the same tick


def test_action_changes_are_the_runtime_consistency_score():
    actions = np.random.default_rng(3).random((12, 3)).astype(np.float32)
    runtime = ActionConsistency(3, 2.0)
    assert [runtime.score(a) for a in actions] == pytest.approx(list(first_action_changes(actions, 2.0)), abs=1e-6)


def _trace(rng, n, shift=0.0):
    return EpisodeTrace(spread=rng.random(n) + shift, features=rng.normal(size=(n, 4)).astype(np.float32) + shift,
                        first_actions=rng.normal(size=(n, 2)).astype(np.float32))


def test_closed_loop_thresholds_split_the_rate_over_the_signals_and_hold_it_on_new_episodes():
    rng = np.random.default_rng(11)
    model = fit_mahalanobis(rng.normal(size=(400, 4)))
    calibration = [_trace(rng, 60) for _ in range(80)]
    window = {"over": 3, "ticks": 5}
    loop = closed_loop_thresholds({"cpu": calibration}, {"cpu": {"vision": "int8-cpu"}}, {"int8-cpu": model},
                                  action_range=2.0, rate=0.03, window=window, enter_ticks=3)
    assert loop["signals"] == ["spread", "action_consistency", "feature_novelty"]
    assert loop["rate_per_signal"] == pytest.approx(0.01) and loop["episodes"] == 80 and loop["ticks"] == 4800
    assert loop["thresholds"]["time_on_task"] == {"cpu": 90.0}, "every successful episode took 60 inferences: 1.5 x"
    fresh = [_trace(rng, 60) for _ in range(200)]
    thresholds = {name: row["cpu"] for name, row in loop["thresholds"].items()}
    on, episodes_on = [], []
    for episode in fresh:  # the runtime's alarms, on in-distribution episodes not calibrated on
        alarms = {"feature_novelty": WindowedAlarm(thresholds["feature_novelty"], WindowConfig(**window)),
                  "action_consistency": WindowedAlarm(thresholds["action_consistency"], WindowConfig(**window))}
        gate = UncertaintyGate(GateConfig(threshold=thresholds["spread"], hard_ceiling=math.inf, enter_ticks=3))
        runtime = ActionConsistency(2, 2.0)
        features = FeatureNovelty(model["mean"], model["whiten"])
        previous = GateMode.NOMINAL
        for i in range(60):
            entered = gate.update(episode.spread[i]).mode is GateMode.FALLBACK and previous is GateMode.NOMINAL
            previous = gate.mode
            feature_on = alarms["feature_novelty"].update(features.score(episode.features[i][None]))
            consistency_on = alarms["action_consistency"].update(runtime.score(episode.first_actions[i]))
            on.append(entered or feature_on or consistency_on)
        episodes_on.append(any(on[-60:]))
    assert np.mean(on) <= 0.03 * 1.5  # the union of the three alarms: about the stated rate, not 3x it
    # 80 calibration episodes support the default episode rate split over three signals and time on task
    # (5% / 4 each): about 5% of new episodes see any alarm.
    assert loop["supported_episode_rate"] == pytest.approx(0.05 / 4) and np.mean(episodes_on) <= 0.09
    shifted = [_trace(rng, 60, shift=2.0) for _ in range(20)]  # novel features
    novel = np.concatenate([windowed_statistic(mahalanobis(e.features, model), 3, 5) for e in shifted])
    assert np.mean(novel > thresholds["feature_novelty"]) > 0.5


def test_too_few_closed_loop_ticks_give_the_largest_statistic_and_say_what_they_support():
    trace = _trace(np.random.default_rng(5), 20)
    loop = closed_loop_thresholds({"cpu": [trace]}, {"cpu": {"vision": "fp32"}}, {},
                                  action_range=1.0, rate=0.01, window={"over": 3, "ticks": 5}, enter_ticks=3)
    assert loop["signals"] == ["spread", "action_consistency"]  # no feature model: no feature signal
    assert loop["thresholds"]["spread"]["cpu"] == pytest.approx(windowed_statistic(trace.spread, 3, 3).max())
    assert loop["supported_rate"] == pytest.approx(1 / 19)  # 18 windowed spread values: 1 / (n + 1)


def test_the_gate_check_runs_failure_episodes_past_the_time_on_task_it_checks():
    from build_engines.monitor_check import GATE_MAX_FAILURE_TICKS, ONSET_TICK, failure_ticks

    def manifest(threshold):
        return {"monitor": {"signals": {"time_on_task": {"threshold": {"cpu": threshold}}}}}

    assert failure_ticks({"monitor": {"signals": {}}}, "cpu") == 2 * ONSET_TICK  # no time on task
    assert failure_ticks(manifest(20.0), "cpu") == 2 * ONSET_TICK  # it trips within the onset kinds' window
    ticks = failure_ticks(manifest(72.0), "cpu")
    assert ticks > 72 + 3, "the alarm fires at the 73rd inference and needs a few ticks to show"
    assert failure_ticks(manifest(5000.0), "cpu") == GATE_MAX_FAILURE_TICKS
    assert failure_ticks(manifest(72.0), "tensorrt") == 2 * ONSET_TICK  # a target without one
