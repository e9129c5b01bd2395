"""Adaptive block-sparse self-attention: selection policy, video token layout, and the hook that calls the kernels."""

from .apply import disable_sparse_attention, enable_sparse_attention, sparse_attention_summary
from .config import SparseAttentionConfig
from .functional import Selection, sparse_self_attention
from .layout import token_grid, token_permutation
from .summary import SparseAttentionSummary

__all__ = [
    "Selection",
    "SparseAttentionConfig",
    "SparseAttentionSummary",
    "disable_sparse_attention",
    "enable_sparse_attention",
    "sparse_attention_summary",
    "sparse_self_attention",
    "token_grid",
    "token_permutation",
]
