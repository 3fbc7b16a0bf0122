import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.control.safety import SafetyConfig, SafetyLayer, SafetyReason
from edge.errors import ConfigError, InputError

LOW = (-1.0, -0.5, 0.0)
HIGH = (1.0, 0.5, 1.0)
SLEW = (2.0, 1.0, 5.0)
DECEL = (1.0, 0.5, 5.0)
PERIOD = 0.1
TOL = 1e-6  # float32 rounding of values up to ~1


def make(behaviour="controlled_stop", **kw):
    cfg = SafetyConfig(
        action_low=LOW,
        action_high=HIGH,
        max_slew_per_s=SLEW,
        decel_per_s=DECEL,
        period_s=PERIOD,
        fallback_behaviour=behaviour,
        **kw,
    )
    return SafetyLayer(cfg)


def fresh(layer, action, now, fallback=False):
    return layer.apply(
        np.asarray(action, dtype=np.float32),
        now_s=now,
        frame_time_s=now - 0.05,
        telemetry_time_s=now - 0.01,
        fallback=fallback,
    )


def test_nominal_action_within_limits_passes_unchanged():
    layer = make()
    layer.reset(np.array([0.1, -0.05, 0.3]))
    r = fresh(layer, [0.2, 0.0, 0.5], now=10.0)
    assert r.reasons == SafetyReason.NONE
    assert not r.stopping and not r.fallback
    assert r.command.dtype == np.float32
    np.testing.assert_allclose(r.command, [0.2, 0.0, 0.5], atol=TOL)


def test_clamp_then_slew_against_last_sent_with_period_on_first_call():
    layer = make()
    r = fresh(layer, [5.0, -5.0, 0.4], now=1.0)
    assert r.reasons == SafetyReason.CLAMPED | SafetyReason.SLEW_LIMITED
    # First call uses period_s: max step = slew * 0.1 = (0.2, 0.1, 0.5); third dim needs 0.4 only.
    np.testing.assert_allclose(r.command, [0.2, -0.1, 0.4], atol=TOL)
    # 10 s later the elapsed time is clamped to 3 periods.
    r = fresh(layer, [5.0, -5.0, 0.4], now=11.0)
    np.testing.assert_allclose(r.command, [0.8, -0.4, 0.4], atol=TOL)
    # A clock going backwards allows no change at all.
    r = fresh(layer, [-1.0, 0.5, 0.0], now=10.0)
    assert r.reasons & SafetyReason.SLEW_LIMITED
    np.testing.assert_allclose(r.command, [0.8, -0.4, 0.4], atol=TOL)


def test_result_command_is_read_only_view_and_last_command_matches():
    layer = make()
    r = fresh(layer, [0.1, 0.1, 0.1], now=0.0)
    with pytest.raises(ValueError):
        r.command[0] = 3.0
    np.testing.assert_array_equal(layer.last_command, r.command)
    kept = r.command.copy()
    fresh(layer, [0.2, 0.2, 0.2], now=0.1)
    assert not np.array_equal(kept, layer.last_command)  # the view moves on; the copy does not


# input_loss_stop: immediate -> zero at once; ramp -> from (0.5, 0.2, 0.5) by decel * 0.1 = (0.1, 0.05, 0.5).
LOSS_STOPS = [("immediate", [0.0, 0.0, 0.0]), ("ramp", [0.4, 0.15, 0.0])]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("behaviour", ["controlled_stop", "damped"])
@pytest.mark.parametrize(("loss_stop", "expected"), LOSS_STOPS)
def test_nan_guard_never_passes_nan_and_stops(bad, behaviour, loss_stop, expected):
    layer = make(behaviour, input_loss_stop=loss_stop)
    layer.reset([0.5, 0.2, 0.5])
    r = fresh(layer, [0.1, bad, 0.1], now=0.0)
    assert r.reasons & SafetyReason.NAN_GUARD and r.reasons & SafetyReason.FALLBACK
    assert r.stopping
    assert np.isfinite(r.command).all()
    np.testing.assert_allclose(r.command, expected, atol=TOL)


@pytest.mark.parametrize(
    ("frame_age", "telemetry_age", "flags"),
    [
        (None, 0.0, SafetyReason.STALE_FRAME),
        (0.0, None, SafetyReason.STALE_TELEMETRY),
        (0.21, 0.0, SafetyReason.STALE_FRAME),
        (0.0, 0.5, SafetyReason.STALE_TELEMETRY),
        (-5.0, 0.0, SafetyReason.STALE_FRAME),  # stamped on another clock
        (math.nan, math.inf, SafetyReason.STALE_FRAME | SafetyReason.STALE_TELEMETRY),
    ],
)
@pytest.mark.parametrize(("loss_stop", "expected"), LOSS_STOPS)
def test_stale_inputs_force_a_stop_even_when_damped(frame_age, telemetry_age, flags, loss_stop, expected):
    layer = make("damped", input_loss_stop=loss_stop)
    layer.reset([0.5, 0.2, 0.5])
    now = 100.0
    r = layer.apply(
        np.array([1.0, 0.5, 1.0]),
        now_s=now,
        frame_time_s=None if frame_age is None else now - frame_age,
        telemetry_time_s=None if telemetry_age is None else now - telemetry_age,
        fallback=False,
    )
    assert r.reasons == flags | SafetyReason.FALLBACK
    assert r.stopping
    np.testing.assert_allclose(r.command, expected, atol=TOL)


def test_inputs_just_inside_two_periods_are_fresh():
    layer = make()
    now = 100.0
    r = layer.apply(
        np.zeros(3), now_s=now, frame_time_s=now - 0.19, telemetry_time_s=now - 0.19, fallback=False
    )
    assert r.reasons == SafetyReason.NONE


def test_damped_fallback_scales_clamps_and_slew_limits():
    layer = make("damped", damping=0.5)
    layer.reset([0.0, 0.0, 0.0])
    r = fresh(layer, [0.3, -0.1, 4.0], now=0.0, fallback=True)
    assert r.reasons & SafetyReason.FALLBACK and r.reasons & SafetyReason.CLAMPED
    assert not r.stopping
    # 0.5 * action = (0.15, -0.05, 2.0) -> clamp (.., .., 1.0) -> slew (0.2, 0.1, 0.5) per 0.1 s.
    np.testing.assert_allclose(r.command, [0.15, -0.05, 0.5], atol=TOL)


@pytest.mark.parametrize("dt", [0.1, 0.037, 0.25])
def test_controlled_stop_reaches_zero_and_stays(dt):
    layer = make()
    start = np.array([1.0, -0.5, 0.7])
    layer.reset(start)
    slowest = min(dt, PERIOD)  # the first tick after reset() counts as one period
    need = max(math.ceil(abs(s) / (d * slowest) - 1e-9) for s, d in zip(start, DECEL, strict=True))
    prev = start.astype(np.float32)
    now = 0.0
    commands = []
    for _ in range(need + 20):
        now += dt
        r = fresh(layer, [1.0, 0.5, 1.0], now=now, fallback=True)
        assert r.stopping and r.reasons == SafetyReason.FALLBACK
        cmd = r.command.copy()
        step = dt if commands else PERIOD
        assert np.all(np.abs(cmd - prev) <= np.array(DECEL) * step + TOL)
        assert np.all(np.abs(cmd) <= np.abs(prev) + TOL)  # never overshoots past zero
        commands.append(cmd)
        prev = cmd
    first_zero = next(i for i, c in enumerate(commands) if not c.any())
    assert 0 < first_zero <= need  # ramped, not jumped; float residue may cost one tick
    assert all(not c.any() for c in commands[first_zero:])


def test_estop_is_immediate_latched_and_cleared():
    layer = make()
    layer.reset([0.9, 0.4, 0.9])
    layer.estop()
    assert layer.estopped
    assert not layer.last_command.any()  # zero at once, before the next tick
    for k in range(3):
        r = fresh(layer, [1.0, 0.5, 1.0], now=float(k) * PERIOD)
        assert r.reasons == SafetyReason.ESTOP and r.stopping
        assert not r.command.any()
    layer.reset([0.5, 0.5, 0.5])  # reset does not release the latch
    assert fresh(layer, [1.0, 0.5, 1.0], now=0.3).reasons == SafetyReason.ESTOP
    layer.clear_estop()
    r = fresh(layer, [1.0, 0.5, 1.0], now=0.4)
    assert r.reasons == SafetyReason.SLEW_LIMITED
    np.testing.assert_allclose(r.command, [0.2, 0.1, 0.5], atol=TOL)  # slews up from zero


def test_wrong_shape_or_dtype_is_an_input_error():
    layer = make()
    with pytest.raises(InputError, match=r"shape \(3,\)"):
        fresh(layer, [0.0, 0.0], now=0.0)
    with pytest.raises(InputError):
        layer.apply(
            np.array(["a", "b", "c"]), now_s=0.0, frame_time_s=0.0, telemetry_time_s=0.0, fallback=False
        )
    with pytest.raises(InputError):
        layer.reset([math.nan, 0.0, 0.0])


# -- properties -----------------------------------------------------------------------------

wild = st.one_of(
    st.floats(-2.0, 2.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e30, -1e30, 1e308, math.nan, math.inf, -math.inf]),
)
age = st.one_of(
    st.none(),
    st.floats(0.0, 0.15),  # fresh
    st.floats(0.25, 5.0),  # stale
    st.floats(-3.0, -0.15),  # from the future: another clock
)
tick = st.tuples(
    st.just("apply"),
    st.lists(wild, min_size=3, max_size=3),
    st.floats(-0.2, 1.0),  # elapsed clock time, negative = clock went back
    st.booleans(),  # gate fallback
    age,
    age,
)
op = st.one_of(tick, tick, tick, tick, tick, tick, st.just(("estop",)), st.just(("clear",)))


def _stale(a, cfg):
    return a is None or a > cfg.stale_after_s or a < -cfg.period_s


start_command = st.tuples(st.floats(-1.0, 1.0), st.floats(-0.5, 0.5), st.floats(0.0, 1.0))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["controlled_stop", "damped"]),
    st.sampled_from(["immediate", "ramp"]),
    start_command,
    st.lists(op, min_size=1, max_size=40),
)
def test_output_is_always_finite_within_limits_and_slew_bounded(behaviour, loss_stop, start, ops):
    layer = make(behaviour, input_loss_stop=loss_stop)
    layer.reset(start)
    cfg = layer.config
    low, high = np.float32(LOW), np.float32(HIGH)
    slew, decel = np.array(SLEW), np.array(DECEL)
    prev = layer.last_command.copy()
    now, last_now, estopped = 50.0, None, False
    for item in ops:
        if item[0] == "estop":
            layer.estop()
            estopped = True
            prev = layer.last_command.copy()
            assert not prev.any()
            continue
        if item[0] == "clear":
            layer.clear_estop()
            estopped = False
            continue
        _, action, dt, gate_fallback, frame_age, tel_age = item
        now += dt
        r = layer.apply(
            np.array(action, dtype=np.float64),
            now_s=now,
            frame_time_s=None if frame_age is None else now - frame_age,
            telemetry_time_s=None if tel_age is None else now - tel_age,
            fallback=gate_fallback,
        )
        elapsed = PERIOD if last_now is None else min(max(now - last_now, 0.0), 3 * PERIOD)
        last_now = now
        cmd = r.command.copy()
        assert cmd.dtype == np.float32
        assert np.isfinite(cmd).all()
        assert np.all(cmd >= low) and np.all(cmd <= high)
        np.testing.assert_array_equal(cmd, layer.last_command)
        if estopped:
            assert r.reasons == SafetyReason.ESTOP and not cmd.any()
            prev = cmd
            continue
        finite = all(math.isfinite(a) for a in action)
        stale = _stale(frame_age, cfg) or _stale(tel_age, cfg)
        if (stale or not finite) and loss_stop == "immediate":
            # Lost input: zero at once, as an e-stop (the only changes faster than the slew limit).
            assert r.stopping and r.fallback and not cmd.any()
            prev = cmd
            continue
        assert np.all(np.abs(cmd.astype(np.float64) - prev) <= slew * elapsed + TOL)
        assert bool(r.reasons & SafetyReason.NAN_GUARD) == (not finite)
        assert bool(r.reasons & SafetyReason.STALE_FRAME) == _stale(frame_age, cfg)
        assert bool(r.reasons & SafetyReason.STALE_TELEMETRY) == _stale(tel_age, cfg)
        assert r.fallback == (gate_fallback or stale or not finite)
        if not finite or stale or (gate_fallback and behaviour == "controlled_stop"):
            # Controlled stop: toward zero, at the deceleration limit, never past zero.
            assert r.stopping
            assert np.all(np.abs(cmd.astype(np.float64) - prev) <= decel * elapsed + TOL)
            assert np.all(np.abs(cmd) <= np.abs(prev) + TOL)
            assert np.all(np.sign(cmd) * np.sign(prev) >= 0)
        else:
            assert not r.stopping
            target = np.clip(np.array(action) * (cfg.damping if gate_fallback else 1.0), LOW, HIGH)
            want = prev + np.clip(target - prev, -slew * elapsed, slew * elapsed)
            np.testing.assert_allclose(cmd, want, atol=TOL)
        prev = cmd


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"action_low": (1.0, -0.5, 0.0)}, r"safety\.action_low\[0\]"),
        ({"action_low": (-1.0, 0.1, 0.0), "action_high": (1.0, 0.5, 1.0)}, "must include 0"),
        ({"action_high": (1.0, 0.5)}, r"safety\.action_high must have 3 entries"),
        ({"action_low": ()}, r"safety\.action_low must have at least one"),
        ({"action_low": "abc"}, r"safety\.action_low must be a list"),
        ({"action_high": (1.0, math.inf, 1.0)}, r"safety\.action_high\[1\] must be a finite"),
        ({"max_slew_per_s": (2.0, 0.0, 5.0)}, r"safety\.max_slew_per_s\[1\] must be > 0"),
        ({"decel_per_s": (3.0, 0.5, 5.0)}, r"safety\.decel_per_s\[0\] must be > 0 and <= safety\.max_slew"),
        ({"decel_per_s": 0.0}, r"safety\.decel_per_s\[0\]"),
        ({"period_s": 0.0}, r"safety\.period_s must be > 0"),
        ({"stale_after_periods": -1.0}, r"safety\.stale_after_periods must be > 0"),
        (
            {"fallback_behaviour": "coast"},
            r"safety\.fallback_behaviour must be one of controlled_stop, damped",
        ),
        ({"damping": 1.5}, r"safety\.damping must be within 0\.\.1"),
        ({"input_loss_stop": "coast"}, r"safety\.input_loss_stop must be one of immediate, ramp"),
        ({"damping": True}, r"safety\.damping must be a finite number"),
    ],
)
def test_config_validation_names_the_key(change, key):
    kwargs = {"action_low": LOW, "action_high": HIGH, "max_slew_per_s": SLEW, "decel_per_s": DECEL}
    kwargs.update(change)
    with pytest.raises(ConfigError, match=key):
        SafetyConfig(**kwargs)


def test_config_broadcasts_scalars_and_normalises_lists():
    cfg = SafetyConfig(action_low=[-1, -1], action_high=[1, 1], max_slew_per_s=2, decel_per_s=1.5)
    assert cfg.action_low == (-1.0, -1.0)
    assert cfg.max_slew_per_s == (2.0, 2.0) and cfg.decel_per_s == (1.5, 1.5)
    assert cfg.action_dim == 2
    assert cfg.stale_after_s == pytest.approx(0.2)
    hash(cfg)  # frozen and hashable once lists became tuples


def test_apply_does_not_grow_memory_per_tick():
    import tracemalloc

    layer = make("damped")
    actions = [np.array([0.3, -0.2, 0.9], dtype=np.float32), np.array([math.nan, 0.0, 0.0])]

    def run(n, t0):
        for k in range(n):
            now = t0 + k * PERIOD
            layer.apply(
                actions[k % 2], now_s=now, frame_time_s=now, telemetry_time_s=now, fallback=k % 3 == 0
            )

    tracemalloc.start()
    try:
        # Warm up under tracing: enum pseudo-members, numpy caches and the interpreter's
        # per-code frame caches are one-off allocations, not growth.
        run(200, 0.0)
        before = tracemalloc.get_traced_memory()[0]
        run(5000, 1000.0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One object kept per tick would be >= 80 KB here; the allowance covers one-off
    # interpreter allocations (Python 3.10 re-creates a few frame objects).
    assert grown < 16384


def test_telemetry_has_its_own_staleness_limit_when_set():
    # A 50 Hz controller allows a tighter limit than a 10 fps camera (motor.telemetry_stale_after_s).
    layer = make(telemetry_stale_after_s=0.15)
    assert layer.config.telemetry_stale_s == pytest.approx(0.15)
    now = 100.0
    r = layer.apply(np.zeros(3), now_s=now, frame_time_s=now - 0.17, telemetry_time_s=now - 0.17, fallback=False)
    assert r.reasons == SafetyReason.STALE_TELEMETRY | SafetyReason.FALLBACK
    r = layer.apply(np.zeros(3), now_s=now, frame_time_s=now - 0.14, telemetry_time_s=now - 0.14, fallback=False)
    assert r.reasons == SafetyReason.NONE
    assert make().config.telemetry_stale_s == pytest.approx(make().config.stale_after_s)  # unset: the frames'
    with pytest.raises(ConfigError, match=r"motor\.telemetry_stale_after_s"):
        make(telemetry_stale_after_s=0.0)
