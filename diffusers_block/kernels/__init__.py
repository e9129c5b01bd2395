"""Triton kernels (with plain PyTorch references and CPU fallbacks)."""

from .block_selection import select_blocks
from .block_sparse_attention import block_sparse_attention, kept_block_mask
from .reference import (
    block_mask_from_index,
    block_means,
    block_sparse_attention_reference,
    block_statistics,
    dense_block_index,
    select_blocks_reference,
)

__all__ = [
    "block_mask_from_index",
    "block_means",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_statistics",
    "dense_block_index",
    "kept_block_mask",
    "select_blocks",
    "select_blocks_reference",
]
