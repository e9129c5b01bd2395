"""The cached state of one cache unit (a block or sub-block) for one CFG branch."""

from __future__ import annotations

import torch

Tensors = tuple  # tuple[torch.Tensor | None, ...], one entry per stream the unit returns


class CacheSlot:
    """Residuals (blocks) or branch outputs (sub-blocks) of the last two computed steps, and when they were computed.

    Tensors stay in the model dtype on the model device. ``indicator`` is the unit's latest relative change
    between its two last computed steps: its parts (:func:`relative_l1_parts`) as a tensor until a policy reads it,
    then a float.
    """

    __slots__ = ("current", "previous", "computed_step", "previous_step", "input_shape", "reuses", "indicator")

    def __init__(self) -> None:
        self.current: Tensors | None = None
        self.previous: Tensors | None = None
        self.computed_step = -1
        self.previous_step = -1
        self.input_shape: tuple[tuple[int, ...], ...] | None = None  # per input stream (units.stream_shapes)
        self.reuses = 0
        self.indicator: torch.Tensor | float | None = None

    def store(self, tensors: Tensors, step: int, input_shape: tuple, keep_previous: bool) -> None:
        self.previous = self.current if keep_previous else None
        self.previous_step = self.computed_step
        self.current = tensors
        self.computed_step = step
        self.input_shape = input_shape
        self.reuses = 0

    def matches(self, input_shape: tuple) -> bool:
        return self.current is not None and self.input_shape == input_shape


def relative_l1_parts(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[sum|current - previous|, sum|previous|] in fp32, shape (2,), no host sync.

    Kept apart rather than divided so that ranks holding chunks of one sequence (context parallelism) can add them
    up and get the whole sequence's relative change, not an average of their chunks' ratios."""
    diff = torch.linalg.vector_norm(current - previous, ord=1, dtype=torch.float32)
    base = torch.linalg.vector_norm(previous, ord=1, dtype=torch.float32)
    return torch.stack([diff, base])


def relative_l1_of(parts: torch.Tensor) -> torch.Tensor:
    """mean|current - previous| / mean|previous| from :func:`relative_l1_parts` (stacked along the first dims)."""
    return parts[..., 0] / parts[..., 1].clamp_min(torch.finfo(torch.float32).tiny)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|current - previous| / mean|previous|, accumulated in fp32, as a 0-dim tensor (no host sync)."""
    return relative_l1_of(relative_l1_parts(current, previous))
