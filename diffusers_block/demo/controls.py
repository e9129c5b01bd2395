"""The cache controls every tab shares: one group of widgets per policy, turned into a ``CacheConfig``.

The widgets' values are first gathered into a plain :class:`CacheSettings` (no Gradio in it), so a tab's generate
function can be called and tested without a page. Bad values are reported in the page: ``checks`` and
:meth:`CacheSettings.config` raise ``gr.Error`` with the library's own message (which names the field and the
allowed range), and settings that are valid but save nothing raise a ``gr.Warning``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import gradio as gr

from .. import BWCacheConfig, CacheConfig, StaticScheduleConfig, calibrate_schedule
from ..cache.apply import default_cache_config
from .checks import MAX_REPEATS, MAX_STEPS, number, whole
from .sparse import SparseSettings

POLICIES = {  # label in the page -> CacheSettings.policy
    "BWCache (runtime indicator)": "bwcache",
    "Static schedule": "static",
    "BAC (calibrated schedule)": "bac",
    "No cache (sparse attention alone)": "none",  # offered only where sparse attention is available
}


_LIBRARY_DEFAULT = default_cache_config()  # what enable_block_cache() uses with no config


@dataclass(frozen=True)
class CacheSettings:
    """What the cache controls hold; each policy reads its own fields. Defaults are the library's and README's."""

    policy: str = "bwcache"  # "bwcache" | "static" | "bac" | "none"
    granularity: str = _LIBRARY_DEFAULT.granularity
    forecast: str = _LIBRARY_DEFAULT.forecast
    # BWCacheConfig: enable_block_cache()'s default (docs/defaults.md), read from it rather than copied
    threshold: float = _LIBRARY_DEFAULT.threshold
    max_consecutive_reuse: int = _LIBRARY_DEFAULT.max_consecutive_reuse
    warmup_steps: int = _LIBRARY_DEFAULT.warmup_steps
    cooldown_steps: int = _LIBRARY_DEFAULT.cooldown_steps
    scope: str = _LIBRARY_DEFAULT.scope
    # StaticScheduleConfig rule
    interval: int = 3
    static_warmup_steps: int = 5
    static_cooldown_steps: int = 2
    # BAC calibration
    bac_updates: int = 22
    bac_shared: bool = True

    @property
    def label(self) -> str:
        """The policy's name in the page."""
        return next((label for label, name in POLICIES.items() if name == self.policy), self.policy)

    def config(
        self, steps: int, calibration_run: Callable[[object], object] | None = None
    ) -> CacheConfig | Callable[[object], StaticScheduleConfig] | None:
        """The checked config for a generation of ``steps`` steps (None: no cache). For BAC, a function of the
        pipeline that calibrates the schedule on ``calibration_run(pipe)`` (one uncached generation on other seeds)."""
        if self.policy not in POLICIES.values():
            raise gr.Error(f"Unknown cache policy {self.policy!r}; pick one of {', '.join(POLICIES)}.")
        if self.policy == "none":
            return None
        try:
            if self.policy == "bwcache":
                config = BWCacheConfig(
                    threshold=number(self.threshold, "threshold"),
                    max_consecutive_reuse=whole(self.max_consecutive_reuse, "max consecutive reuse"),
                    warmup_steps=whole(self.warmup_steps, "warm-up steps"),
                    cooldown_steps=whole(self.cooldown_steps, "cool-down steps"),
                    scope=self.scope,
                    granularity=self.granularity,
                    forecast=self.forecast,
                )
                _warn_if_always_computed(config.warmup_steps, config.cooldown_steps, steps)
                if config.threshold == 0 or config.max_consecutive_reuse == 0:
                    gr.Warning("Threshold 0 or max consecutive reuse 0 never reuses a block: nothing is saved.")
                return config
            if self.policy == "static":
                config = StaticScheduleConfig(
                    interval=whole(self.interval, "interval"),
                    warmup_steps=whole(self.static_warmup_steps, "warm-up steps"),
                    cooldown_steps=whole(self.static_cooldown_steps, "cool-down steps"),
                    granularity=self.granularity,
                    forecast=self.forecast,
                )
                _warn_if_always_computed(config.warmup_steps, config.cooldown_steps, steps)
                if config.interval == 1:
                    gr.Warning("Interval 1 computes every block at every step: nothing is saved.")
                return config
            updates = whole(self.bac_updates, "BAC updates")
            if not 1 <= updates <= steps:
                raise gr.Error(
                    f"BAC updates must be in [1, {steps}] (the steps at which each block computes, out of the "
                    f"{steps} steps), got {updates}. Lower the updates or raise the steps."
                )
            if calibration_run is None:
                raise RuntimeError("a BAC schedule needs a calibration run; pass calibration_run=")
            return lambda pipe: self.bac_schedule(pipe, calibration_run)
        except ValueError as error:  # the configs' own checks name the field and the allowed range
            raise gr.Error(str(error)) from error

    def bac_schedule(self, pipe, generate: Callable[[object], object]) -> StaticScheduleConfig:
        """BAC calibration: one uncached ``generate(pipe)``, then the optimal update steps per unit (or shared)."""
        return calibrate_schedule(
            pipe,
            generate,
            int(self.bac_updates),
            shared=bool(self.bac_shared),
            granularity=self.granularity,
            forecast=self.forecast,
        )


def accelerations(
    settings: CacheSettings, sparse: SparseSettings, steps: int, calibration_run: Callable[[object], object]
):
    """The checked (cache config or BAC calibration, sparse-attention config) of a request; one may be None."""
    config = settings.config(steps, calibration_run)
    sparse_config = sparse.config()
    if config is None and sparse_config is None:
        raise gr.Error("Nothing to accelerate: pick a cache policy or turn block-sparse attention on.")
    return config, sparse_config


def repeats_slider() -> gr.Slider:
    return gr.Slider(1, MAX_REPEATS, value=1, step=1, label="timed runs per side (fastest kept)")


def _warn_if_always_computed(warmup: int, cooldown: int, steps: int) -> None:
    if warmup + cooldown >= steps:
        gr.Warning(
            f"Warm-up ({warmup}) + cool-down ({cooldown}) steps cover all {steps} steps: every block is computed "
            f"at every step, so nothing is saved."
        )


def describe(config: CacheConfig) -> str:
    """One line for the page: the config as a user would write it (BAC schedules summarised, not listed)."""
    if isinstance(config, StaticScheduleConfig) and config.update_steps:
        schedules = {tuple(steps) for steps in config.update_steps.values()}
        counts = sorted({len(steps) for steps in schedules})
        shared = (
            f"one schedule for all units, steps {list(next(iter(schedules)))}"
            if len(schedules) == 1
            else (f"{len(schedules)} distinct per-unit schedules")
        )
        return (
            f"BAC StaticScheduleConfig(update_steps=<{len(config.update_steps)} units, {'/'.join(map(str, counts))} "
            f"updates each: {shared}>, granularity={config.granularity!r}, forecast={config.forecast!r})"
        )
    values = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config) if f.name != "update_steps")
    return f"{type(config).__name__}({values})"


class CacheControls:
    """The widgets for every cache policy; only the chosen policy's group is visible."""

    def __init__(self, prefix: str, allow_none: bool = False) -> None:
        """``allow_none`` offers "no cache", for when another acceleration (sparse attention) can run alone."""
        defaults = CacheSettings()
        label = next(k for k, v in POLICIES.items() if v == defaults.policy)
        choices = [k for k, v in POLICIES.items() if v != "none" or allow_none]
        self.policy = gr.Radio(choices, value=label, label="Cache policy", elem_id=f"{prefix}-policy")
        with gr.Group(visible=True) as self.bwcache_group:
            with gr.Row():
                self.threshold = gr.Slider(
                    0.0, 1.0, value=defaults.threshold, step=0.01, label="threshold (predicted relative L1 change)"
                )
                self.max_consecutive_reuse = gr.Slider(
                    0, 20, value=defaults.max_consecutive_reuse, step=1, label="max consecutive reuse"
                )
            with gr.Row():
                self.warmup_steps = gr.Slider(0, 50, value=defaults.warmup_steps, step=1, label="warm-up steps")
                self.cooldown_steps = gr.Slider(0, 50, value=defaults.cooldown_steps, step=1, label="cool-down steps")
                self.scope = gr.Radio(["block", "model"], value=defaults.scope, label="scope (who decides)")
        with gr.Group(visible=False) as self.static_group:
            with gr.Row():
                self.interval = gr.Slider(
                    1, 10, value=defaults.interval, step=1, label="compute every N steps", elem_id=f"{prefix}-interval"
                )
                self.static_warmup_steps = gr.Slider(
                    0, 50, value=defaults.static_warmup_steps, step=1, label="warm-up steps"
                )
                self.static_cooldown_steps = gr.Slider(
                    0, 50, value=defaults.static_cooldown_steps, step=1, label="cool-down steps"
                )
        with gr.Group(visible=False) as self.bac_group:
            with gr.Row():
                self.bac_updates = gr.Slider(
                    1,
                    MAX_STEPS,
                    value=defaults.bac_updates,
                    step=1,
                    label="BAC updates (steps at which each unit computes)",
                )
                self.bac_shared = gr.Checkbox(value=defaults.bac_shared, label="shared: one schedule for all units")
        with gr.Row() as self.common_row:
            self.granularity = gr.Radio(
                ["block", "sub_block"],
                value=defaults.granularity,
                label="granularity (whole blocks, or attention / FFN on their own)",
            )
            self.forecast = gr.Radio(
                ["none", "taylor1"], value=defaults.forecast, label="forecast (reuse as is, or extrapolate linearly)"
            )
        groups = [self.bwcache_group, self.static_group, self.bac_group, self.common_row]
        self.policy.change(
            lambda label: (
                [gr.update(visible=POLICIES[label] == name) for name in ("bwcache", "static", "bac")]
                + [gr.update(visible=POLICIES[label] != "none")]
            ),
            inputs=self.policy,
            outputs=groups,
        )

    @property
    def components(self) -> set:
        return {getattr(self, f.name) for f in fields(CacheSettings)}

    def settings(self, values: dict) -> CacheSettings:
        """CacheSettings from the event's ``{component: value}`` dict."""
        kwargs = {f.name: values[getattr(self, f.name)] for f in fields(CacheSettings)}
        kwargs["policy"] = POLICIES.get(kwargs["policy"], kwargs["policy"])
        return CacheSettings(**kwargs)
