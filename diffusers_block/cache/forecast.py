"""Forecasting a skipped unit's cached tensor instead of reusing it unchanged.

``taylor1`` is the first-order term of TaylorSeer: the tensor moves along the line through its values at the
unit's last two computed steps, so a skipped step at distance k from the last computation returns
``current + (current - previous) * k / (computed_step - previous_step)``.
"""

from __future__ import annotations

from .slot import CacheSlot


def reused_tensors(slot: CacheSlot, step: int, forecast: str) -> tuple:
    if forecast == "none" or slot.previous is None or slot.previous_step < 0:
        return slot.current
    scale = (step - slot.computed_step) / (slot.computed_step - slot.previous_step)
    return tuple(
        None if cur is None or prev is None else cur + (cur - prev) * scale
        for cur, prev in zip(slot.current, slot.previous)
    )
