"""What sparse attention kept in the last generation: data first (arrays), pictures on request."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._extras import pyplot

NOT_RUN, DENSE, SELECTED, REUSED, FALLBACK = -1, 0, 1, 2, 3
MODES = {"dense": DENSE, "select": SELECTED, "reuse": REUSED, "fallback": FALLBACK}


@dataclass
class SparseAttentionSummary:
    """layer_names: the hooked self-attention modules, prefixed by the component for multi-transformer pipelines.
    branches: CFG branches seen. mode: int8 (branch, step, layer): -1 not run, 0 dense step, 1 masks selected,
    2 masks reused, 3 ran dense because the call could not be made sparse (e.g. an attention mask).
    density: float (branch, step, layer, head): kept fraction of key blocks (1.0 for dense calls, NaN not run).
    attention_error: float (branch, step, layer): relative L2 error ||sparse - dense|| / ||dense|| of the layer's
    attention output against exact attention on the same inputs (mean over its calls), with
    ``SparseAttentionConfig(measure_error=True)``; NaN where not measured (off, dense steps and calls, not run).
    """

    layer_names: list[str]
    branches: list[Hashable]
    mode: np.ndarray
    density: np.ndarray
    attention_error: np.ndarray
    _masks: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def num_steps(self) -> int:
        """Denoising steps recorded."""
        return self.mode.shape[1]

    @property
    def sparse_density(self) -> float:
        """Mean kept fraction over the calls that ran sparse (selected or reused masks); 1.0 if none did."""
        sparse = (self.mode == SELECTED) | (self.mode == REUSED)
        return float(np.nanmean(self.density[sparse])) if sparse.any() else 1.0

    @property
    def overall_density(self) -> float:
        """Mean kept fraction over every call, dense steps counted as 1."""
        run = self.mode != NOT_RUN
        return float(np.nanmean(self.density[run])) if run.any() else 1.0

    def density_per_layer(self) -> np.ndarray:
        """(layer,) mean over branches, sparse steps and heads."""
        sparse = ((self.mode == SELECTED) | (self.mode == REUSED))[..., None] & ~np.isnan(self.density)
        values = np.where(sparse, self.density, 0.0).sum(axis=(0, 1, 3))
        counts = sparse.sum(axis=(0, 1, 3))
        return np.divide(values, counts, out=np.full(values.shape, np.nan), where=counts > 0)

    def error_per_layer(self) -> np.ndarray:
        """(layer,) mean relative attention error over branches and measured steps (NaN where none was measured)."""
        measured = ~np.isnan(self.attention_error)
        values = np.where(measured, self.attention_error, 0.0).sum(axis=(0, 1))
        counts = measured.sum(axis=(0, 1))
        return np.divide(values, counts, out=np.full(values.shape, np.nan), where=counts > 0)

    def density_per_step(self) -> np.ndarray:
        """(step,) mean over branches, layers and heads (dense steps are 1)."""
        run = (self.mode != NOT_RUN)[..., None] & ~np.isnan(self.density)
        values = np.where(run, self.density, 0.0).sum(axis=(0, 2, 3))
        counts = run.sum(axis=(0, 2, 3))
        return np.divide(values, counts, out=np.full(values.shape, np.nan), where=counts > 0)

    def block_mask(self, layer: str | int | None = None, head: int = 0) -> np.ndarray:
        """bool (query blocks, key blocks) of the last selection of ``layer`` (name or index; default: the first layer
        that has one), first sample, in the reordered token order the kernel attends in."""
        if not self._masks:
            raise ValueError("no block mask was selected in the last generation (all steps dense?)")
        if layer is None:
            layer = next(name for name in self.layer_names if name in self._masks)
        elif isinstance(layer, int):
            layer = self.layer_names[layer]
        if layer not in self._masks:
            raise KeyError(f"no block mask for layer {layer!r}; layers with one: {list(self._masks)}")
        return self._masks[layer](head)

    def plot(self, path: str | Path | None = None, *, branch: int = 0):
        """Heatmap steps x layers of the kept fraction (mean over heads); returns the matplotlib figure."""
        plt = pyplot(headless=False)

        data = np.nanmean(np.where(self.mode[branch][..., None] == NOT_RUN, np.nan, self.density[branch]), axis=-1)
        fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(self.layer_names) + 2), max(3, 0.2 * self.num_steps + 1)))
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("layer")
        ax.set_ylabel("step")
        ax.set_title(f"kept fraction of key blocks (branch {self.branches[branch] if self.branches else 0})")
        fig.colorbar(image, ax=ax)
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig

    def plot_mask(self, path: str | Path | None = None, *, layer: str | int | None = None, head: int = 0):
        """Picture of one block mask (query blocks down, key blocks across); returns the matplotlib figure."""
        plt = pyplot(headless=False)

        mask = self.block_mask(layer, head)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(mask, cmap="gray_r", interpolation="nearest")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        ax.set_title(f"{layer if layer is not None else 'first layer'}, head {head}: {mask.mean():.1%} kept")
        if path is not None:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig


def merge(summaries: dict[str, SparseAttentionSummary]) -> SparseAttentionSummary:
    """One summary for a pipeline: a single transformer's as is, several (Wan 2.2) side by side with prefixes."""
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    branches = list(dict.fromkeys(b for s in summaries.values() for b in s.branches))
    steps = max((s.num_steps for s in summaries.values()), default=0)
    heads = max((s.density.shape[-1] for s in summaries.values()), default=1)
    names, modes, densities, errors, masks = [], [], [], [], {}
    for prefix, s in summaries.items():
        mode = np.full((len(branches), steps, len(s.layer_names)), NOT_RUN, dtype=np.int8)
        density = np.full((len(branches), steps, len(s.layer_names), heads), np.nan)
        error = np.full(mode.shape, np.nan)
        for i, branch in enumerate(s.branches):
            j = branches.index(branch)
            mode[j, : s.num_steps] = s.mode[i]
            density[j, : s.num_steps, :, : s.density.shape[-1]] = s.density[i]
            error[j, : s.num_steps] = s.attention_error[i]
        names += [f"{prefix}/{n}" for n in s.layer_names]
        masks.update({f"{prefix}/{n}": fn for n, fn in s._masks.items()})
        modes.append(mode)
        densities.append(density)
        errors.append(error)
    return SparseAttentionSummary(
        names,
        branches,
        np.concatenate(modes, 2),
        np.concatenate(densities, 2),
        np.concatenate(errors, 2),
        masks,
    )
