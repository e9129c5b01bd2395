"""Holds one class to an outcome: supported (cache exact at zero reuse, less work when permissive, disable exact) or
refused with the library's reason; and what sparse attention does on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import diffusers_block as db
from diffusers_block.eval.harness import BlockWorkCounter
from diffusers_block.models import resolve_adapter

from .registry import NOT_A_DIT, RECIPES

SUPPORTED, REFUSED, NOT_A_DIT_OUTCOME = "supported", "refused", "not a DiT"
#: Computes steps 0 and 2 of 4 (warm-up, then every other step), reusing at steps 1 and 3.
PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=0)


@dataclass(frozen=True)
class Outcome:
    cls: str
    style: str
    modality: str
    outcome: str
    reason: str
    blocks: int  # blocks the cache hooks (0 where refused)
    block_lists: str  # the block lists cached, e.g. "transformer_blocks, single_transformer_blocks"
    sparse: str

    def to_json(self) -> dict:
        return asdict(self)


class WrongOutput(AssertionError):
    """A supported class whose cached or disabled output is not what it must be: a bug to fix, not an outcome."""


def first_sentence(message: str) -> str:
    """The reason of an error message, without the advice and lists that follow it (they change as the table
    grows, and belong to the error, not the table)."""
    return message.split(". ")[0].rstrip(".")


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    return _first_tensor(output.sample if hasattr(output, "sample") else output[0])


def _steps(model, kwargs: dict, steps: int) -> list[torch.Tensor]:
    """``steps`` calls of one generation, each in diffusers' cache_context with its step index."""
    outputs = []
    with torch.no_grad():
        for step in range(steps):
            with db.cache_context(model, "cond", step_index=step, num_inference_steps=steps):
                outputs.append(_first_tensor(model(**kwargs)))
    return outputs


def _forward(model, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return _first_tensor(model(**kwargs))


def _sparse(model, kwargs: dict, reference: torch.Tensor) -> str:
    """What enable_sparse_attention does on this class today: runs, refuses (with its reason), or fails."""
    try:
        db.enable_sparse_attention(model)
    except (db.UnsupportedModelError, ValueError, TypeError) as error:
        return f"refused: {first_sentence(str(error))}"
    try:
        output = _steps(model, kwargs, 1)[-1]
    except Exception as error:  # recorded, not raised: the table shows where sparse attention breaks
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        db.disable_sparse_attention(model)
    if not torch.isfinite(output).all():
        return "fails: non-finite output"
    if not torch.equal(_forward(model, kwargs), reference):
        raise WrongOutput(f"{type(model).__name__}: output after disable_sparse_attention differs from the original")
    return "runs"


def evaluate(cls_name: str) -> Outcome:
    """Build the recipe of ``cls_name`` and hold it to its outcome; raises WrongOutput on a silent wrong answer."""
    if cls_name in NOT_A_DIT:
        return Outcome(cls_name, "", "", NOT_A_DIT_OUTCOME, NOT_A_DIT[cls_name], 0, "", "")
    recipe = RECIPES[cls_name]
    model, kwargs = recipe.build()

    def refused(error: Exception) -> Outcome:
        return Outcome(cls_name, recipe.style, recipe.modality, REFUSED, first_sentence(str(error)), 0, "", "")

    try:
        adapter = resolve_adapter(model)
    except db.UnsupportedModelError as error:
        return refused(error)
    if not kwargs:
        raise WrongOutput(f"{cls_name} is accepted by the adapter now: give its recipe forward inputs")
    reference = _forward(model, kwargs)
    counter = BlockWorkCounter(model)
    try:
        db.enable_block_cache(model, db.BWCacheConfig(threshold=0.0))
        exact = _steps(model, kwargs, 2)
        for step, output in enumerate(exact):
            if not torch.equal(output, reference):
                raise WrongOutput(f"{cls_name}: step {step} with a cache that reuses nothing differs from no cache")
        dense_work, counter.calls = counter.calls * 2, 0  # of 4 steps
        db.enable_block_cache(model, PERMISSIVE)
        _steps(model, kwargs, 4)
        if not counter.calls < dense_work:
            raise WrongOutput(
                f"{cls_name}: a permissive schedule did {counter.calls} of {dense_work} block layer calls"
            )
    except db.UnsupportedModelError as error:  # found while running: a block breaks the table's conventions
        return refused(error)
    finally:
        counter.remove()
        db.disable_block_cache(model)
    if not torch.equal(_forward(model, kwargs), reference):
        raise WrongOutput(f"{cls_name}: output after disable_block_cache differs from the original")
    lists = ", ".join(dict.fromkeys(ref.spec.attr for ref in adapter.blocks))
    sparse = _sparse(model, kwargs, reference)
    return Outcome(cls_name, recipe.style, recipe.modality, SUPPORTED, "", len(adapter.blocks), lists, sparse)
