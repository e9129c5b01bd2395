"""Block-wise feature caching: hooks on transformer blocks (or their sub-blocks) that reuse cached residuals."""

from .apply import block_cache_summary, disable_block_cache, enable_block_cache, reset_block_cache
from .bac import calibrate as calibrate_schedule
from .bwcache import BWCacheConfig
from .policy import CacheConfig
from .static import StaticScheduleConfig
from .summary import BlockCacheSummary
from .tuning import TunedSchedule, tune_schedule

__all__ = [
    "BWCacheConfig",
    "BlockCacheSummary",
    "CacheConfig",
    "StaticScheduleConfig",
    "TunedSchedule",
    "block_cache_summary",
    "calibrate_schedule",
    "disable_block_cache",
    "enable_block_cache",
    "reset_block_cache",
    "tune_schedule",
]
