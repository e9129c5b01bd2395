"""What sparse attention does, as one frozen value (diffusers' hooks style: config dataclass + apply function)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import validation

APPROXIMATIONS = (None, "zeroth", "first", "cached")
SCORINGS = ("mean", "antidiagonal")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Adaptive block-sparse self-attention.

    Selection: per (batch, head, query block of ``block_size`` tokens) the fewest key blocks whose estimated
    attention mass (row softmax of mean-pooled block logits) reaches ``threshold``, at least ``min_blocks`` and at
    most ``max_blocks`` of them; text tokens of joint attention, and each query block's own block plus
    ``local_blocks`` neighbours on each side, are always kept; text queries keep every block.

    Attributes:
        threshold: cumulative mass to keep per row, in (0, 1]; 1.0 keeps every block (dense, through the kernel).
        head_thresholds: one threshold per head instead (a tuple of length num_heads), e.g. sparser for heads that
            are known to be local.
        dense_steps: the first steps run exact dense attention (the layout of the image forms early).
        refresh_interval: masks are selected at the first sparse step and then every ``refresh_interval`` steps,
            and reused in between (sparse patterns change little from step to step); 1 selects at every step.
        refresh_schedule: instead, ``(fraction of the steps, interval)`` pairs, fractions ascending from 0.0: from
            that point of the generation on, masks are selected every ``interval`` steps. Attention changes most
            in the early, noisy steps, so e.g. ``((0.0, 2), (0.25, 8))`` spends its selections there (with
            ``approximation="cached"`` each selection is a dense call). Where the step count is unknown (a bare
            transformer called without a scheduler) the first interval holds throughout.
        block_size: tokens per query/key block; a power of two (the GPU kernel needs >= 16).
        min_blocks / max_blocks: bounds on the kept key blocks per query block (``max_blocks=None``: no cap).
        local_blocks: neighbours (in block order, after reordering) always kept on each side of the own block.
        approximation: None drops the skipped blocks; "zeroth" / "first" approximate them around their mean key
            (PISA-style, see kernels.reference.block_sparse_attention_reference); "cached" computes their exact
            contribution on the step the block lists are selected (that step costs one dense attention: the kernel
            runs on the lists and on their complement) and reuses it, with its share of the softmax mass, on the
            steps that reuse the lists (Re-ttention-style). Needs one output-sized buffer per hooked call.
        reorder: attend in 3D-tile order for video (2D for images) so that blocks are compact in space and time.
        tile: (frames, rows, cols) of a tile; ``block_size`` tokens per tile works best.
        min_tokens: sequences shorter than this stay dense (selection would cost more than it saves).
        scoring: how a (query block, key block) pair is scored for the selection: "mean" (logits of mean-pooled
            blocks; cheapest) or "antidiagonal" (XAttention's antidiagonal logit sums with ``stride``; costs about
            1 / (4 stride) of dense attention per selection, follows the true block masses more closely).
        stride: antidiagonal stride, a power of two dividing ``block_size`` (``block_size / stride >= 4`` on GPU).
        fuse_rotary: where the processor applies a rotary embedding the kernels know (Wan's), skip it there and
            apply it inside the token gather instead (one pass instead of several fp32 ones; same rounding).
        measure_error: diagnostic: each sparse call also computes exact dense attention on the same inputs (q, k, v,
            scale, mask, rotary) and records the relative L2 error ||sparse - dense|| / ||dense|| of its output, in
            fp32 over the whole call (``SparseAttentionSummary.attention_error``). The sparse output is still what
            is returned, so each layer's error is that of the attention approximation alone, on the inputs the
            layer actually got, not the drift carried from earlier layers. Costs one dense attention per call.
    """

    threshold: float = 0.9
    head_thresholds: tuple[float, ...] | None = None
    dense_steps: int = 5
    refresh_interval: int = 5
    refresh_schedule: tuple[tuple[float, int], ...] | None = None
    block_size: int = 128
    min_blocks: int = 1
    max_blocks: int | None = None
    local_blocks: int = 0
    approximation: str | None = None
    reorder: bool = True
    tile: tuple[int, int, int] = (2, 8, 8)
    min_tokens: int = 4096
    scoring: str = "mean"
    stride: int = 8
    fuse_rotary: bool = True
    measure_error: bool = False

    def __post_init__(self):
        owner = type(self).__name__
        check = functools.partial(validation.check_field, self)

        def fraction(owner: str, name: str, value) -> float:
            return validation.number(owner, name, value, 0, 1, low_open=True)

        check("threshold", fraction)
        if self.head_thresholds is not None:
            check("head_thresholds", validation.sequence, fraction, "a tuple of numbers in (0, 1], one per head")
            if not self.head_thresholds:
                validation.fail(owner, "head_thresholds", (), "a non-empty tuple of numbers in (0, 1]")
        check("dense_steps", validation.integer, 0)
        check("refresh_interval", validation.integer, 1)
        if self.refresh_schedule is not None:
            check("refresh_schedule", _checked_refresh_schedule)
        check("block_size", validation.power_of_two, "a power of two (>= 16 on GPU)")
        check("min_blocks", validation.integer, 0)
        if self.max_blocks is not None:
            check("max_blocks", validation.integer, max(1, self.min_blocks))
        check("local_blocks", validation.integer, -1)  # -1: not even the own block
        check("approximation", validation.choice, APPROXIMATIONS)
        check(
            "tile",
            validation.sequence,
            lambda owner, name, value: validation.integer(owner, name, value, 1),
            "three ints >= 1 (frames, rows, cols)",
        )
        if len(self.tile) != 3:
            validation.fail(owner, "tile", self.tile, "three ints >= 1 (frames, rows, cols)")
        check("min_tokens", validation.integer, 0)
        check("scoring", validation.choice, SCORINGS)
        check("stride", validation.power_of_two, f"a power of two <= block_size ({self.block_size})")
        if self.scoring == "antidiagonal" and self.stride > self.block_size:
            validation.fail(owner, "stride", self.stride, f"a power of two <= block_size ({self.block_size})")
        check("reorder", validation.boolean)
        check("fuse_rotary", validation.boolean)
        check("measure_error", validation.boolean)

    def thresholds(self, heads: int) -> tuple[float, ...]:
        """The threshold of each of ``heads`` heads."""
        if self.head_thresholds is None:
            return (float(self.threshold),) * heads
        if len(self.head_thresholds) != heads:
            raise ValueError(
                f"SparseAttentionConfig.head_thresholds has {len(self.head_thresholds)} values but the attention "
                f"layer has {heads} heads; give one threshold per head"
            )
        return self.head_thresholds

    def interval_at(self, step: int, num_steps: int | None = None) -> int:
        """The refresh interval in force at ``step`` of ``num_steps``."""
        if self.refresh_schedule is None:
            return self.refresh_interval
        interval = self.refresh_schedule[0][1]
        if num_steps:
            for start, value in self.refresh_schedule:
                if step >= start * num_steps:
                    interval = value
        return interval

    def step_mode(self, step: int, last_selection: int | None, num_steps: int | None = None) -> str:
        """ "dense", "select" (compute new masks) or "reuse" (the masks selected at step ``last_selection``)."""
        if step < self.dense_steps:
            return "dense"
        if (
            last_selection is None
            or last_selection > step
            or step - last_selection >= self.interval_at(step, num_steps)
        ):
            return "select"
        return "reuse"


def _checked_refresh_schedule(owner: str, name: str, schedule) -> tuple[tuple[float, int], ...]:
    """``(fraction, interval)`` pairs: fractions ascending from 0.0 and below 1, intervals ints >= 1."""
    allowed = "(fraction, interval) pairs, fractions ascending from 0.0 and below 1, intervals ints >= 1"

    def pair(owner: str, item: str, value) -> tuple[float, int]:
        items = validation.sequence(owner, item, value, lambda o, n, v: v, "a (fraction, interval) pair")
        if len(items) != 2:
            validation.fail(owner, item, value, "a (fraction, interval) pair")
        start, interval = items
        return validation.number(owner, f"{item}[0]", start, 0, 1, high_open=True), validation.integer(
            owner, f"{item}[1]", interval, 1
        )

    schedule = validation.sequence(owner, name, schedule, pair, allowed)
    starts = [start for start, _ in schedule]
    if not schedule or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])):
        validation.fail(owner, name, schedule, allowed)
    return schedule
