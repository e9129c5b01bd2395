"""Which of the teacher's blocks a segment student keeps: block-importance scores and the choice they make.

- ``first``: the first n blocks (the simple baseline);
- ``weights``: data-free, from the weights alone (Gardener-style): a block whose linear maps have a flat singular
  spectrum (high spectral entropy) spreads its work over many directions and is kept before one whose spectrum
  collapses onto a few;
- ``calibration``: from the teacher's own activations at the segment's noise levels, the way the block cache
  measures how much a block matters: one minus the cosine similarity of the hidden stream entering and leaving
  the block (a block that barely turns the stream is the cheapest to drop), averaged over calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..models import HIDDEN, resolve_adapter

METHODS = ("all", "first", "weights", "calibration")


def weight_scores(teacher: nn.Module) -> dict[str, float]:
    """Mean normalised spectral entropy of each block's linear maps (1: flat spectrum, 0: rank one)."""
    scores = {}
    for block in resolve_adapter(teacher).blocks:
        entropies = []
        for module in block.module.modules():
            if isinstance(module, nn.Linear):
                singular = torch.linalg.svdvals(module.weight.detach().float())
                p = singular / singular.sum()
                entropy = -(p * p.clamp_min(1e-12).log()).sum() / torch.log(torch.tensor(float(len(p))))
                entropies.append(float(entropy))
        scores[block.name] = sum(entropies) / max(len(entropies), 1)
    return scores


@torch.no_grad()
def calibration_scores(teacher: nn.Module, run: Callable[[], None]) -> dict[str, float]:
    """Mean (1 - cosine similarity) of each block's hidden stream in and out over every call ``run()`` makes."""
    adapter = resolve_adapter(teacher)
    totals = {block.name: [0.0, 0] for block in adapter.blocks}
    handles = []
    for block in adapter.blocks:

        def record(module, args, kwargs, output, name=block.name, spec=block.spec):
            hidden_in = kwargs.get(spec.hidden_arg, args[0] if args else None)
            hidden_out = output[spec.returns.index(HIDDEN)] if isinstance(output, tuple) else output
            cosine = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            totals[name][0] += float((1 - cosine).mean())
            totals[name][1] += 1

        handles.append(block.module.register_forward_hook(record, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(count, 1) for name, (total, count) in totals.items()}


def choose_blocks(names: Sequence[str], keep: int, scores: dict[str, float] | None = None) -> list[str]:
    """The ``keep`` highest-scoring block names in their original order (the first ``keep`` without scores)."""
    if not 1 <= keep <= len(names):
        raise ValueError(f"a student keeps between 1 and {len(names)} blocks, got {keep}")
    if scores is None:
        return list(names[:keep])
    ranked = sorted(names, key=lambda name: -scores[name])[:keep]
    return [name for name in names if name in ranked]
