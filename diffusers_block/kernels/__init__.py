"""Triton kernels (with plain PyTorch references and CPU fallbacks)."""

from .block_sparse_attention import block_sparse_attention
from .reference import block_mask_from_index, block_sparse_attention_reference, dense_block_index

__all__ = [
    "block_mask_from_index",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_block_index",
]
