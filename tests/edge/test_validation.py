"""edge.validation: each check names the key and what is allowed, returns the normalised value, and
lets through exactly what it promises."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.validation import (
    check_backoff,
    check_bool,
    check_bound,
    check_choice,
    check_number,
    check_pattern,
    check_range,
    check_sequence,
    check_text,
)


def message(check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        check(*args, **kwargs)
    return str(err.value)


# --- check_range ---------------------------------------------------------------------------------------

def test_range_message_names_key_range_unit_and_value():
    assert message(check_range, "loop.rate_hz", 500, 1.0, 200.0, unit="Hz") == (
        "loop.rate_hz must be a number in [1.0, 200.0] Hz, got 500")
    assert message(check_range, "loop.record_ticks", 5, 10, 1_000_000, integer=True) == (
        "loop.record_ticks must be an integer in [10, 1000000], got 5")


@pytest.mark.parametrize("value", [True, "3", None, math.nan, math.inf, [3]])
def test_range_refuses_what_is_not_a_finite_number(value):
    assert message(check_range, "x.y", value, 0, 10).startswith("x.y must be a number in [0, 10], got ")


def test_range_integer_refuses_floats_and_takes_numpy_integers():
    assert "an integer" in message(check_range, "x.n", 2.0, 0, 10, integer=True)
    value = check_range("x.n", np.int64(3), 0, 10, integer=True)
    assert value == 3 and type(value) is int
    assert check_range("x.seed", 10**400, 0, integer=True) == 10**400  # beyond a float, still an int


def test_range_returns_floats_for_numbers():
    value = check_range("x.s", 2, 0, 10)
    assert value == 2.0 and type(value) is float


def test_range_bounds_are_inclusive_unless_low_open():
    assert check_range("x.s", 0, 0, 1) == 0.0 and check_range("x.s", 1, 0, 1) == 1.0
    assert message(check_range, "camera.fps", 0, 0, 1000, unit="frames/s", low_open=True) == (
        "camera.fps must be a number in (0, 1000] frames/s, got 0")
    assert message(check_range, "x.s", 1.5, 0, 1) == "x.s must be a number in [0, 1], got 1.5"


def test_range_with_one_bound_says_so():
    assert message(check_range, "gate.enter_ticks", 0, 1, integer=True) == (
        "gate.enter_ticks must be an integer >= 1, got 0")
    assert message(check_range, "x.s", 0, 0, low_open=True) == "x.s must be a number > 0, got 0"
    assert message(check_range, "x.s", 5, high=4) == "x.s must be a number <= 4, got 5"


def test_range_nullable_takes_none_and_says_null():
    assert check_range("x.s", None, 0, 1, nullable=True) is None
    assert message(check_range, "x.s", 2, 0, 1, nullable=True) == "x.s must be a number in [0, 1] or null, got 2"


def test_range_dotted_and_hint():
    assert message(check_range, "realtime.sched_fifo_priority", 0, 1, 99, integer=True, nullable=True,
                   dotted=True) == "realtime.sched_fifo_priority must be an integer within 1..99 or null, got 0"
    assert message(check_range, "x.s", -1, 0, hint="count from 0") == "x.s must be a number >= 0, got -1; count from 0"


def test_checks_raise_the_error_asked_for():
    with pytest.raises(ValueError, match="x.s"):
        check_range("x.s", 5, 0, 1, error=ValueError)


# --- check_number and check_bound ------------------------------------------------------------------------

def test_number_is_finite_unless_asked_and_never_a_bool():
    assert check_number("x.s", np.float32(0.5)) == 0.5
    assert message(check_number, "x.s", math.inf) == "x.s must be a finite number, got inf"
    assert check_number("x.s", math.inf, finite=False) == math.inf
    assert message(check_number, "x.s", True, finite=False) == "x.s must be a number, got True"


def test_bound_words_the_range_without_the_type():
    assert message(check_bound, "safety.period_s", 0.0, 0, unit="s", low_open=True) == (
        "safety.period_s must be > 0 s, got 0.0")
    assert message(check_bound, "safety.damping", 1.5, 0, 1, dotted=True) == "safety.damping must be within 0..1, got 1.5"
    assert check_bound("x.s", math.inf, 1) == math.inf
    assert "x.s must be >= 1" in message(check_bound, "x.s", math.nan, 1)


# --- choices, booleans, text -----------------------------------------------------------------------------

def test_choice_lists_the_choices_quoted_or_plain():
    assert check_choice("policy.backend", "tensorrt", ("onnxruntime", "tensorrt")) == "tensorrt"
    assert message(check_choice, "policy.backend", "pytorch", ("onnxruntime", "tensorrt")) == (
        "policy.backend must be one of 'onnxruntime', 'tensorrt', got 'pytorch'")
    assert message(check_choice, "safety.fallback_behaviour", "coast", ("controlled_stop", "damped"),
                   quote=False) == "safety.fallback_behaviour must be one of controlled_stop, damped, got 'coast'"


def test_choice_of_one_reads_as_must_be_and_takes_unhashable_values():
    assert message(check_choice, "metrics.host", "0.0.0.0", ("127.0.0.1",), quote=False, hint="local only") == (
        "metrics.host must be 127.0.0.1, got '0.0.0.0'; local only")
    assert "got ['a']" in message(check_choice, "camera.backend", ["a"], {"a": 1, "b": 2})


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bool_takes_only_true_and_false(value):
    assert message(check_bool, "motor.exclusive", value) == f"motor.exclusive must be true or false, got {value!r}"
    assert check_bool("motor.exclusive", False) is False


def test_text_must_have_more_than_whitespace():
    assert check_text("motor.port", "/dev/ttyUSB0") == "/dev/ttyUSB0"
    assert check_text("instruction.initial", None, nullable=True) is None
    assert message(check_text, "instruction.initial", "   ", "a non-empty string or left out") == (
        "instruction.initial must be a non-empty string or left out, got '   '")
    assert "got 3" in message(check_text, "motor.port", 3)


def test_pattern_must_match_in_full():
    digits = re.compile(r"\d+\.\d+")
    assert check_pattern("compute_capability", "8.7", digits, "like '8.7'") == "8.7"
    assert message(check_pattern, "compute_capability", "8.7a", digits, "like '8.7'") == (
        "compute_capability must be like '8.7', got '8.7a'")
    assert "got None" in message(check_pattern, "compute_capability", None, digits, "like '8.7'")


# --- sequences and the backoff pair -----------------------------------------------------------------------

def test_sequence_checks_each_entry_under_its_index():
    assert check_sequence("safety.action_low", [-1, np.float64(-0.5)], check_number) == (-1.0, -0.5)
    assert check_sequence("safety.action_low", np.array([-1.0, 0.0]), check_number) == (-1.0, 0.0)
    assert message(check_sequence, "safety.action_high", (1.0, math.inf), check_number) == (
        "safety.action_high[1] must be a finite number, got inf")


@pytest.mark.parametrize("value", ["0,1", b"01", 3, None, {"a": 1}, np.zeros((2, 2))])
def test_sequence_refuses_what_is_not_a_list(value):
    assert message(check_sequence, "realtime.cpu_affinity", value, check_number, noun="CPU indices").startswith(
        "realtime.cpu_affinity must be a list of CPU indices, got ")


def test_sequence_length_and_emptiness_are_named():
    each = "one per action dimension"
    assert message(check_sequence, "safety.action_low", (), check_number) == (
        "safety.action_low must have at least one entry")
    assert message(check_sequence, "safety.action_high", (1.0, 1.0), check_number, length=3, each=each) == (
        "safety.action_high must have 3 entries (one per action dimension), got 2")
    assert message(check_sequence, "safety.action_low", 1.0, check_number, each=each) == (
        "safety.action_low must be a list of numbers, one per action dimension, got 1.0")


def test_backoff_is_an_ordered_pair_of_positive_seconds():
    assert check_backoff("camera.reconnect_backoff_s", [0.2, 2]) == (0.2, 2.0)
    assert message(check_backoff, "camera.reconnect_backoff_s", (0.5,)) == (
        "camera.reconnect_backoff_s must be a pair [first_s, longest_s], got (0.5,)")
    assert message(check_backoff, "motor.reconnect_backoff_s", (0.0, 1.0)) == (
        "motor.reconnect_backoff_s[0] must be a number in (0, 60] s, got 0.0")
    assert message(check_backoff, "motor.reconnect_backoff_s", (2.0, 1.0)) == (
        "motor.reconnect_backoff_s must be [first_s, longest_s] with first_s <= longest_s, got [2.0, 1.0]")
    assert "(0, 5] s" in message(check_backoff, "x.backoff_s", (1.0, 6.0), longest_allowed_s=5)
