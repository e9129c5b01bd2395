"""Optional dependencies behind pip extras: one helper that imports them or says which extra to install.

``pip install diffusers-block`` brings the library only (caching, sparse attention, kernels, the adapter table, the
policy pipeline); the demo, training, Meta-World rollouts, benchmarks and the peer caches need packages that a user of
the library alone should not have to install. Each module that needs one calls :func:`require` where it imports it,
so that a missing package fails at the point of use with the command that fixes it, not with a bare
``ModuleNotFoundError`` that leaves the user to guess the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The extras pyproject.toml declares, each with who it is for (kept in step with pyproject by a test).
EXTRAS = {
    "models": "the shipped digits models' stock pipelines (StableDiffusion3Pipeline, WanPipeline need transformers)",
    "plot": "summary heatmaps (matplotlib)",
    "demo": "the Gradio demo (python app.py)",
    "train": "training the shipped models (accelerate, tqdm, scikit-learn's digits)",
    "policy": "Meta-World rollouts of the diffusion policy (metaworld, gymnasium)",
    "bench": "the benchmarks (python -m diffusers_block.bench)",
    "peers": "the peer caches the quality benchmark compares against (cache-dit)",
    "docs": "building the documentation site",
    "dev": "everything the tests need",
}


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def install_command(extra: str) -> str:
    return f'pip install "diffusers-block[{extra}]"'


def require(extra: str, module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"gradio"``), or raise :class:`MissingExtraError` naming ``pip install
    "diffusers-block[extra]"``. ``purpose`` says what needs it (default: the extra's description)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and not (module == error.name or module.startswith(f"{error.name}.")):
            raise  # the package is there but one of its own imports failed: that error says more than ours would
        raise MissingExtraError(
            f"{module} is not installed; it is needed for {purpose or EXTRAS[extra]}. Install it with: "
            f"{install_command(extra)}"
        ) from error


def pyplot(headless: bool = True) -> ModuleType:
    """``matplotlib.pyplot`` for drawing to files (the ``plot`` extra). ``headless`` selects the Agg backend first, so
    that a server or CI machine without a display can draw; pass False where the figure is returned to a notebook."""
    matplotlib = require("plot", "matplotlib")
    if headless:
        matplotlib.use("Agg", force=False)
    return importlib.import_module("matplotlib.pyplot")
