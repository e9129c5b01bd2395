"""One sparse self-attention call: reorder, select (or reuse) the block lists, run the kernel, restore the order.

This is where the kernels meet the model: everything here takes (B, H, S, D) tensors as SDPA does and knows
nothing of diffusers. The hook in :mod:`.hooks` decides when to call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import block_sparse_attention, select_blocks
from .config import SparseAttentionConfig
from .layout import token_permutation

__all__ = ["Selection", "sparse_self_attention"]


@dataclass
class Selection:
    """Block lists of one attention call (permuted token order), and the step they were selected at."""

    index: torch.Tensor  # int32 (B, H, NQ, W)
    count: torch.Tensor  # int32 (B, H, NQ)
    num_kv_blocks: int
    step: int
    shape: tuple  # (q shape, key length) they were selected for

    def density(self) -> torch.Tensor:
        """Kept fraction of key blocks per head, (H,) fp32 on the device (no host sync)."""
        return self.count.float().mean(dim=(0, 2)) / self.num_kv_blocks


def sparse_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    config: SparseAttentionConfig,
    thresholds: torch.Tensor,
    scale: float | None,
    text: int,
    text_first: bool,
    grid: tuple[int, int, int] | None,
    key_length: int | None = None,
    selection: Selection | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, Selection]:
    """Block-sparse ``softmax(q k^T * scale) v`` for self-attention over ``image + text`` tokens.

    Args:
        q, k, v: (B, H, S, D) with the same S (self-attention); ``text`` of the S tokens are text tokens of joint
            attention, at the start (``text_first``) or the end of the sequence.
        thresholds: (H,) fp32 on q's device, the mass each head keeps.
        grid: (frames, rows, cols) of the image tokens for tile reordering (None: raster order).
        key_length: keys past this many (in the reordered sequence: image tokens, then text) are padding and are
            ignored, as a key-padding mask would (text padding sits at the end of the text).
        selection: block lists to reuse (they must come from the same shapes), or None to select anew.

    Returns:
        ``(out, selection)``: out (B, H, S, D) in the original token order; the selection used.
    """
    batch, heads, seq, _ = q.shape
    image = seq - text
    bs = config.block_size
    if config.reorder or (text and text_first):
        perm, inverse = token_permutation(
            grid if config.reorder else None, config.tile, image, text, text_first=text_first, device=q.device
        )
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    else:
        inverse = None
    if key_length is not None and key_length < seq:
        k, v = k[:, :, :key_length], v[:, :, :key_length]
    shape = (tuple(q.shape), k.shape[2])
    if selection is None or selection.shape != shape:
        index, count = select_blocks(
            q,
            k,
            block_size=bs,
            threshold=thresholds,
            min_blocks=config.min_blocks,
            max_blocks=config.max_blocks,
            local_blocks=config.local_blocks,
            forced_keys=(image, k.shape[2]) if text else None,
            dense_queries=(image, seq) if text else None,
            scale=scale,
        )
        selection = Selection(index, count, math.ceil(k.shape[2] / bs), step, shape)
    out = block_sparse_attention(
        q,
        k,
        v,
        selection.index,
        selection.count,
        block_size=bs,
        scale=scale,
        approximation=config.approximation,
    )
    if inverse is not None:
        out = out.index_select(2, inverse)
    return out, selection
