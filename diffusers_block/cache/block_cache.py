"""Block caching on one transformer: builds the units from the adapter table, hooks them, keeps the records."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.hooks import HookRegistry

from ..models import UnsupportedModelError, resolve_adapter
from ..parallel import context_parallel, register_inside_context_parallel
from ..state import TRACKER_HOOK, GenerationTracker, attach_tracker
from .hooks import CACHE_HOOK, BlockCacheHook
from .policy import CacheConfig
from .summary import COMPUTED, NOT_RUN, REUSED, BlockCacheSummary
from .units import BlockUnit, SubBlockUnit

#: Shown by dynamo when ``fullgraph=True`` refuses the graph break of a runtime policy's record.
RUNTIME_POLICY_EAGER = (
    "diffusers_block block caching with a runtime policy (BWCache) decides from indicators read on the host and "
    "records each decision outside compiled graphs, so it cannot be part of a fullgraph=True graph. Compile without "
    "fullgraph=True, or use StaticScheduleConfig (a fixed schedule compiles with fullgraph=True)"
)


def _units(model: torch.nn.Module, granularity: str) -> list[tuple[str, torch.nn.Module, object]]:
    adapter = resolve_adapter(model)
    if granularity == "block":
        return [(ref.name, ref.module, BlockUnit(ref.name, ref.module, ref.spec)) for ref in adapter.blocks]
    units = [
        (name, module, SubBlockUnit(name, module)) for ref in adapter.blocks for name, _, module in ref.sub_blocks()
    ]
    if not units:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no known attention/FFN sub-blocks; use granularity='block'."
        )
    return units


class BlockCache:
    """Everything block caching attached to one transformer, and the way to take it off again."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig, tracker: GenerationTracker) -> None:
        if not isinstance(config, CacheConfig):
            raise TypeError(
                f"config must be a diffusers_block cache config (BWCacheConfig, StaticScheduleConfig, ...), "
                f"got {type(config).__name__}"
            )
        units = _units(model, config.granularity)
        self.model = model
        self.config = config
        self.tracker = tracker
        self.unit_names = [name for name, _, _ in units]
        self.policy = config.build(self.unit_names)
        if self.policy.wants_indicator:
            self.policy.parallel = context_parallel(model)
        self.reads_step = self.policy.needs_step or config.forecast != "none"
        self.hooks: list[BlockCacheHook] = []
        self._modules: list[torch.nn.Module] = []
        self._records: list[tuple] = []  # (step, branch, unit, computed, indicator)
        for index, (_, module, unit) in enumerate(units):
            hook = BlockCacheHook(self, index, unit)
            register_inside_context_parallel(module, hook, CACHE_HOOK)  # sees the rank's chunk under CP
            self.hooks.append(hook)
            self._modules.append(module)
        attach_tracker(model, tracker)
        tracker.add_listener(self._on_event)
        # diffusers caches the list of hooked submodules (for cache contexts); we just changed it.
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def _on_event(self, event: str) -> None:
        if event == "generation":
            for hook in self.hooks:
                hook.slots.clear()
            self.policy.reset()
            self._records.clear()
            if self.policy.wants_indicator:  # enable_parallelism may come after the cache
                self.policy.parallel = context_parallel(self.model)
        elif event == "forward":
            for hook in self.hooks:
                hook.calls_this_forward = 0
        elif event == "step" and self.policy.planned:
            step, num_steps = self.tracker.step, self.tracker.num_steps
            for hook in self.hooks:
                hook.planned_compute = self.policy.plan(hook.index, step, num_steps)

    def record(self, unit: int, computed: bool, indicator: torch.Tensor | None = None) -> None:
        if torch.compiler.is_compiling():
            if self.policy.planned:
                return  # nothing to trace: the summary of a compiled run is rebuilt from the plan
            self._record_outside_graph(unit, computed, indicator)
            return
        self._records.append((self.tracker.step, self.tracker.branch, unit, computed, indicator))

    @torch.compiler.disable(reason=RUNTIME_POLICY_EAGER)
    def _record_outside_graph(self, unit: int, computed: bool, indicator: torch.Tensor | None) -> None:
        """A runtime policy's decisions exist only as they are made, so under ``torch.compile`` (without
        ``fullgraph``) they are recorded eagerly, between graphs; a traced append would be lost."""
        self._records.append((self.tracker.step, self.tracker.branch, unit, computed, indicator))

    def summary(self) -> BlockCacheSummary:
        records = self._records
        if not records and self.policy.planned and self.tracker.generation > 0:
            records = self._planned_records()
        branches = list(dict.fromkeys(branch for _, branch, _, _, _ in records))
        steps = 1 + max((step for step, *_ in records), default=-1)
        shape = (len(branches), steps, len(self.unit_names))
        computed = np.full(shape, NOT_RUN, dtype=np.int8)
        indicator = np.full(shape, np.nan)
        measured = []  # (index, 0-dim indicator tensor): read back together, in one transfer
        for step, branch, unit, was_computed, value in records:
            index = (branches.index(branch), step, unit)
            computed[index] = COMPUTED if was_computed else REUSED
            if value is not None:
                measured.append((index, value))
        if measured:
            values = torch.stack([value.float() for _, value in measured]).cpu().tolist()
            for (index, _), value in zip(measured, values):
                indicator[index] = value
        return BlockCacheSummary(list(self.unit_names), branches, computed, indicator)

    def _planned_records(self) -> list[tuple]:
        """Records of a compiled run, which keeps no per-call records: the plan over the steps and branches seen."""
        num_steps = self.tracker.num_steps or self.tracker.step + 1
        return [
            (step, branch, unit, self.policy.plan(unit, step, num_steps), None)
            for step in range(min(num_steps, self.tracker.step + 1))
            for branch in self.tracker.branches_seen
            for unit in range(len(self.unit_names))
        ]

    def remove(self) -> None:
        for module in self._modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(CACHE_HOOK) is not None:
                registry.remove_hook(CACHE_HOOK, recurse=False)
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(TRACKER_HOOK) is not None:
            registry.remove_hook(TRACKER_HOOK, recurse=False)
        for hook in self.hooks:
            hook.slots.clear()
        self.hooks.clear()
        self.policy.reset()  # drops pending indicator reads, which hold cache slots
        self._records.clear()
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
