"""The failure monitor's build side (build_engines/monitor.py): the Mahalanobis model against numpy, the
split-conformal threshold, and the manifest's `monitor` section as the runtime's schema checks it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from build_engines.errors import GateError
from build_engines.monitor import conformal_threshold, fit_mahalanobis, mahalanobis, pool, shrunk_covariance
from edge.control.monitor import FeatureNovelty
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
    manifest["monitor"]["window"]["over"] = 0
    with pytest.raises(BundleError, match="monitor/window/over"):
        validate_manifest(manifest, root / "manifest.json")
