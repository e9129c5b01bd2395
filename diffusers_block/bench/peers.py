"""The caches users would pick instead of ours, switched on and off the same way as ours, for side-by-side runs.

cache-dit's DBCache runs through ``cache_dit.enable_cache`` when the package is installed (``pip install
"diffusers-block[peers]"``). diffusers' own caches (FirstBlockCache, TaylorSeerCache, MagCache) are applied with their ``apply_*`` functions, so
they also work on transformers without ``CacheMixin`` (SD3, DiT, PixArt), and removed by their hook names. Their
hooks need a cache context, which SD3, DiT, PixArt and Allegro pipelines never set; the quality benchmark wraps each
pipeline call in ``diffusers_block.cache_context(transformer, "cond")`` so that they can run at all there.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io

from diffusers.hooks import HookRegistry

from .._extras import require
from ..cache import CacheConfig, disable_block_cache, enable_block_cache
from ..eval.harness import Acceleration

_DIFFUSERS_HOOKS = (
    "fbc_leader_block_hook",
    "fbc_block_hook",
    "taylorseer_cache",
    "mag_cache_leader_block_hook",
    "mag_cache_block_hook",
)


def _remove_diffusers_hooks(pipe) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    for name in _DIFFUSERS_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _apply(apply, config):
    """diffusers' ``apply_*`` functions, unlike ``enable_cache``, leave the hooked-submodule list stale."""

    def enable(pipe) -> None:
        apply(pipe.transformer, config)
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()

    return enable


def ours(name: str, config: CacheConfig) -> Acceleration:
    return Acceleration(name, lambda pipe: enable_block_cache(pipe, config), disable_block_cache)


def diffusers_cache(name: str, apply, config) -> Acceleration:
    return Acceleration(name, _apply(apply, config), _remove_diffusers_hooks)


def first_block_cache(threshold: float) -> Acceleration:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return diffusers_cache(
        f"diffusers-fbcache-{threshold:g}", apply_first_block_cache, FirstBlockCacheConfig(threshold=threshold)
    )


# diffusers' default TaylorSeer patterns are re.fullmatch'ed against module names ("^blocks.*attn"), so attention
# modules named attn1 / attn2 (Wan) match none of them and TaylorSeerCache silently does nothing. Where the defaults
# hook nothing, name every attention module of the block lists explicitly.
_TAYLORSEER_ATTENTION = (
    r"^(blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.attn\d*"
)


def taylorseer_cache(interval: int, warmup: int) -> Acceleration:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def enable(pipe) -> None:
        config = TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=warmup, max_order=1, taylor_factors_dtype=None
        )
        _apply(apply_taylorseer_cache, config)(pipe)
        if not hooked_modules(pipe.transformer, "taylorseer_cache"):
            config = dataclasses.replace(config, cache_identifiers=[_TAYLORSEER_ATTENTION])
            _apply(apply_taylorseer_cache, config)(pipe)

    return Acceleration(f"diffusers-taylorseer-{interval}", enable, _remove_diffusers_hooks)


def hooked_modules(model, hook_name: str) -> list[str]:
    """Names of the submodules of ``model`` carrying diffusers hook ``hook_name``."""
    return [
        name
        for name, module in model.named_modules()
        if hook_name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
    ]


def calibrate_mag_ratios(pipe, generate, steps: int) -> list[float]:
    """MagCache's own calibration run; diffusers prints the ratios ("copy these values"), so read them from there."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    _apply(apply_mag_cache, MagCacheConfig(calibrate=True, num_inference_steps=steps))(pipe)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            generate(pipe)
    finally:
        _remove_diffusers_hooks(pipe)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lines:
        raise RuntimeError("MagCache calibration printed no ratios; has diffusers changed its calibration output?")
    return [float(x) for x in ast.literal_eval(lines[-1])]


def mag_cache(threshold: float, ratios: list[float], steps: int) -> Acceleration:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    config = MagCacheConfig(threshold=threshold, mag_ratios=ratios, num_inference_steps=steps)
    return diffusers_cache(f"diffusers-magcache-{threshold:g}", apply_mag_cache, config)


def cache_dit_dbcache(threshold: float, warmup: int) -> Acceleration:
    """cache-dit's DBCache (F1B0: the first block always computes and decides for the rest). cache-dit patches the
    pipeline's class while enabled, so run it on one pipeline at a time."""
    cache_dit = require("peers", "cache_dit", "cache-dit's DBCache")

    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=warmup
    )
    return Acceleration(
        f"cache-dit-dbcache-{threshold:g}",
        lambda pipe: cache_dit.enable_cache(pipe, cache_config=config),
        cache_dit.disable_cache,
    )
