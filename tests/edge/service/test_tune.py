"""`policy.target: auto` / `threads: auto` through the service (edge/service/tune.py) on a tiny bundle: real
pipelines are built and activated, the time each candidate takes is injected (a fake timer)."""

from __future__ import annotations

import json
import shutil

import pytest

from edge.errors import ConfigError
from edge.inference import tuning
from edge.inference.bundle import Bundle, write_manifest_digest
from edge.service import tune, wiring
from edge.service.config import config_from_dict

DEVICES = {"camera": {"source": "http://127.0.0.1:9/video"}, "motor": {"port": "/dev/null", "channels": 3}}
# Injected policy times (ms) by target; the thread count adds to it so that threads matter too.
TIMES = {"cpu": 4.0, "cpu-qoperator": 6.0, "cpu-reduce-range": 7.0, "cpu-fp32": 9.0}


@pytest.fixture
def chunk_bundle(tiny_bundle_dir):
    return Bundle.load(tiny_bundle_dir("chunk"))


@pytest.fixture
def fake_times(monkeypatch):
    """Each candidate pipeline's runner advances a fake clock by TIMES[target] + threads / 10 ms."""
    state = {"now": 0.0, "runs": 0, "times": dict(TIMES)}

    def runner(pipeline):
        threads = pipeline._vision.threads

        def run():
            state["runs"] += 1
            state["now"] += (state["times"][pipeline.target] + threads / 10) / 1e3

        return run

    monkeypatch.setattr(tuning, "pipeline_runner", runner)
    monkeypatch.setattr(tuning, "thread_counts", lambda cores=None: (1, 2))
    state["timer"] = lambda: state["now"]
    return state


def config(bundle, tmp_path, **policy):
    return config_from_dict({"bundle": str(bundle.root), **DEVICES, "policy": {"mc_samples": 4,
                             "tune_cache": str(tmp_path / "tune.json"), "tune_budget_s": 0.5, **policy}})


def factory(bundle):
    return lambda c: wiring.backend_factory(bundle, c)


def test_auto_measures_and_takes_the_fastest(chunk_bundle, tmp_path, fake_times):
    resolved, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path), factory(chunk_bundle),
                                           timer=fake_times["timer"])
    assert (resolved.policy.target, resolved.policy.threads, choice.source) == ("cpu", 1, "measured")
    # every CPU INT8 candidate the build wrote is timed; tensorrt's layout is no CPU candidate
    assert {(m.candidate.target, m.candidate.threads) for m in choice.measurements} == {
        (target, threads) for target in ("cpu", "cpu-qoperator", "cpu-reduce-range", "cpu-fp32")
        for threads in (1, 2)}
    # AVX2 without VNNI: the exact-path QDQ graph is slow, the 7-bit one is exact on the fast kernels
    fake_times["times"].update({"cpu": 20.0, "cpu-reduce-range": 3.0})
    _, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path), factory(chunk_bundle),
                                    timer=fake_times["timer"])
    assert (choice.target, choice.threads) == ("cpu-reduce-range", 1)
    fake_times["times"].update({"cpu-reduce-range": 20.0, "cpu-qoperator": 20.0})  # every INT8 slower: FP32
    _, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path), factory(chunk_bundle),
                                    timer=fake_times["timer"])
    assert (choice.target, choice.threads) == ("cpu-fp32", 1)
    assert choice.baseline_p99_ms == pytest.approx(choice.p99_ms)


def test_explicit_values_are_used_unchanged(chunk_bundle, tmp_path, fake_times):
    resolved, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path, target="cpu-fp32", threads=2),
                                           factory(chunk_bundle), timer=fake_times["timer"])
    assert (resolved.policy.target, resolved.policy.threads, choice.source) == ("cpu-fp32", 2, "configured")
    assert fake_times["runs"] == 0
    _, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path, target="cpu-fp32"),
                                    factory(chunk_bundle), timer=fake_times["timer"])
    assert {m.candidate.target for m in choice.measurements} == {"cpu-fp32"}  # only the threads measured


def test_falls_back_to_fp32_when_nothing_else_runs(chunk_bundle, tmp_path, fake_times):
    def failing_int8(c):
        make = wiring.backend_factory(chunk_bundle, c)

        def build(graph, variant, *args):
            backend = make(graph, variant, *args)
            if variant != "fp32":
                backend.model_path = tmp_path / "missing.onnx"  # this variant cannot be loaded here
            return backend

        return build

    _, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path), failing_int8,
                                    timer=fake_times["timer"])
    assert choice.target == "cpu-fp32"
    assert {m.candidate.target for m in choice.measurements} == {"cpu-fp32"}


def test_a_bundle_with_only_fp32_runs_fp32(chunk_bundle, tmp_path, fake_times):
    root = tmp_path / "fp32-only"
    shutil.copytree(chunk_bundle.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["targets"] = {"cpu-fp32": manifest["targets"]["cpu-fp32"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_manifest_digest(root)
    bundle = Bundle.load(root)
    _, choice = tune.resolve_policy(bundle, config(bundle, tmp_path), factory(bundle), timer=fake_times["timer"])
    assert choice.target == "cpu-fp32"


def test_tune_caches_by_fingerprint_and_run_uses_it(chunk_bundle, tmp_path, fake_times, monkeypatch):
    cfg = config(chunk_bundle, tmp_path)
    fake_times["times"].update({"cpu": 9.0, "cpu-fp32": 3.0})
    tuned = tune.tune_and_cache(chunk_bundle, cfg, factory(chunk_bundle), budget_s=1.0, timer=fake_times["timer"])
    assert (tuned.target, tuned.threads) == ("cpu-fp32", 1)
    runs = fake_times["runs"]
    fake_times["times"].update({"cpu": 1.0})  # would change the choice, were it measured again
    _, choice = tune.resolve_policy(chunk_bundle, cfg, factory(chunk_bundle), timer=fake_times["timer"])
    assert (choice.target, choice.source) == ("cpu-fp32", "cached")
    assert fake_times["runs"] == runs  # nothing measured
    # Another machine (another GPU here): the fingerprint differs, so run measures again.
    monkeypatch.setattr(tuning, "_gpu_identity", lambda: "another GPU")
    _, choice = tune.resolve_policy(chunk_bundle, cfg, factory(chunk_bundle), timer=fake_times["timer"])
    assert (choice.target, choice.source) == ("cpu", "measured")
    # Another T changes the work, so the fingerprint too.
    monkeypatch.undo()
    _, key16 = tune.machine_fingerprint(chunk_bundle, config(chunk_bundle, tmp_path, mc_samples=8))
    assert key16 != tune.machine_fingerprint(chunk_bundle, cfg)[1]


def test_nothing_to_tune_with_explicit_values(chunk_bundle, tmp_path):
    with pytest.raises(ConfigError, match="nothing to tune"):
        tune.tune_and_cache(chunk_bundle, config(chunk_bundle, tmp_path, target="cpu", threads=1),
                            factory(chunk_bundle))


def test_build_pipeline_resolves_auto_and_keeps_the_choice(chunk_bundle, tmp_path, fake_times):
    pipeline = wiring.build_pipeline(chunk_bundle, config(chunk_bundle, tmp_path))
    # build_pipeline times on the real clock, which the fake runners do not advance: any CPU target may win
    assert pipeline.target in set(TIMES) & set(chunk_bundle.manifest["targets"]), pipeline.tuning
    assert pipeline.tuning["source"] == "measured" and pipeline.tuning["target"] == pipeline.target
    assert "policy p99" in pipeline.tuning["line"]


def test_doctor_names_the_choice(chunk_bundle, tmp_path, fake_times):
    from edge.service import doctor

    cfg = config(chunk_bundle, tmp_path)
    assert "no cached choice" in doctor.check_tuning(chunk_bundle, cfg).message
    tune.tune_and_cache(chunk_bundle, cfg, factory(chunk_bundle), budget_s=0.2, timer=fake_times["timer"])
    assert "cached choice" in doctor.check_tuning(chunk_bundle, cfg).message
    assert "as configured" in doctor.check_tuning(chunk_bundle, config(chunk_bundle, tmp_path, target="cpu",
                                                                       threads=1)).message


def test_one_candidate_is_taken_without_measuring(chunk_bundle, tmp_path, fake_times, monkeypatch):
    monkeypatch.setattr(tuning, "thread_counts", lambda cores=None: (1,))
    resolved, choice = tune.resolve_policy(chunk_bundle, config(chunk_bundle, tmp_path, target="cpu"),
                                           factory(chunk_bundle), timer=fake_times["timer"])
    assert (resolved.policy.target, resolved.policy.threads, choice.source) == ("cpu", 1, "only candidate")
    assert fake_times["runs"] == 0
