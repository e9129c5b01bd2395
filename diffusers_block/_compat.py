"""The diffusers releases this package is tested with, checked once at import.

diffusers-block hooks diffusers internals that carry no stability promise (``diffusers.hooks``, its
``TransformerBlockRegistry``, attention processors, pipeline ``cache_context``), and they move between minor
releases. A silent mismatch shows up as wrong outputs or odd errors deep inside a pipeline call, so an untested
diffusers fails at ``import diffusers_block`` instead, with the versions and the fix.
``DIFFUSERS_BLOCK_SKIP_VERSION_CHECK=1`` imports anyway (for trying a new diffusers release).
"""

from __future__ import annotations

import os
import re

#: The tested range: the same specifier as ``dependencies`` in pyproject.toml (a test keeps the two equal).
DIFFUSERS_SPEC = ">=0.42,<0.43"
_LOWEST, _BELOW = (0, 42), (0, 43)


def _release(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_diffusers(version: str, environ=os.environ) -> None:
    """Raise ImportError unless diffusers ``version`` is in :data:`DIFFUSERS_SPEC` (or the check is skipped)."""
    if environ.get("DIFFUSERS_BLOCK_SKIP_VERSION_CHECK") == "1":
        return
    release = _release(version)
    if release is not None and _LOWEST <= release < _BELOW:
        return
    raise ImportError(
        f"diffusers-block supports diffusers {DIFFUSERS_SPEC} (it uses diffusers internals that change between minor "
        f"releases), but diffusers {version} is installed. Install a supported one with: "
        f'pip install "diffusers{DIFFUSERS_SPEC}" (or set DIFFUSERS_BLOCK_SKIP_VERSION_CHECK=1 to try it anyway).'
    )
