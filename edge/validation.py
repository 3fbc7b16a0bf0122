"""Checks for config dataclasses: each names the key it checks (``section.key``) and what is allowed.

Every config of the runtime (the YAML sections in edge.service.config and the configs beside their
components) validates its fields in ``__post_init__`` with these functions, so a bad value reads the
same wherever it is caught:

    loop.rate_hz must be a number in [1.0, 200.0] Hz, got 500
    camera.fps must be a number in (0, 1000] frames/s or null, got 0
    policy.target must be one of 'cpu', 'cpu-fp32', 'tensorrt', 'fp16', got 'gpu'

A check returns the value normalised (an ``int``, a ``float``, a tuple for a YAML list), so a frozen
dataclass can store what it checked. Each raises ``ConfigError`` unless the caller names another
``error`` (the engine key raises ValueError, which its loader turns into a BundleError).

Shared by every layer, like edge.errors: imports nothing else from edge.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from edge.errors import ConfigError

T = TypeVar("T")
ErrorType = type[Exception]


def check_range(key: str, value: Any, low: float = -math.inf, high: float = math.inf, *, unit: str = "",
                integer: bool = False, low_open: bool = False, nullable: bool = False, dotted: bool = False,
                hint: str = "", error: ErrorType = ConfigError) -> Any:
    """A finite number (an integer with ``integer``) within ``[low, high]`` (``(low, high]`` with
    ``low_open``); ``None`` passes with ``nullable``. Returns it as an int or a float.

    One message covers a wrong type and a value out of range, e.g. ``loop.record_ticks must be an
    integer in [10, 1000000], got 5``; ``dotted`` writes the range ``1..99`` instead of ``[1, 99]``.
    """
    if value is None and nullable:
        return None
    kind = numbers.Integral if integer else numbers.Real
    # An int is always finite (and math.isfinite cannot take one beyond a float's range).
    finite = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and math.isfinite(value))
    if isinstance(value, bool) or not isinstance(value, kind) or not finite or not _within(value, low, high, low_open):
        what = "an integer" if integer else "a number"
        raise error(f"{key} must be {what}{_span(low, high, low_open, dotted)}{_unit(unit)}"
                    f"{' or null' if nullable else ''}, got {value!r}{_hint(hint)}")
    return int(value) if integer else float(value)


def check_number(key: str, value: Any, *, finite: bool = True, error: ErrorType = ConfigError) -> float:
    """A real number (not a bool), finite unless ``finite=False``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (finite and not math.isfinite(value)):
        raise error(f"{key} must be a {'finite ' if finite else ''}number, got {value!r}")
    return float(value)


def check_bound(key: str, number: float, low: float = -math.inf, high: float = math.inf, *, unit: str = "",
                low_open: bool = False, dotted: bool = False, hint: str = "",
                error: ErrorType = ConfigError) -> float:
    """``number`` (already checked to be a number, see check_number) within the bounds: ``x must be > 0``,
    ``x must be within 0..1``. NaN is never within."""
    if not _within(number, low, high, low_open):
        raise error(f"{key} must be{_span(low, high, low_open, dotted)}{_unit(unit)}, got {number!r}{_hint(hint)}")
    return number


def check_choice(key: str, value: Any, choices: Iterable[Any], *, quote: bool = True, hint: str = "",
                 error: ErrorType = ConfigError) -> Any:
    """One of ``choices``: ``x must be one of 'a', 'b', got 'c'`` (``quote=False``: ``one of a, b``)."""
    choices = tuple(choices)
    if value not in choices:
        shown = [repr(c) if quote else str(c) for c in choices]
        allowed = shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)
        raise error(f"{key} must be {allowed}, got {value!r}{_hint(hint)}")
    return value


def check_bool(key: str, value: Any, *, error: ErrorType = ConfigError) -> bool:
    """``true`` or ``false`` (YAML), never 1, 0 or "yes"."""
    if not isinstance(value, bool):
        raise error(f"{key} must be true or false, got {value!r}")
    return value


def check_text(key: str, value: Any, expected: str = "a non-empty string", *, nullable: bool = False,
               error: ErrorType = ConfigError) -> str | None:
    """A string with something besides whitespace; ``expected`` says what it should be."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value.strip():
        raise error(f"{key} must be {expected}, got {value!r}")
    return value


def check_pattern(key: str, value: Any, pattern: re.Pattern[str], expected: str, *,
                  error: ErrorType = ConfigError) -> str:
    """A string that matches ``pattern`` in full; ``expected`` describes it (``64 lowercase hex digits``)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise error(f"{key} must be {expected}, got {value!r}")
    return value


def check_sequence(key: str, value: Any, check_item: Callable[[str, Any], T], *, length: int | None = None,
                   noun: str = "numbers", each: str = "", error: ErrorType = ConfigError) -> tuple[T, ...]:
    """A list (a tuple, a YAML list, a 1-D numpy array) of at least one entry, each passed through
    ``check_item(f"{key}[{i}]", entry)``; exactly ``length`` entries when given. Returns a tuple.

    ``noun`` says what the entries are (``CPU indices``), ``each`` what one entry stands for
    (``one per action dimension``).
    """
    per = f", {each}" if each else ""
    if not _is_list(value):
        raise error(f"{key} must be a list of {noun}{per}, got {value!r}")
    items = tuple(check_item(f"{key}[{i}]", item) for i, item in enumerate(value))
    if not items:
        raise error(f"{key} must have at least one entry")
    if length is not None and len(items) != length:
        raise error(f"{key} must have {length} entries{f' ({each})' if each else ''}, got {len(items)}")
    return items


def check_backoff(key: str, value: Any, longest_allowed_s: float = 60) -> tuple[float, float]:
    """A reconnect backoff ``[first_s, longest_s]``: both in (0, longest_allowed_s] seconds, first <= longest.

    Returns the pair as a tuple of floats (YAML gives a list).
    """
    if not _is_list(value) or len(value) != 2:
        raise ConfigError(f"{key} must be a pair [first_s, longest_s], got {value!r}")
    first_s, longest_s = check_sequence(
        key, value, lambda k, v: check_range(k, v, 0, longest_allowed_s, unit="s", low_open=True))
    if first_s > longest_s:
        raise ConfigError(f"{key} must be [first_s, longest_s] with first_s <= longest_s, got {list(value)}")
    return first_s, longest_s


def _is_list(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    # numpy arrays are not Sequences; a 1-D one is a list of numbers all the same.
    return isinstance(value, Sequence) or (hasattr(value, "__array__") and getattr(value, "ndim", None) == 1)


def _within(value: float, low: float, high: float, low_open: bool) -> bool:
    return (low < value if low_open else low <= value) and value <= high


def _span(low: float, high: float, low_open: bool, dotted: bool) -> str:
    """The allowed range with a leading space: ' in [1, 8]', ' in (0, 60]', ' > 0', ' within 1..99'."""
    if math.isinf(low) and math.isinf(high):
        return ""
    if math.isinf(high):
        return f" {'>' if low_open else '>='} {low}"
    if math.isinf(low):
        return f" <= {high}"
    if dotted:  # a closed range only
        return f" within {low}..{high}"
    return f" in {'(' if low_open else '['}{low}, {high}]"


def _unit(unit: str) -> str:
    return f" {unit}" if unit else ""


def _hint(hint: str) -> str:
    return f"; {hint}" if hint else ""
