"""Checks of the values a visitor types, each failing with a ``gr.Error`` that names the field and its range."""

from __future__ import annotations

import math

import gradio as gr

MAX_STEPS = 200
MAX_REPEATS = 5


def number(value, name: str) -> float:
    if value is None or isinstance(value, bool):
        raise gr.Error(f"{name} is missing: enter a number.")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(result):
        raise gr.Error(f"{name} must be a finite number, got {value!r}.")
    return result


def whole(value, name: str) -> int:
    result = number(value, name)
    if result != int(result):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.")
    return int(result)


def check_steps(steps, low: int = 2, high: int = MAX_STEPS) -> int:
    """Steps as an int in [low, high], or a ``gr.Error`` that says so."""
    value = number(steps, "Steps")
    if value != int(value) or not low <= value <= high:
        raise gr.Error(f"Steps must be an integer in [{low}, {high}], got {steps!r}.")
    return int(value)


def check_seed(seed) -> int:
    value = number(seed, "Seed")
    if value != int(value) or not 0 <= value < 2**32:
        raise gr.Error(f"Seed must be an integer in [0, 2^32), got {seed!r}.")
    return int(value)


def check_repeats(repeats) -> int:
    """Timed runs per side as an int in [1, MAX_REPEATS], or a ``gr.Error``."""
    value = number(repeats, "Timed runs per side")
    if value != int(value) or not 1 <= value <= MAX_REPEATS:
        raise gr.Error(f"Timed runs per side must be an integer in [1, {MAX_REPEATS}], got {repeats!r}.")
    return int(value)
