"""Where a generation is: the denoising step, the classifier-free-guidance branch, the input shapes.

Caches are only correct if every call of the transformer knows which step of which generation it belongs to
and which CFG branch it serves. Pipelines tell us in three different ways, used in this order:

1. diffusers' ``transformer.cache_context(name, step_index=..., num_inference_steps=...)`` (Wan, Flux,
   HunyuanVideo, LTX, Mochi, CogVideoX pipelines): the branch is the context name;
2. the pipeline's scheduler (every pipeline, including DiT, PixArt, SD3 and Allegro which set no context):
   ``set_timesteps`` starts a generation and ``step`` ends a denoising step; the n-th transformer call inside a
   step is branch n;
3. neither (a bare transformer in a hand-written loop): every call is one step of branch 0, and a change of
   input shape starts a new generation (:func:`cache_context` gives such a loop steps and branch names).

All of it runs outside the transformer's forward except the per-call branch counter, so a compiled transformer
sees no per-step Python values (see :meth:`GenerationTracker.on_step_start`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context

TRACKER_HOOK = "diffusers_block.generation_tracker"


class ShapeChangedError(ValueError):
    """The transformer's input shape changed in the middle of a generation."""


class GenerationTracker:
    """Step / branch / shape state of one pipeline (shared by its transformers) or of one bare transformer."""

    def __init__(self) -> None:
        self.step = 0
        self.num_steps: int | None = None
        self.branch: Hashable = 0
        self.generation = 0
        self.stepped = False  # True once a scheduler or a cache context drives the step counter
        self._calls_in_step = 0
        self._context_names: list[str] = []  # branch names seen this generation
        self._max_calls = 0  # most context-less calls seen in one step this generation
        self._context_name: str | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._scheduler = None
        self._scheduler_originals: dict[str, Callable] = {}
        self._pipeline_ref: Callable | None = None

    # -- listeners (cache hooks) ------------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(event)`` is called with "generation" when a generation starts, "step" at every step and
        "forward" at the start of every transformer call."""
        self._listeners.append(listener)

    def _notify(self, event: str) -> None:
        for listener in self._listeners:
            listener(event)

    # -- events -----------------------------------------------------------------------------------------------
    def on_generation_start(self, num_steps: int | None = None) -> None:
        self.step = 0
        self.num_steps = num_steps
        self.generation += 1
        self._calls_in_step = 0
        self._context_names = []
        self._max_calls = 0
        self._notify("generation")
        self._notify("step")

    def on_step_start(self, step: int) -> None:
        """Called between transformer calls; cache policies with a fixed schedule plan the step here."""
        self._max_calls = max(self._max_calls, self._calls_in_step)
        self.step = step
        self._calls_in_step = 0
        self._notify("step")

    def on_context(self, context) -> None:
        """A diffusers CacheContext was set (or cleared, with None) on the transformer."""
        if context is None:
            self._context_name = None
            return
        self._context_name = context.name
        if context.name not in self._context_names:
            self._context_names.append(context.name)
        step_index = getattr(context, "step_index", None)
        if step_index is None:
            return
        self.stepped = True
        num_steps = getattr(context, "num_inference_steps", None)
        if self.generation == 0 or step_index < self.step:
            self.on_generation_start(num_steps)
            if step_index > 0:
                self.on_step_start(step_index)
        elif step_index > self.step:
            self.on_step_start(step_index)
        if num_steps is not None:
            self.num_steps = num_steps

    def on_forward(self) -> None:
        """Called at the start of every transformer forward, possibly inside a compiled graph: picks the branch.

        Everything it reads is constant across the calls of a generation but for the call counter (context-less
        pipelines only), so a compiled transformer is specialised on the branch and nothing else.
        """
        pipeline = self._pipeline_ref() if self._pipeline_ref is not None else None
        if pipeline is not None and getattr(pipeline, "scheduler", None) is not self._scheduler:
            # The user swapped the scheduler after enabling the cache: follow it, and treat this as a new call.
            self.attach_scheduler(pipeline.scheduler)
            self.on_generation_start(None)
        if not self.stepped:
            if self.generation == 0:
                self.on_generation_start(None)
            elif self._calls_in_step > 0:
                self.on_step_start(self.step + 1)
        if self._context_name is not None:
            self.branch = self._context_name
        else:
            self.branch = self._calls_in_step
            self._calls_in_step += 1
        self._notify("forward")

    def on_shape_change(self, previous: tuple, shape: tuple) -> None:
        """A cache unit saw its input change shape: an error inside a generation, a new one in a bare loop.

        The call that saw the change has already been counted (its step and branch picked in :meth:`on_forward`),
        so the new generation starts with that call as its first one: without this, the next call of a bare loop
        would be counted as step 0 again.
        """
        if self.stepped and self.step > 0:
            raise ShapeChangedError(
                f"The transformer input changed shape from {_describe(previous)} to {_describe(shape)} at step "
                f"{self.step} of a "
                f"generation (batch size, resolution, frame count and text length must stay fixed within one "
                f"generation). Start a new generation with a new pipeline call, or call "
                f"diffusers_block.reset_block_cache()."
            )
        calls, context = self._calls_in_step, self._context_name
        self.on_generation_start(self.num_steps)
        self._calls_in_step = calls
        if context is not None:
            self._context_names.append(context)

    @property
    def branches_seen(self) -> list[Hashable]:
        if self._context_names:
            return list(self._context_names)
        return list(range(max(self._max_calls, self._calls_in_step)))

    # -- scheduler hooks ----------------------------------------------------------------------------------------
    def attach_pipeline(self, pipeline) -> None:
        self._pipeline_ref = weakref.ref(pipeline)
        self.attach_scheduler(getattr(pipeline, "scheduler", None))

    def attach_scheduler(self, scheduler) -> None:
        """Wrap this scheduler instance's ``set_timesteps`` and ``step`` (instance attributes, not the class)."""
        self.detach_scheduler()
        if scheduler is None or not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
            return
        tracker = self
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(set_timesteps)  # pipelines inspect its signature (e.g. for `sigmas`)
        def tracked_set_timesteps(*args, **kwargs):
            result = set_timesteps(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            tracker.stepped = True
            tracker.on_generation_start(len(timesteps) if timesteps is not None else None)
            return result

        @functools.wraps(step)
        def tracked_step(*args, **kwargs):
            result = step(*args, **kwargs)
            tracker.on_step_start(tracker.step + 1)
            return result

        self._scheduler = scheduler
        self._scheduler_originals = {"set_timesteps": set_timesteps, "step": step}
        scheduler.set_timesteps = tracked_set_timesteps
        scheduler.step = tracked_step

    def detach_scheduler(self) -> None:
        if self._scheduler is not None:
            for name in self._scheduler_originals:
                self._scheduler.__dict__.pop(name, None)
        self._scheduler = None
        self._scheduler_originals = {}


def _describe(shape: tuple) -> str:
    """A cache unit's input shapes (one per stream, see ``cache.units.stream_shapes``) as words."""
    if shape and all(isinstance(s, tuple) for s in shape):
        names = ("hidden_states", "encoder_hidden_states")
        return ", ".join(f"{name} {s}" for name, s in zip(names, shape))
    return str(shape)


class _ContextListener(StateManager):
    """Receives diffusers' cache context: ``_set_cache_context`` calls ``set_context`` on StateManager attributes."""

    def __init__(self, tracker: GenerationTracker) -> None:
        super().__init__(dict)
        self._tracker = tracker

    def set_context(self, context) -> None:
        super().set_context(context)
        self._tracker.on_context(context)


class GenerationTrackerHook(ModelHook):
    """Sits on the transformer itself: tells the tracker a forward began, before any block runs."""

    _is_stateful = True

    def __init__(self, tracker: GenerationTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.context_listener = _ContextListener(tracker)

    def pre_forward(self, module, *args, **kwargs):
        self.tracker.on_forward()
        return args, kwargs

    def reset_state(self, module):
        return module


def check_not_enabled_elsewhere(
    model: torch.nn.Module, hook_name: str, feature: str, enable: str, disable: str
) -> None:
    """Refuse to enable ``feature`` on ``model`` when it is already on through another owner (its pipeline, or
    the transformer itself when enabling on the pipeline), whose tracker hook ``hook_name`` is there.

    Enabling on the same object again replaces the configuration, but a transformer enabled through its pipeline
    has no record of it on itself, so diffusers' registry would fail with "Hook ... already exists", which says
    neither who has it nor what to do.
    """
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(hook_name) if registry is not None else None
    if hook is None:
        return
    ref = getattr(getattr(hook, "tracker", None), "_pipeline_ref", None)
    pipeline = ref() if ref is not None else None
    name = type(model).__name__
    if pipeline is not None:
        raise RuntimeError(
            f"{type(pipeline).__name__} already has {feature} enabled on this {name}. To change its configuration "
            f"call pipe.{enable}(config) on the pipeline again (it replaces the previous one); to enable it on the "
            f"transformer alone, call pipe.{disable}() first."
        )
    raise RuntimeError(
        f"This {name} already has {feature} enabled on the transformer itself. Call "
        f"diffusers_block.{disable}(transformer) first, then enable it on the pipeline (or keep it on the "
        f"transformer: that works inside the pipeline too)."
    )


def attach_tracker(model: torch.nn.Module, tracker: GenerationTracker) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(GenerationTrackerHook(tracker), TRACKER_HOOK)


@contextmanager
def cache_context(
    model: torch.nn.Module, name: str, *, step_index: int | None = None, num_inference_steps: int | None = None
):
    """``model.cache_context(...)`` for any transformer, including those without diffusers' CacheMixin (DiT, PixArt).

    Wrap each call of a hand-written denoising loop in it to give the cache its branch name and step::

        with diffusers_block.cache_context(transformer, "cond", step_index=i, num_inference_steps=n):
            noise_pred = transformer(...)
    """
    _set_cache_context(model, CacheContext(name, step_index=step_index, num_inference_steps=num_inference_steps))
    try:
        yield
    finally:
        _set_cache_context(model, None)
