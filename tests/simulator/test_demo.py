"""The demo's report of how an episode ended (simulator/demo.py), from ground truth and the service's status."""

from __future__ import annotations

from simulator.demo import episode_end


def truth(success=False, stopped=True):
    return {"success": success, "motors_stopped": stopped}


def test_an_episode_that_comes_to_rest_in_fallback_names_the_signals_and_the_onset():
    status = {"mode": "fallback", "monitor": {"tripped": ["feature_novelty", "spread"]}}
    text, stopped = episode_end(truth(), status, 2.94)
    assert stopped and text == "stopped in fallback (feature_novelty, spread), first fallback 2.9 s in"


def test_fallback_with_the_motors_still_turning_is_not_a_stop():
    text, stopped = episode_end(truth(stopped=False), {"mode": "fallback", "monitor": {"tripped": []}}, 1.0)
    assert not stopped and text.startswith("still moving at the time limit")


def test_success_holds_and_nominal_ends_read_as_such():
    assert episode_end(truth(success=True), {"mode": "fallback"}, 0.5) == ("reached the target", False)
    text, stopped = episode_end(truth(), {"mode": "hold", "hold_reason": "instruction not understood: 'x'"}, None)
    assert text.startswith("held: instruction not understood") and not stopped
    text, stopped = episode_end(truth(stopped=False), {"mode": "nominal"}, None)
    assert text == "still moving at the time limit, mode nominal" and not stopped
    text, _ = episode_end(truth(), None, None)  # the service never answered
    assert text == "stopped at the time limit, mode unknown"
