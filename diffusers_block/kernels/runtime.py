"""Which path a launcher takes: its Triton kernel, or the PyTorch reference beside it.

Triton is Linux-only, and it reads ``TRITON_INTERPRET`` once, at import. Every launcher runs its kernel on CUDA
tensors, or on any tensors in interpreter mode (kernels run through numpy on the CPU: how CI tests them), and its
reference otherwise. Read ``runtime.INTERPRET`` at call time rather than copying it, so that one flag decides for all.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is Linux-only; the CPU fallback works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["AUTOTUNE", "INTERPRET", "launch_tuned", "tl", "triton", "use_triton"]

#: Interpreter mode (Triton kernels run on CPU tensors through numpy): read once at import, like Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Autotuning of every kernel that has candidates; DIFFUSERS_BLOCK_AUTOTUNE=0 launches each kernel's first (default)
#: config instead: fewer compiles, e.g. for validation runs over many shapes. Read at call time.
AUTOTUNE = os.environ.get("DIFFUSERS_BLOCK_AUTOTUNE", "1") != "0"


def use_triton(x: torch.Tensor) -> bool:
    """Whether a launcher runs its Triton kernel on ``x`` (a CUDA tensor, or any tensor under TRITON_INTERPRET=1)."""
    return triton is not None and (x.is_cuda or INTERPRET)


def launch_tuned(kernel, autotuned, grid, args, meta: dict, interpret: dict, default: dict, device) -> None:
    """Launch ``kernel`` as this process asks: with the interpreter's small ``interpret`` config, through its
    ``autotuned`` wrapper (:data:`AUTOTUNE`), or with its ``default`` config. ``grid`` maps a config to the grid;
    ``meta`` holds the launch's other constexprs."""
    if INTERPRET:
        kernel[grid(interpret)](*args, **meta, **interpret)
        return
    with torch.cuda.device(device):
        if AUTOTUNE:
            autotuned[grid](*args, **meta)
        else:
            kernel[grid(default)](*args, **meta, **default)
