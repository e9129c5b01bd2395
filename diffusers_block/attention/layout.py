"""Token order for block-sparse attention: video tokens in local 3D tiles, text tokens last.

Transformers lay video tokens out frame by frame, row by row, so a block of 128 consecutive tokens is a thin
strip of one row. Blocks are only worth selecting if their tokens are near each other in space and time, which
is what the mean-pooled block score assumes. :func:`token_permutation` sorts image tokens by (tile, position in
tile) for tiles of (frames, rows, cols) (partial tiles at the edges stay together), then appends the text tokens
of joint attention in their original order. The attention runs on ``x[..., perm, :]`` (one fused gather pass per
tensor, :func:`~diffusers_block.kernels.gather_tokens`) and its output goes back by the kernel storing row ``i`` at
token ``perm[i]`` (no pass of its own); ``inverse`` is there for callers that undo it themselves. Cached per shape.

:func:`token_grid` reads the (frames, rows, cols) grid of image tokens from the transformer's input, per family.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["token_grid", "token_permutation"]


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[-2]), int(value[-1])
    return int(value), int(value)


def token_grid(family: str, config, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of the image tokens of one transformer call, or None where it is not known.

    ``config`` is the transformer's diffusers config; ``args``/``kwargs`` its forward arguments.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        return None
    get = functools.partial(getattr, config)
    if family in ("wan",):
        pt, ph, pw = get("patch_size")
        _, _, f, h, w = hidden.shape
        return f // pt, h // ph, w // pw
    if family in ("hunyuanvideo", "allegro", "mochi"):
        ph, pw = _pair(get("patch_size"))
        pt = getattr(config, "patch_size_t", None) or 1
        _, _, f, h, w = hidden.shape
        return f // pt, h // ph, w // pw
    if family == "cogvideox":
        ph, pw = _pair(get("patch_size"))
        pt = getattr(config, "patch_size_t", None) or 1
        _, f, _, h, w = hidden.shape
        return f // pt, h // ph, w // pw
    if family == "ltx":
        dims = [kwargs.get(name) for name in ("num_frames", "height", "width")]
        if any(not isinstance(d, int) for d in dims):
            return None
        pt = getattr(config, "patch_size_t", None) or 1
        ph, pw = _pair(getattr(config, "patch_size", 1) or 1)
        return dims[0] // pt, dims[1] // ph, dims[2] // pw
    if family in ("dit", "pixart", "sd3"):
        ph, pw = _pair(get("patch_size"))
        if hidden.dim() != 4:
            return None
        _, _, h, w = hidden.shape
        return 1, h // ph, w // pw
    return None  # flux (packed tokens; the grid would need img_ids on the host), generic families


@functools.lru_cache(maxsize=64)
def _permutation_cpu(
    grid: tuple[int, int, int] | None, tile: tuple[int, int, int], image: int, text: int, text_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    image_order = torch.arange(image)
    if grid is not None and grid[0] * grid[1] * grid[2] == image and tile != (1, 1, 1):
        f, h, w = grid
        tf, th, tw = (min(t, n) for t, n in zip(tile, grid))
        ff, hh, ww = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
        tiles_h, tiles_w = -(-h // th), -(-w // tw)
        tile_id = ((ff // tf) * tiles_h + hh // th) * tiles_w + ww // tw
        within = ((ff % tf) * th + hh % th) * tw + ww % tw
        image_order = torch.argsort((tile_id * (tf * th * tw) + within).flatten(), stable=True)
    text_order = torch.arange(text) + (0 if text_first else image)
    image_order = image_order + (text if text_first else 0)
    perm = torch.cat([image_order, text_order])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return perm, inverse


_device_cache: dict = {}


def token_permutation(
    grid: tuple[int, int, int] | None,
    tile: tuple[int, int, int],
    image: int,
    text: int,
    *,
    text_first: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` int64 on ``device``: image tokens in tile order (raster order if ``grid`` is None or does
    not match ``image``), then the ``text`` tokens, which sit before (``text_first``) or after the image tokens in
    the original sequence. ``x[..., perm, :]`` reorders, ``y[..., inverse, :]`` restores."""
    key = (grid, tuple(tile), image, text, text_first, str(device))
    cached = _device_cache.get(key)
    if cached is None:
        perm, inverse = _permutation_cpu(grid, tuple(tile), image, text, text_first)
        cached = (perm.to(device), inverse.to(device))
        if len(_device_cache) > 64:
            _device_cache.clear()
        _device_cache[key] = cached
    return cached
