"""BWCache: a per-block runtime indicator (Block-Wise Caching, arXiv 2509.13789).

Each unit measures how much its cached quantity (a block's residual, a sub-block's output) changed between its
two most recent computed steps, as a relative L1 distance per step. It then reuses the cache while that rate,
extrapolated to the current step, stays under ``threshold``: a unit that barely moves is skipped for several
steps, one that moves a lot is recomputed every step. The first and last few steps are always computed, since
features change fastest there (the U-shaped curve of the paper), and ``max_consecutive_reuse`` bounds drift.

The indicator is one fp32 reduction over a tensor the block already produced. Its values are read back to the
host in one batch per transformer call, the first time a decision needs them, not once per block. Under context
parallelism that read is also where the ranks agree: the batch of numerators and denominators is summed over the
ranks in one all-reduce, so every rank decides on the whole sequence's change (see ``diffusers_block.parallel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .. import validation
from ..parallel import sum_over_ranks
from .policy import CacheConfig, CachePolicy
from .slot import CacheSlot, relative_l1_of

SCOPES = ("block", "model")


@dataclass(frozen=True)
class BWCacheConfig(CacheConfig):
    """threshold: largest predicted relative L1 change of a unit's cached tensor at which it is reused
        (0 disables reuse: outputs are identical to no cache).
    max_consecutive_reuse: most steps in a row a unit may be reused before it is recomputed.
    warmup_steps / cooldown_steps: first / last steps of a generation that always compute every unit.
    scope: "block" decides every unit from its own indicator; "model" decides once per transformer call, from the
        first unit's indicator, and every unit follows (all blocks skip together, which keeps their inputs and
        cached residuals consistent with each other).
    """

    threshold: float = 0.1
    max_consecutive_reuse: int = 3
    warmup_steps: int = 2
    cooldown_steps: int = 1
    scope: Literal["block", "model"] = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        validation.check_field(self, "threshold", validation.number, 0.0, 10.0)
        validation.check_field(self, "max_consecutive_reuse", validation.integer, 0, 1000)
        validation.check_field(self, "warmup_steps", validation.integer, 0)
        validation.check_field(self, "cooldown_steps", validation.integer, 0)
        validation.check_field(self, "scope", validation.choice, SCOPES)

    def build(self, unit_names: Sequence[str]) -> BWCachePolicy:
        """The runtime policy for a model whose cache units are ``unit_names`` (called by ``enable_block_cache``)."""
        return BWCachePolicy(self, unit_names)


class BWCachePolicy(CachePolicy):
    planned = False
    wants_indicator = True

    def __init__(self, config: BWCacheConfig, unit_names: Sequence[str]) -> None:
        super().__init__(config, unit_names)
        self._pending: list[CacheSlot] = []
        self._model_decision = True  # scope="model": what the first unit decided in the current call

    def reset(self) -> None:
        self._pending.clear()

    def observe(self, unit: int, slot: CacheSlot, step: int, primary: torch.Tensor) -> None:
        if unit == 0:
            self._model_decision = True  # the first unit computed (decided or forced): so does everyone
        if isinstance(slot.indicator, torch.Tensor):
            self._pending.append(slot)

    def _read_pending(self) -> None:
        """Move every pending indicator to the host with a single synchronisation (and, under context parallelism,
        a single all-reduce before it: every rank holds the same pending units, since they all decided alike)."""
        pending = [slot for slot in self._pending if isinstance(slot.indicator, torch.Tensor)]
        self._pending.clear()
        if pending:
            parts = torch.stack([slot.indicator for slot in pending])
            if self.parallel is not None:
                parts = sum_over_ranks(parts, self.parallel)
            values = relative_l1_of(parts).tolist()
            for slot, value in zip(pending, values):
                slot.indicator = value

    def should_compute(self, unit: int, slot: CacheSlot, step: int, num_steps: int | None) -> bool:
        if self.config.scope == "model" and unit != 0:
            return self._model_decision
        decision = self._decide(slot, step, num_steps)
        if unit == 0:
            self._model_decision = decision
        return decision

    def _decide(self, slot: CacheSlot, step: int, num_steps: int | None) -> bool:
        config: BWCacheConfig = self.config
        if step < config.warmup_steps or slot.reuses >= config.max_consecutive_reuse:
            return True
        if num_steps is not None and step >= num_steps - config.cooldown_steps:
            return True
        if slot.indicator is None or slot.previous_step < 0:
            return True  # no rate yet: needs two computed steps
        if isinstance(slot.indicator, torch.Tensor):
            self._read_pending()
        rate = slot.indicator / (slot.computed_step - slot.previous_step)
        return not rate * (step - slot.computed_step) < config.threshold
