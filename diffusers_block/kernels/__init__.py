"""Triton kernels (with plain PyTorch references and CPU fallbacks)."""

from .block_selection import select_blocks
from .block_sparse_attention import block_sparse_attention, kept_block_mask, skipped_block_lists
from .reference import (
    antidiagonal_block_mass,
    block_mask_from_index,
    block_means,
    block_sparse_attention_reference,
    block_statistics,
    block_sums_reference,
    dense_block_index,
    gather_tokens_reference,
    pooled_block_mass,
    rotate_interleaved,
    select_blocks_reference,
)
from .token_gather import block_sums, gather_tokens

__all__ = [
    "antidiagonal_block_mass",
    "block_mask_from_index",
    "block_means",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_statistics",
    "block_sums",
    "block_sums_reference",
    "dense_block_index",
    "gather_tokens",
    "gather_tokens_reference",
    "kept_block_mask",
    "pooled_block_mass",
    "rotate_interleaved",
    "select_blocks",
    "select_blocks_reference",
    "skipped_block_lists",
]
