"""Sparse-attention controls, shared by the tabs, shown only where ``diffusers_block.enable_sparse_attention`` exists.

Sparse attention runs wherever the library runs (Triton kernel on a GPU, its PyTorch reference on the CPU), so the
only reason to hide the controls is an install without the feature. ``min_tokens`` is set to 0: the demo's small
models have far fewer tokens than the library's default cut-off, and the point here is to see the masks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr
from PIL import Image

import diffusers_block

from .._extras import pyplot
from ..kernels.antidiagonal_masses import MIN_STRIDE_ROWS
from .checks import number, whole

BLOCK_SIZES = (16, 32, 64, 128)
#: What happens to the key blocks left out: dropped, approximated from per-block statistics (PISA-style), or their
#: exact part from the step the masks were selected ("cached").
SKIPPED_BLOCKS = ("drop", "zeroth", "first", "cached")
#: How blocks are scored for the selection: mean-pooled logits, or XAttention's antidiagonal sums.
SCORINGS = ("mean", "antidiagonal")
#: Antidiagonal stride: at most 8, and at least MIN_STRIDE_ROWS stride rows per block (what the GPU kernel's tiles
#: need).
MAX_STRIDE = 8


def sparse_available() -> bool:
    return hasattr(diffusers_block, "enable_sparse_attention") and hasattr(diffusers_block, "SparseAttentionConfig")


@dataclass(frozen=True)
class SparseSettings:
    """What the sparse-attention controls hold (plain values, testable without a page)."""

    enabled: bool = False
    threshold: float = 0.7
    block_size: int = 16
    dense_steps: int = 5
    refresh_interval: int = 5
    skipped_blocks: str = "drop"
    scoring: str = "mean"
    layer: int = 0  # which layer's and head's block mask to draw
    head: int = 0

    def config(self):
        """The checked ``SparseAttentionConfig``, or None when sparse attention is off."""
        if not self.enabled:
            return None
        if not sparse_available():
            raise gr.Error("Sparse attention is not available in this install of diffusers-block.")
        try:
            return diffusers_block.SparseAttentionConfig(
                threshold=number(self.threshold, "Sparse attention threshold"),
                block_size=int(self.block_size),
                dense_steps=whole(self.dense_steps, "Sparse attention dense steps"),
                refresh_interval=whole(self.refresh_interval, "Sparse attention refresh interval"),
                approximation=None if self.skipped_blocks == "drop" else self.skipped_blocks,
                scoring=self.scoring,
                stride=max(1, min(MAX_STRIDE, int(self.block_size) // MIN_STRIDE_ROWS)),
                min_tokens=0,
            )
        except ValueError as error:  # the config's own check names the field and the allowed range
            raise gr.Error(str(error)) from error


SPARSE_OFF = SparseSettings()


def mask_image(summary, layer: int, head: int) -> Image.Image | None:
    """The block mask of ``layer``/``head`` as a picture; None (with a warning) where there is none to draw."""
    layer, head = int(layer), int(head)
    layers, heads = len(summary.layer_names), summary.density.shape[-1]
    if not 0 <= layer < layers or not 0 <= head < heads:
        gr.Warning(f"Block mask: layer must be in [0, {layers - 1}] and head in [0, {heads - 1}]; showing 0, 0.")
        layer, head = 0, 0
    try:
        figure = summary.plot_mask(layer=layer, head=head)
    except (ValueError, KeyError) as error:  # every step ran dense: no mask was selected
        gr.Warning(f"No block mask to draw: {error}")
        return None
    plt = pyplot()

    kept = summary.block_mask(layer, head).mean()
    figure.axes[0].set_title(
        f"sparse attention mask, {summary.layer_names[layer]}, head {head}\n{kept:.0%} of key blocks kept (black)"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mask.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        with Image.open(path) as picture:
            return picture.convert("RGB")


class SparseControls:
    """An accordion with sparse attention's switch and parameters, and which block mask to draw."""

    def __init__(self, prefix: str, device: str) -> None:
        defaults = SparseSettings()
        with gr.Accordion("Block-sparse attention", open=False, elem_id=f"{prefix}-sparse"):
            if not device.startswith("cuda"):
                gr.Markdown(
                    "On the CPU, sparse attention runs the kernel's PyTorch reference: it shows the masks and what "
                    "they cost in quality, not the speed of the GPU kernel."
                )
            self.enabled = gr.Checkbox(defaults.enabled, label="also make self-attention block-sparse")
            with gr.Row():
                self.threshold = gr.Slider(
                    0.05,
                    1.0,
                    value=defaults.threshold,
                    step=0.05,
                    label="threshold (attention mass kept per query block)",
                )
                self.block_size = gr.Dropdown(list(BLOCK_SIZES), value=defaults.block_size, label="block size (tokens)")
            with gr.Row():
                self.dense_steps = gr.Slider(0, 50, value=defaults.dense_steps, step=1, label="dense steps first")
                self.refresh_interval = gr.Slider(
                    1, 20, value=defaults.refresh_interval, step=1, label="select masks every N steps"
                )
            with gr.Row():
                self.skipped_blocks = gr.Radio(
                    list(SKIPPED_BLOCKS),
                    value=defaults.skipped_blocks,
                    label="skipped key blocks: drop, approximate (zeroth / first order) or cached",
                )
                self.scoring = gr.Radio(
                    list(SCORINGS), value=defaults.scoring, label="block scoring (antidiagonal: closer, dearer)"
                )
            with gr.Row():
                self.layer = gr.Number(defaults.layer, precision=0, label="mask picture: layer")
                self.head = gr.Number(defaults.head, precision=0, label="mask picture: head")

    @property
    def components(self) -> set:
        return {getattr(self, f.name) for f in fields(SparseSettings)}

    def settings(self, values: dict) -> SparseSettings:
        return SparseSettings(**{f.name: values[getattr(self, f.name)] for f in fields(SparseSettings)})
