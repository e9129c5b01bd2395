"""The one hook of block caching: on each call, ask the policy "compute or reuse?" and do it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import ModelHook

from .forecast import reused_tensors
from .slot import CacheSlot, relative_l1_of, relative_l1_parts

if TYPE_CHECKING:
    from .block_cache import BlockCache

CACHE_HOOK = "diffusers_block.block_cache"


class BlockCacheHook(ModelHook):
    """Attached to one block or sub-block; keeps one CacheSlot per CFG branch."""

    _is_stateful = True

    def __init__(self, cache: BlockCache, index: int, unit) -> None:
        super().__init__()
        self.cache = cache
        self.index = index
        self.unit = unit
        self.slots: dict[Hashable, CacheSlot] = {}  # keyed by (CFG branch, call of this unit in the forward)
        self.planned_compute = True  # set between calls by planned policies
        self.calls_this_forward = 0  # a module may run several times per forward (CogView4's ff: image, then text)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        cache, tracker, policy = self.cache, self.cache.tracker, self.cache.policy
        # Planned policies without forecasting never read the step here, so a compiled transformer is not
        # specialised on it (the plan arrives as `planned_compute`, set between calls).
        step = tracker.step if cache.reads_step else -1
        shape = self.unit.input_shapes(args, kwargs)
        key = (tracker.branch, self.calls_this_forward)
        self.calls_this_forward += 1
        slot = self.slots.get(key)
        if slot is not None and not slot.matches(shape) and slot.input_shape is not None:
            tracker.on_shape_change(slot.input_shape, shape)  # raises, or starts a generation (clearing slots)
            slot = None
        if slot is None:
            slot = self.slots[key] = CacheSlot()
        elif slot.matches(shape):
            if policy.planned:
                compute = self.planned_compute
            else:
                compute = policy.should_compute(self.index, slot, step, tracker.num_steps)
            if not compute:
                if not policy.planned:  # only runtime policies cap consecutive reuses; keep ints out of graphs
                    slot.reuses += 1
                cache.record(self.index, computed=False)
                return self.unit.rebuild(args, kwargs, reused_tensors(slot, step, cache.config.forecast))

        output = self.fn_ref.original_forward(*args, **kwargs)
        tensors = self.unit.extract(args, kwargs, output)
        parts = indicator = None
        if policy.wants_indicator and slot.matches(shape):
            parts = relative_l1_parts(self.unit.primary(tensors), self.unit.primary(slot.current))
            indicator = relative_l1_of(parts)  # this rank's own, for the summary
        slot.store(tensors, step, shape, keep_previous=cache.config.forecast != "none")
        slot.indicator = parts
        policy.observe(self.index, slot, step, self.unit.primary(tensors))
        cache.record(self.index, computed=True, indicator=indicator)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End of a pipeline call (diffusers' maybe_free_model_hooks): free the cached tensors."""
        self.slots.clear()
        return module
