"""The measured choice (edge/inference/tuning.py) with injected times: a fake timer that each candidate's
runner advances by its own duration, so no assertion depends on the wall clock."""

from __future__ import annotations

import json

import pytest

from edge.errors import ConfigError
from edge.inference import tuning
from edge.inference.pipeline import PolicyConfig
from edge.inference.tuning import Candidate, TuneCache, TuneChoice


class FakeTimer:
    def __init__(self):
        self.now = 0.0
        self.calls: list[Candidate] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, candidate: Candidate, *durations_ms: float):
        """A runner that takes durations_ms[i] on its i-th call (the last one repeated)."""
        count = [0]

        def run() -> None:
            self.calls.append(candidate)
            self.now += durations_ms[min(count[0], len(durations_ms) - 1)] / 1e3
            count[0] += 1

        return run


FP32 = Candidate("cpu-fp32", 1)
INT8 = Candidate("cpu", 1)


def test_the_faster_of_two_candidates_is_chosen():
    timer = FakeTimer()
    runners = {FP32: timer.runner(FP32, 12.0), INT8: timer.runner(INT8, 7.0)}
    choice = tuning.tune(runners, FP32, budget_s=0.5, timer=timer)
    assert (choice.target, choice.threads, choice.source) == ("cpu", 1, "measured")
    assert choice.p99_ms == pytest.approx(7.0)
    assert choice.baseline_p99_ms == pytest.approx(12.0)
    timer = FakeTimer()
    runners = {FP32: timer.runner(FP32, 12.0), INT8: timer.runner(INT8, 19.0)}
    assert tuning.tune(runners, FP32, budget_s=0.5, timer=timer).target == "cpu-fp32"


def test_p99_decides_not_the_median():
    timer = FakeTimer()
    # INT8's median is lower, but one run in ten takes 40 ms: by p99 FP32 is the faster.
    spiky = [5.0] * 9 + [40.0]
    runners = {FP32: timer.runner(FP32, 10.0), INT8: timer.runner(INT8, *(spiky * 20))}
    choice = tuning.tune(runners, FP32, budget_s=1.0, timer=timer)
    int8 = next(m for m in choice.measurements if m.candidate == INT8)
    assert int8.p50_ms < 10.0 < int8.p99_ms
    assert choice.target == "cpu-fp32"


def test_p99s_within_the_noise_are_a_tie_the_median_decides():
    timer = FakeTimer()
    qop = Candidate("cpu-qoperator", 1)
    # By p99 the QOperator graph is 5% faster (one slow run each), by the median INT8 is: noise, not speed.
    runners = {FP32: timer.runner(FP32, *([20.0] * 9 + [40.0]) * 3), INT8: timer.runner(INT8, *([15.0] * 9 + [34.0]) * 3),
               qop: timer.runner(qop, *([17.0] * 9 + [32.5]) * 3)}
    choice = tuning.tune(runners, FP32, budget_s=0.9, timer=timer)
    by = {m.candidate: m for m in choice.measurements}
    assert by[qop].p99_ms < by[INT8].p99_ms <= by[qop].p99_ms * (1 + tuning.P99_TIE)
    assert choice.target == "cpu", "the lower median among p99s within 10%"
    assert by[FP32].p99_ms > by[qop].p99_ms * (1 + tuning.P99_TIE), "FP32 is out of the tie here"


def test_ties_go_to_fp32_and_fp32_alone_is_chosen():
    timer = FakeTimer()
    runners = {INT8: timer.runner(INT8, 8.0), FP32: timer.runner(FP32, 8.0)}
    assert tuning.tune(runners, FP32, budget_s=0.2, timer=timer).target == "cpu-fp32"
    timer = FakeTimer()
    assert tuning.tune({FP32: timer.runner(FP32, 3.0)}, FP32, budget_s=0.2, timer=timer).target == "cpu-fp32"


def test_measuring_is_interleaved_and_bounded_by_the_budget():
    timer = FakeTimer()
    a, b, c = Candidate("a", 1), Candidate("b", 1), Candidate("c", 2)
    runners = {x: timer.runner(x, 10.0) for x in (a, b, c)}
    found = tuning.measure(runners, budget_s=0.3, timer=timer)
    # Rounds of one run each, in rotating order: no candidate gets two runs before the others had one.
    rounds = [timer.calls[i:i + 3] for i in range(0, len(timer.calls), 3)]
    assert all(sorted(r) == [a, b, c] for r in rounds)
    assert rounds[0][0] != rounds[1][0]
    assert timer.now == pytest.approx(0.3, abs=0.031)  # stops in the round the budget ran out
    assert {m.runs for m in found} == {len(rounds)}


def test_at_least_min_rounds_even_past_the_budget_and_at_most_max_rounds():
    timer = FakeTimer()
    found = tuning.measure({FP32: timer.runner(FP32, 1000.0)}, budget_s=0.1, timer=timer)
    assert found[0].runs == tuning.MIN_ROUNDS
    timer = FakeTimer()
    found = tuning.measure({FP32: timer.runner(FP32, 0.001)}, budget_s=100.0, timer=timer, max_rounds=50)
    assert found[0].runs == 50
    with pytest.raises(ConfigError, match="no candidate"):
        tuning.measure({}, 1.0, timer=timer)


def test_thread_counts_go_up_to_the_cores():
    assert tuning.thread_counts(1) == (1,)
    assert tuning.thread_counts(2) == (1, 2)
    assert tuning.thread_counts(6) == (1, 2, 4, 6)
    assert tuning.thread_counts(8) == (1, 2, 4, 8)


def test_baseline_is_the_all_fp32_target():
    targets = {"cpu": {"vision": "int8-cpu", "head": "int8-cpu"}, "cpu-fp32": {"vision": "fp32", "head": "fp32"}}
    assert tuning.baseline_target(targets) == "cpu-fp32"
    assert tuning.baseline_target({"cpu": targets["cpu"]}) is None


def test_cache_keeps_choices_by_fingerprint(tmp_path):
    cache = TuneCache(tmp_path / "state" / "tune.json")
    print_a = {"cpu_model": "A", "bundle_sha256": "1"}
    print_b = {"cpu_model": "B", "bundle_sha256": "1"}
    key_a, key_b = tuning.fingerprint_key(print_a), tuning.fingerprint_key(print_b)
    assert key_a != key_b
    assert cache.get(key_a) is None
    measured = TuneChoice("cpu", 2, "measured", p99_ms=4.0, baseline="cpu-fp32/1 thread(s)", baseline_p99_ms=6.0,
                          measurements=(tuning.Measurement(INT8, 10, 3.0, 4.0),))
    cache.put(key_a, print_a, measured)
    got = cache.get(key_a)
    assert (got.target, got.threads, got.source, got.fingerprint) == ("cpu", 2, "cached", key_a)
    assert got.measurements == measured.measurements
    assert cache.get(key_b) is None
    saved = json.loads(cache.path.read_text())
    assert saved["entries"][key_a]["fingerprint"] == print_a
    cache.path.write_text("{not json")
    assert cache.get(key_a) is None  # unreadable: measure again, never fail the start


def test_fingerprint_follows_the_bundle_and_the_settings(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"a": 1}')
    one = tuning.fingerprint(manifest, {"mc_samples": 16})
    assert tuning.fingerprint(manifest, {"mc_samples": 16}) == one
    assert {"cpu_model", "cpu_flags_sha256", "gpu", "lib_onnxruntime", "bundle_sha256"} <= set(one)
    assert tuning.fingerprint_key(tuning.fingerprint(manifest, {"mc_samples": 8})) != tuning.fingerprint_key(one)
    manifest.write_text('{"a": 2}')
    assert tuning.fingerprint(manifest, {"mc_samples": 16})["bundle_sha256"] != one["bundle_sha256"]


@pytest.mark.parametrize("values, key", [
    ({"target": "int4"}, "policy.target"),
    ({"threads": "many"}, "policy.threads"),
    ({"threads": -1}, "policy.threads"),
    ({"tune_budget_s": 0}, "policy.tune_budget_s"),
    ({"tune_cache": ""}, "policy.tune_cache"),
])
def test_policy_keys_are_validated(values, key):
    with pytest.raises(ConfigError, match=key):
        PolicyConfig(**values)


def test_auto_is_the_default_and_explicit_values_stay():
    assert PolicyConfig().needs_tuning and (PolicyConfig().target, PolicyConfig().threads) == ("auto", "auto")
    explicit = PolicyConfig(target="cpu-fp32", threads=2)
    assert not explicit.needs_tuning and (explicit.target, explicit.threads) == ("cpu-fp32", 2)
    assert PolicyConfig(target="cpu", threads="auto").needs_tuning
