"""Checks for config fields, shared by every config dataclass (cache policies, sparse attention).

Configs are built from Python literals, JSON files, argparse values, numpy arrays and UI widgets, so the same field
arrives as ``0.5``, ``np.float32(0.5)`` or ``"0.5"``. Each check here accepts what means the number it asks for
(numpy scalars included), rejects what only looks like one (strings, and bools, which are ints to Python but never
a step count or a threshold), returns the value as a plain Python type (so that a config saves to JSON and compares
equal however it was built) and raises an error naming the config, the field, what was given and what is allowed.

Errors: :class:`ConfigTypeError` for a value of the wrong type, ``ValueError`` for one out of range. A
ConfigTypeError is also a ValueError, so ``except ValueError`` catches every bad config value, as documented.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence, Set

import numpy as np

__all__ = [
    "ConfigTypeError",
    "boolean",
    "check_field",
    "choice",
    "fail",
    "integer",
    "number",
    "power_of_two",
    "sequence",
]


class ConfigTypeError(TypeError, ValueError):
    """A config field got a value of the wrong type (a TypeError, and a ValueError like every bad config value)."""


def _given(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _fail_type(owner: str, name: str, value, expected: str):
    raise ConfigTypeError(f"{owner}.{name} must be {expected}, got {_given(value)}")


def fail(owner: str, name: str, value, allowed: str):
    """Raise the ValueError of a value of the right type that is not allowed (checks that span fields)."""
    raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    """``>= 1``, ``in [0, 1000]``, ``in (0, 1]``: the allowed range in words."""
    if high is None or high == math.inf:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or (value < high or (not high_open and value == high))


def integer(owner: str, name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (None: unbounded); Python or numpy integers, not bools or floats."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        _fail_type(owner, name, value, "an integer" + (f" {_bounds(low, high)}" if low is not None else ""))
    value = int(value)
    if not _in_range(value, low, high, False, False):
        fail(owner, name, value, f"an integer {_bounds(low, high)}")
    return value


def number(
    owner: str,
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float in the range (closed unless ``low_open`` / ``high_open``); any real Python or numpy
    number, not a bool or a string; NaN is out of every range."""
    allowed = "a number" + (f" {_bounds(low, high, low_open, high_open)}" if low is not None else "")
    if _is_bool(value) or not isinstance(value, numbers.Real):
        _fail_type(owner, name, value, allowed)
    value = float(value)
    if math.isnan(value) or not _in_range(value, low, high, low_open, high_open):
        fail(owner, name, value, allowed)
    return value


def power_of_two(owner: str, name: str, value, allowed: str = "a power of two") -> int:
    """``value`` as an int that is a power of two; ``allowed`` says more in the error (e.g. a GPU minimum)."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        _fail_type(owner, name, value, allowed)
    value = int(value)
    if value < 1 or value & (value - 1):
        fail(owner, name, value, allowed)
    return value


def boolean(owner: str, name: str, value) -> bool:
    """``value`` as a bool: True/False or a numpy bool, not 0/1 or a string (``"False"`` would be true)."""
    if not _is_bool(value):
        _fail_type(owner, name, value, "True or False")
    return bool(value)


def choice(owner: str, name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``."""
    try:
        known = any(value is c or (not _is_bool(value) and value == c) for c in choices)
    except (TypeError, ValueError):  # e.g. an array, whose == is elementwise
        known = False
    if not known:
        fail(owner, name, value, f"one of {', '.join(map(repr, choices))}")
    return value


def sequence(owner: str, name: str, values, check: Callable[[str, str, object], object], expected: str) -> tuple:
    """A list, tuple, set or 1-D array (not a string, a mapping or a lone number) checked item by item with
    ``check(owner, field, item)``, as a tuple; items are named ``name[i]`` in errors."""
    listlike = isinstance(values, (Sequence, Set)) or (isinstance(values, np.ndarray) and values.ndim == 1)
    if isinstance(values, (str, bytes)) or not listlike:
        _fail_type(owner, name, values, expected)
    return tuple(check(owner, f"{name}[{i}]", item) for i, item in enumerate(values))


def check_field(config, name: str, check: Callable, *args, **kwargs) -> None:
    """Check field ``name`` of a frozen dataclass ``config`` with one of the checks above (``check(owner, name,
    value, *args, **kwargs)``) and store the value it returns: the normalised one (a numpy float as a float)."""
    value = check(type(config).__name__, name, getattr(config, name), *args, **kwargs)
    object.__setattr__(config, name, value)
