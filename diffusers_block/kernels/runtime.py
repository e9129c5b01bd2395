"""Which path a launcher takes: its Triton kernel, or the PyTorch reference beside it.

Triton is Linux-only, and it reads ``TRITON_INTERPRET`` once, at import. Every launcher runs its kernel on CUDA
tensors, or on any tensors in interpreter mode (kernels run through numpy on the CPU: how CI tests them), and its
reference otherwise. Read ``runtime.INTERPRET`` at call time rather than copying it, so that one flag decides for all.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch

try:  # Triton is Linux-only; the CPU fallback works without it.
    import triton
    import triton.language as tl
    from triton.errors import TritonError
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    TritonError = RuntimeError

__all__ = ["AUTOTUNE", "INTERPRET", "KERNEL_FAILURES", "FastPath", "launch_tuned", "tl", "triton", "use_triton"]

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


#: What a fast path's compile or launch raises when it cannot run on a device: Triton's compile and resource errors
#: (CompilationError, OutOfResources, PTXASError), driver errors (RuntimeError), and the AttributeError / TypeError /
#: ImportError of an experimental API that moved between Triton releases (Gluon, TMA descriptors). Anything else
#: (bad arguments, KeyboardInterrupt) is not a reason to give up a kernel, and neither is running out of memory.
KERNEL_FAILURES = (TritonError, RuntimeError, AttributeError, TypeError, ImportError)


def device_key(device) -> str:
    """``"cuda:0"``: one name per device, with the current CUDA device filled in for a bare ``"cuda"``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class FastPath:
    """A faster variant of a kernel launch that may fail to compile or launch on some device (an unvalidated Triton,
    a GPU without the feature), with the regular launch behind it.

    A failure turns the variant off for that device only, with one warning that gives the cause: a process may drive
    different GPUs, and a failure on one says nothing about the others. Only :data:`KERNEL_FAILURES` count as
    failures; any other error, and running out of memory, propagates as it would from the regular launch.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.failures: dict[str, str] = {}  # device_key -> "ErrorType: message" of the failure that turned it off
        self._lock = threading.Lock()

    def available(self, device) -> bool:
        """Not turned off on ``device`` by an earlier failure."""
        return device_key(device) not in self.failures

    def run(self, device, launch: Callable[[], object]) -> bool:
        """``launch()``; True if it ran, False if it failed to compile or launch on ``device`` (which turns this path
        off there): the caller then takes the regular path."""
        try:
            launch()
        except KERNEL_FAILURES as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            self.fail(device, error)
            return False
        return True

    def fail(self, device, error: BaseException) -> None:
        """Turn this path off on ``device`` for the rest of the process, warning once with the cause."""
        key = device_key(device)
        cause = f"{type(error).__name__}: {error}"
        with self._lock:
            if key in self.failures:
                return
            self.failures[key] = cause
        warnings.warn(
            f"diffusers_block: {self.name} disabled on {key} after a failure ({cause[:300]}); the regular kernel "
            f"serves that device from now on",
            RuntimeWarning,
            stacklevel=3,
        )

    def reset(self) -> None:
        """Forget every failure (e.g. after a driver or Triton upgrade in a long-lived process, or in tests)."""
        with self._lock:
            self.failures.clear()
