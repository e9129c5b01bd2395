"""diffusers-block: make diffusers transformers fast without retraining them.

Importing the package adds ``enable_block_cache``, ``disable_block_cache`` and ``block_cache_summary`` methods (and
``enable_sparse_attention``, ``disable_sparse_attention``, ``sparse_attention_summary``, ``enable_blockwise_flow``,
``disable_blockwise_flow``) to diffusers' ``DiffusionPipeline`` (new methods only; nothing existing is replaced). The functions below do the same for pipelines
and bare transformers.
"""

import diffusers as _diffusers

from ._compat import check_diffusers as _check_diffusers

_check_diffusers(_diffusers.__version__)  # before anything touches diffusers internals

from .attention import (  # noqa: E402
    SparseAttentionConfig,
    SparseAttentionSummary,
    disable_sparse_attention,
    enable_sparse_attention,
    sparse_attention_summary,
)
from .cache import (  # noqa: E402
    BlockCacheSummary,
    BWCacheConfig,
    CacheConfig,
    StaticScheduleConfig,
    TunedSchedule,
    block_cache_summary,
    calibrate_schedule,
    disable_block_cache,
    enable_block_cache,
    reset_block_cache,
    tune_schedule,
)
from .distill import BlockwiseFlowModel, disable_blockwise_flow, enable_blockwise_flow  # noqa: E402
from .models import UnsupportedModelError, supported_families  # noqa: E402
from .parallel import UnsupportedParallelismError  # noqa: E402
from .pipeline_methods import install_pipeline_methods  # noqa: E402
from .state import ShapeChangedError, cache_context  # noqa: E402

__version__ = "0.1.0"

install_pipeline_methods()

__all__ = [
    "BWCacheConfig",
    "BlockwiseFlowModel",
    "BlockCacheSummary",
    "CacheConfig",
    "ShapeChangedError",
    "SparseAttentionConfig",
    "SparseAttentionSummary",
    "StaticScheduleConfig",
    "TunedSchedule",
    "UnsupportedModelError",
    "UnsupportedParallelismError",
    "block_cache_summary",
    "calibrate_schedule",
    "cache_context",
    "disable_block_cache",
    "disable_blockwise_flow",
    "disable_sparse_attention",
    "enable_block_cache",
    "enable_blockwise_flow",
    "enable_sparse_attention",
    "reset_block_cache",
    "tune_schedule",
    "sparse_attention_summary",
    "supported_families",
]
