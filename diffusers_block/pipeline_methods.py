"""``pipe.enable_block_cache()`` and friends on every diffusers pipeline.

The methods are added to ``DiffusionPipeline`` once, at import; they only forward to the functions of
:mod:`diffusers_block.cache`, which attach their hooks to the one pipeline instance they are called on.
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from .attention import (
    SparseAttentionConfig,
    SparseAttentionSummary,
    disable_sparse_attention,
    enable_sparse_attention,
    sparse_attention_summary,
)
from .cache import CacheConfig, block_cache_summary, disable_block_cache, enable_block_cache
from .cache.summary import BlockCacheSummary
from .distill import BlockwiseFlowModel, disable_blockwise_flow, enable_blockwise_flow


def _enable_block_cache(self, config: CacheConfig | None = None):
    """Cache this pipeline's transformer blocks (see diffusers_block.enable_block_cache)."""
    return enable_block_cache(self, config)


def _disable_block_cache(self) -> None:
    """Remove block caching from this pipeline; outputs are exactly the uncached ones again."""
    disable_block_cache(self)


def _block_cache_summary(self) -> BlockCacheSummary:
    """Steps x blocks record of what was computed and reused in the last generation."""
    return block_cache_summary(self)


def _enable_sparse_attention(self, config: SparseAttentionConfig | None = None):
    """Block-sparse self-attention in this pipeline's transformer(s) (see diffusers_block.enable_sparse_attention)."""
    return enable_sparse_attention(self, config)


def _disable_sparse_attention(self) -> None:
    """Remove sparse attention from this pipeline; outputs are exactly the dense ones again."""
    disable_sparse_attention(self)


def _sparse_attention_summary(self) -> SparseAttentionSummary:
    """Density per layer/head/step of the last generation, and its block masks."""
    return sparse_attention_summary(self)


def _enable_blockwise_flow(self, student: BlockwiseFlowModel):
    """Denoise with ``student``'s segment students (see diffusers_block.distill.enable_blockwise_flow)."""
    return enable_blockwise_flow(self, student)


def _disable_blockwise_flow(self) -> None:
    """Denoise with the pipeline's own transformer and scheduler again: exactly the teacher's outputs."""
    disable_blockwise_flow(self)


_METHODS = {
    "enable_block_cache": _enable_block_cache,
    "disable_block_cache": _disable_block_cache,
    "block_cache_summary": _block_cache_summary,
    "enable_sparse_attention": _enable_sparse_attention,
    "disable_sparse_attention": _disable_sparse_attention,
    "sparse_attention_summary": _sparse_attention_summary,
    "enable_blockwise_flow": _enable_blockwise_flow,
    "disable_blockwise_flow": _disable_blockwise_flow,
}


def install_pipeline_methods() -> None:
    for name, method in _METHODS.items():
        existing = getattr(DiffusionPipeline, name, None)
        if existing is not None and existing is not method:
            continue  # diffusers grew its own method of that name: leave it alone
        setattr(DiffusionPipeline, name, method)
