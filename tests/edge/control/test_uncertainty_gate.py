import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.control.uncertainty_gate import GateConfig, GateMode, UncertaintyGate
from edge.errors import ConfigError

CFG = GateConfig(threshold=1.0, hard_ceiling=3.0, enter_ticks=3, exit_ticks=5)
HIGH = 2.0  # above threshold, below ceiling
CALM = 0.5


def modes(gate, scores):
    return [gate.update(s).mode for s in scores]


def test_enters_fallback_only_after_enter_ticks_consecutive_high_scores():
    gate = UncertaintyGate(CFG)
    decisions = [gate.update(s) for s in (HIGH, HIGH, HIGH)]
    assert [d.mode for d in decisions] == [GateMode.NOMINAL, GateMode.NOMINAL, GateMode.FALLBACK]
    assert decisions[0].transition is None and decisions[1].transition is None
    assert decisions[2].transition.startswith("NOMINAL->FALLBACK")
    assert "threshold" in decisions[2].transition
    assert gate.transitions == 1
    assert gate.ticks_in_fallback == 1


def test_a_calm_score_restarts_the_enter_count():
    gate = UncertaintyGate(CFG)
    got = modes(gate, [HIGH, HIGH, CALM, HIGH, HIGH])
    assert got == [GateMode.NOMINAL] * 5
    assert gate.update(HIGH).mode is GateMode.FALLBACK


def test_score_equal_to_threshold_is_calm():
    gate = UncertaintyGate(CFG)
    assert modes(gate, [1.0] * 10) == [GateMode.NOMINAL] * 10


def test_score_above_hard_ceiling_trips_immediately():
    gate = UncertaintyGate(CFG)
    d = gate.update(3.0001)
    assert d.mode is GateMode.FALLBACK and d.fallback
    assert "hard ceiling" in d.transition


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_score_trips_immediately_and_is_never_calm(bad):
    gate = UncertaintyGate(CFG)
    d = gate.update(bad)
    assert d.mode is GateMode.FALLBACK
    assert "not finite" in d.transition
    # NaN/Inf in fallback interrupts the calm streak: 4 calm, bad, 4 calm stays in fallback.
    assert modes(gate, [CALM] * 4 + [bad] + [CALM] * 4) == [GateMode.FALLBACK] * 9
    assert gate.update(CALM).mode is GateMode.NOMINAL


def test_leaves_fallback_after_exit_ticks_calm_scores():
    gate = UncertaintyGate(CFG)
    gate.update(10.0)
    decisions = [gate.update(CALM) for _ in range(5)]
    assert [d.mode for d in decisions] == [GateMode.FALLBACK] * 4 + [GateMode.NOMINAL]
    assert decisions[-1].transition.startswith("FALLBACK->NOMINAL")
    assert gate.transitions == 2
    assert gate.ticks_in_fallback == 5  # the tripping tick + 4 calm ones still in fallback


def test_alternating_scores_do_not_flicker():
    gate = UncertaintyGate(CFG)
    got = modes(gate, [HIGH, CALM] * 20)
    assert got == [GateMode.NOMINAL] * 40
    assert gate.transitions == 0
    # Once in fallback, alternating scores never accumulate 5 calm ticks in a row.
    gate.update(10.0)
    got = modes(gate, [CALM, HIGH] * 20)
    assert got == [GateMode.FALLBACK] * 40
    assert gate.transitions == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(min_value=0.0, max_value=5.0), st.just(math.nan), st.just(math.inf)),
        max_size=60,
    ),
    st.integers(1, 4),
    st.integers(1, 6),
)
def test_mode_matches_a_reference_model_and_transitions_are_separated(scores, enter, exit_):
    cfg = GateConfig(threshold=1.0, hard_ceiling=3.0, enter_ticks=enter, exit_ticks=exit_)
    gate = UncertaintyGate(cfg)
    fallback, high, calm, last_transition, in_fallback, switches = False, 0, 0, None, 0, 0
    for i, s in enumerate(scores):
        d = gate.update(s)
        before = fallback
        if not fallback:
            high = high + 1 if s > 1.0 else 0
            if not math.isfinite(s) or s > 3.0 or high >= enter:
                fallback, high, calm = True, 0, 0
        else:
            calm = calm + 1 if math.isfinite(s) and s <= 1.0 else 0
            if calm >= exit_:
                fallback, high, calm = False, 0, 0
        assert d.fallback == fallback
        assert (d.transition is not None) == (before != fallback)
        in_fallback += fallback
        if d.transition is not None:
            switches += 1
            # Leaving fallback always takes exit_ticks calm ticks after entering it.
            if last_transition is not None and d.mode is GateMode.NOMINAL:
                assert i - last_transition >= exit_
            last_transition = i
    assert gate.ticks_in_fallback == in_fallback
    assert gate.transitions == switches


def test_counters_and_transitions_are_logged(caplog):
    gate = UncertaintyGate(CFG)
    with caplog.at_level(logging.INFO, logger="edge.control.uncertainty_gate"):
        modes(gate, [5.0] + [CALM] * 5 + [HIGH] * 3 + [CALM] * 2)
    records = [r for r in caplog.records if r.name == "edge.control.uncertainty_gate"]
    assert len(records) == 3
    assert all(r.levelno == logging.INFO for r in records)
    assert "5" in records[0].getMessage() and "hard ceiling" in records[0].getMessage()
    assert "FALLBACK->NOMINAL" in records[1].getMessage()
    assert gate.transitions == 3
    assert gate.ticks_in_fallback == 5 + 3  # 1 trip + 4 calm, then 1 trip + 2 calm
    assert gate.ticks == 11


def test_reset_returns_to_nominal_and_keeps_counters():
    gate = UncertaintyGate(CFG)
    gate.update(math.nan)
    gate.reset()
    assert gate.mode is GateMode.NOMINAL
    assert gate.transitions == 1
    assert modes(gate, [HIGH, HIGH]) == [GateMode.NOMINAL] * 2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"threshold": 0.0, "hard_ceiling": 1.0}, "gate.threshold"),
        ({"threshold": -1.0, "hard_ceiling": 1.0}, "gate.threshold"),
        ({"threshold": math.nan, "hard_ceiling": 1.0}, "gate.threshold"),
        ({"threshold": "0.5", "hard_ceiling": 1.0}, "gate.threshold"),
        ({"threshold": 1.0, "hard_ceiling": 0.5}, "gate.hard_ceiling"),
        ({"threshold": 1.0, "hard_ceiling": math.nan}, "gate.hard_ceiling"),
        ({"threshold": 1.0, "hard_ceiling": 2.0, "enter_ticks": 0}, "gate.enter_ticks"),
        ({"threshold": 1.0, "hard_ceiling": 2.0, "exit_ticks": 0}, "gate.exit_ticks"),
        ({"threshold": 1.0, "hard_ceiling": 2.0, "exit_ticks": 2.5}, "gate.exit_ticks"),
        ({"threshold": 1.0, "hard_ceiling": 2.0, "enter_ticks": True}, "gate.enter_ticks"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GateConfig(**kwargs)


def test_config_accepts_infinite_ceiling_and_equal_bounds():
    assert GateConfig(threshold=1.0, hard_ceiling=math.inf).hard_ceiling == math.inf
    gate = UncertaintyGate(GateConfig(threshold=1.0, hard_ceiling=1.0, enter_ticks=5))
    assert gate.update(1.0).mode is GateMode.NOMINAL
    assert gate.update(1.5).mode is GateMode.FALLBACK
