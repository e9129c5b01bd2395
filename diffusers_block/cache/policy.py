"""What every cache policy shares: the config fields common to all policies and the decision interface.

A policy decides, a hook executes. Policies never touch a model: they see unit indices, step numbers and the
cache slot's bookkeeping, so they are unit-testable without one. A *planned* policy (a fixed schedule) decides
every unit for a whole step before the transformer runs, which keeps host synchronisation and per-step Python
values out of the forward; a *runtime* policy decides each unit when it is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .. import validation

if TYPE_CHECKING:
    from .slot import CacheSlot

Granularity = Literal["block", "sub_block"]
Forecast = Literal["none", "taylor1"]
GRANULARITIES = ("block", "sub_block")
FORECASTS = ("none", "taylor1")


@dataclass(frozen=True)
class CacheConfig:
    """Fields every policy has.

    granularity: cache whole blocks ("block") or each block's attention / cross-attention / FFN branch on its
        own ("sub_block").
    forecast: what a reused unit returns. "none" reuses the last computed residual as is; "taylor1"
        extrapolates it linearly from the last two computed steps (first-order TaylorSeer), at the cost of
        keeping two residuals per unit.
    """

    granularity: Granularity = "block"
    forecast: Forecast = "none"

    def __post_init__(self) -> None:
        validation.check_field(self, "granularity", validation.choice, GRANULARITIES)
        validation.check_field(self, "forecast", validation.choice, FORECASTS)

    def build(self, unit_names: Sequence[str]) -> CachePolicy:
        """The runtime policy for a model whose cache units are ``unit_names`` (called by ``enable_block_cache``)."""
        raise NotImplementedError


class CachePolicy:
    """Runtime side of a config, built once per enabled model with the names of its cache units."""

    planned: bool = False  # decisions made per step by plan(), not per call by should_compute()
    wants_indicator: bool = False  # the hook measures each computed unit's relative change for observe()
    needs_step: bool = True  # False keeps the step out of the hook, so compiled graphs are not specialised on it
    #: Under context parallelism, the rank's place in the ranks that hold chunks of the same sequence and must decide
    #: alike (``parallel.ContextParallelLayout``); set by the block cache before each transformer call.
    parallel = None

    def __init__(self, config: CacheConfig, unit_names: Sequence[str]) -> None:
        self.config = config
        self.unit_names = tuple(unit_names)

    def plan(self, unit: int, step: int, num_steps: int | None) -> bool:
        """Planned policies: whether ``unit`` computes at ``step``. Called between transformer calls."""
        raise NotImplementedError

    def should_compute(self, unit: int, slot: CacheSlot, step: int, num_steps: int | None) -> bool:
        """Runtime policies: whether ``unit`` computes now; ``slot`` holds its cached state for this branch."""
        raise NotImplementedError

    def observe(self, unit: int, slot: CacheSlot, step: int, primary: torch.Tensor) -> None:
        """Called after ``unit`` computed at ``step``; ``primary`` is what it cached for the hidden stream."""

    def reset(self) -> None:
        """A new generation starts."""
