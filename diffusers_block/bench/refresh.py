"""The ``--refresh`` option of the sparse-attention benchmarks: a mask refresh interval or a refresh schedule."""

from __future__ import annotations

import argparse

Refresh = int | tuple[tuple[float, int], ...]

HELP = (
    "mask refresh interval (steps), or a schedule of fraction:interval pairs (0:2,0.25:8: every 2nd step in the "
    "first quarter of the steps, every 8th after)"
)


def parse(value: str) -> Refresh:
    """An interval ("4") or a schedule ("0:2,0.25:8"); the config checks the values themselves."""
    try:
        if ":" not in value:
            return int(value)
        return tuple((float(start), int(interval)) for start, interval in (p.split(":") for p in value.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an interval or a fraction:interval schedule: {value!r}") from None


def config_options(refresh: Refresh) -> dict:
    """The SparseAttentionConfig fields for ``refresh``."""
    return {"refresh_schedule": refresh} if isinstance(refresh, tuple) else {"refresh_interval": refresh}


def label(refresh: Refresh) -> int | str:
    """``refresh`` as the command line wrote it (for tables and JSON)."""
    return refresh if isinstance(refresh, int) else ",".join(f"{start:g}:{interval}" for start, interval in refresh)
