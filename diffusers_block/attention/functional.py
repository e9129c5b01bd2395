"""One sparse self-attention call: reorder, select (or reuse) the block lists, run the kernel, restore the order.

This is where the kernels meet the model: everything here takes (B, H, S, D) tensors as SDPA does and knows
nothing of diffusers. The hook in :mod:`.hooks` decides when to call it.

Memory passes per call, besides the attention kernel: one gather each of q, k and v into the tile order (which
also applies a rotary embedding the hook took over from the processor, and sums k per block for the selection),
and none for the way back: the kernel stores each output row at its original token position, straight into a
(B, S, H, D) buffer, which processors flatten to (B, S, H * D) without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels import block_sparse_attention, gather_tokens, select_blocks, skipped_block_lists
from ..kernels.block_sparse_attention_hopper import mean_list_width
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
    #: approximation="cached": the skipped blocks' share of the softmax mass (B, H, S) fp32 and their normalised
    #: output (B, H, S, D), both in the original token order, from the step the lists were selected.
    skipped: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _density: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _mean_width: float | None = field(default=None, repr=False, compare=False)

    def density(self) -> torch.Tensor:
        """Kept fraction of key blocks per head, (H,) fp32 on the device (no host sync); computed once, since a
        selection is reused for several steps."""
        if self._density is None:
            self._density = self.count.float().mean(dim=(0, 2)) / self.num_kv_blocks
        return self._density

    def mean_width(self) -> float:
        """Mean listed key blocks per query block, on the host: the kernel launcher routes by it. Read once per
        selection (one device sync), and only where the route depends on it (the launcher calls this lazily)."""
        if self._mean_width is None:
            self._mean_width = mean_list_width(self.count, self.index.shape[-1])
        return self._mean_width


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
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        rotary: (cos, sin) tables, (S, D) or (1, S, 1, D) in the original token order, still to be applied to q and
            k (diffusers' Wan convention, see :func:`~diffusers_block.kernels.rotate_interleaved`); None if q and k
            are rotated already.

    Returns:
        ``(out, selection)``: out (B, H, S, D) in the original token order (a transposed view of a contiguous
        (B, S, H, D) buffer); the selection used.

    With ``config.approximation == "cached"`` a new selection also runs the kernel on its complement and merges the
    two results by their log-sum-exp (exact attention); the complement's output and its share of the softmax mass
    stay on the selection, and calls that reuse it blend them with the listed blocks' output:
    ``(1 - share) * out_listed + share * out_skipped``.
    """
    batch, heads, seq, head_dim = q.shape
    image = seq - text
    bs = config.block_size
    perm = None
    if config.reorder or (text and text_first):
        perm, _ = token_permutation(
            grid if config.reorder else None, config.tile, image, text, text_first=text_first, device=q.device
        )
    shape = (tuple(q.shape), seq if key_length is None or key_length >= seq else key_length)
    select = selection is None or selection.shape != shape
    query_sums = key_sums = None
    if perm is not None or rotary is not None:
        # One pass each: reorder (and rotate) into contiguous (B, H, S, D), q's and k's block sums on the way if
        # selecting: the selection then reads neither q nor k.
        pool = select and config.scoring == "mean"
        if pool:
            q, query_sums = gather_tokens(q, perm, rotary=rotary, block_size=bs)
        else:
            q = gather_tokens(q, perm, rotary=rotary)
        if pool and shape[1] == seq:  # with padding keys the selection pools the kept keys itself
            k, key_sums = gather_tokens(k, perm, rotary=rotary, block_size=bs)
        else:
            k = gather_tokens(k, perm, rotary=rotary)
        v = gather_tokens(v, perm)
    if shape[1] < seq:
        k, v = k[:, :, : shape[1]], v[:, :, : shape[1]]
    if select:
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
            scoring=config.scoring,
            stride=config.stride,
            query_sums=query_sums,
            key_sums=key_sums,
        )
        selection = Selection(index, count, math.ceil(k.shape[2] / bs), step, shape)

    def attend(index: torch.Tensor, count: torch.Tensor, list_width, approximation: str | None = None):
        out = torch.empty((batch, seq, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
        _, lse = block_sparse_attention(
            q,
            k,
            v,
            index,
            count,
            block_size=bs,
            scale=scale,
            approximation=approximation,
            out=out,
            out_rows=perm,
            return_lse=True,
            list_width=list_width,
        )
        return out, lse

    if config.approximation != "cached":
        return attend(selection.index, selection.count, selection.mean_width, config.approximation)[0], selection
    out, lse = attend(selection.index, selection.count, selection.mean_width)
    if select:
        # The complement of the lists: both results together are dense attention; keep the skipped part for reuse.
        skipped_out, skipped_lse = attend(
            *skipped_block_lists(selection.index, selection.count, selection.num_kv_blocks),
            lambda: selection.num_kv_blocks - selection.mean_width(),
        )
        share = torch.nan_to_num(torch.sigmoid(skipped_lse - lse))  # in the kernel's (permuted) order
        if perm is not None:
            share = torch.empty_like(share).index_copy_(-1, perm, share)
        selection.skipped = (share, skipped_out)
    share, skipped_out = selection.skipped
    return torch.lerp(out, skipped_out, share[..., None].to(out.dtype)), selection
