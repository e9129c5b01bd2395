"""What block caching did in the last generation: data first (arrays), a picture on request."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._extras import pyplot

NOT_RUN, REUSED, COMPUTED = -1, 0, 1


@dataclass
class BlockCacheSummary:
    """unit_names: the cache units (blocks or sub-blocks), prefixed by the component for multi-transformer pipelines.
    branches: the CFG branches seen (context names such as "cond"/"uncond", or call indices 0, 1 within a step).
    computed: int8 array (branch, step, unit): 1 computed, 0 reused, -1 not run at that step.
    indicator: float array of the same shape: the policy's relative-change indicator where it was measured, else NaN.
    """

    unit_names: list[str]
    branches: list[Hashable]
    computed: np.ndarray
    indicator: np.ndarray

    @property
    def num_steps(self) -> int:
        """Denoising steps recorded."""
        return self.computed.shape[1]

    @property
    def evaluations(self) -> int:
        """Unit evaluations that ran (computed or reused), over every branch and step."""
        return int((self.computed != NOT_RUN).sum())

    @property
    def fraction_computed(self) -> float:
        """Share of unit evaluations that were computed (1.0 when nothing ran)."""
        total = self.evaluations
        return float((self.computed == COMPUTED).sum() / total) if total else 1.0

    @property
    def fraction_saved(self) -> float:
        """Share of unit evaluations that reused a cached tensor: ``1 - fraction_computed``."""
        return 1.0 - self.fraction_computed

    def to_dict(self) -> dict:
        """Unit names, branches, fractions and the computed array as JSON-ready values."""
        return {
            "unit_names": self.unit_names,
            "branches": [str(b) for b in self.branches],
            "fraction_computed": self.fraction_computed,
            "fraction_saved": self.fraction_saved,
            "computed": self.computed.tolist(),
        }

    def __str__(self) -> str:
        per_branch = ", ".join(
            f"{branch}: {(self.computed[i] == COMPUTED).sum()}/{(self.computed[i] != NOT_RUN).sum()}"
            for i, branch in enumerate(self.branches)
        )
        return (
            f"BlockCacheSummary({len(self.unit_names)} units x {self.num_steps} steps; computed "
            f"{self.fraction_computed:.1%} of unit evaluations, saved {self.fraction_saved:.1%}; per branch {per_branch})"
        )

    def plot(self, path: str | Path, branch: int = 0, title: str | None = None) -> Path:
        """Draw the steps x units heatmap of one branch (computed / reused / not run) to an image file."""
        plt = pyplot()
        from matplotlib.colors import ListedColormap

        grid = self.computed[branch].T  # units on the vertical axis, steps along the horizontal one
        fig, ax = plt.subplots(figsize=(max(4, 0.18 * self.num_steps + 2), max(3, 0.14 * len(self.unit_names) + 1.5)))
        cmap = ListedColormap(["#dddddd", "#f4a259", "#3b6ea5"])
        ax.imshow(grid + 1, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("cache unit")
        if len(self.unit_names) <= 60:
            ax.set_yticks(range(len(self.unit_names)), self.unit_names, fontsize=6)
        ax.set_title(
            title or f"branch {self.branches[branch]}: computed {self.fraction_computed:.0%} (blue) / reused (orange)"
        )
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def merge(summaries: dict[str, BlockCacheSummary]) -> BlockCacheSummary:
    """One summary for a pipeline with several transformers (Wan 2.2): units prefixed by the component name."""
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    branches = list(dict.fromkeys(b for s in summaries.values() for b in s.branches))
    steps = max((s.num_steps for s in summaries.values()), default=0)
    names, computed, indicator = [], [], []
    for label, summary in summaries.items():
        block = np.full((len(branches), steps, len(summary.unit_names)), NOT_RUN, dtype=np.int8)
        values = np.full(block.shape, np.nan)
        for i, branch in enumerate(summary.branches):
            j = branches.index(branch)
            block[j, : summary.num_steps] = summary.computed[i]
            values[j, : summary.num_steps] = summary.indicator[i]
        names += [f"{label}/{name}" for name in summary.unit_names]
        computed.append(block)
        indicator.append(values)
    return BlockCacheSummary(names, branches, np.concatenate(computed, axis=2), np.concatenate(indicator, axis=2))
