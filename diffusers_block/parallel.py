"""How diffusers-block's features run under diffusers' context parallelism (CP).

diffusers shards a transformer's token sequence across ranks with ``transformer.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=..., ring_degree=...))`` (or ``from_pretrained(..., parallel_config=...)``): a
split hook cuts the sequence into one contiguous chunk per rank before the first block (Wan: on ``blocks.0``; Flux:
on the transformer), every block then runs on its rank's chunk, attention exchanges what it needs (Ulysses: an
all-to-all that gives each rank all tokens of ``heads / ulysses_degree`` heads; ring: key/value chunks passed
around), and a gather hook on ``proj_out`` reassembles the sequence. What that means for each feature:

- Block caching: each rank caches its own chunk's residuals. Ranks must take the same compute/reuse decision at every
  step (a rank that skips a block would leave the others waiting in that block's collectives). Static schedules
  decide from the step alone; BWCache sums its indicator's numerator and denominator over the ranks, once per
  transformer call where it already reads them to the host, so every rank decides on the whole sequence's relative
  change, the value a single process computes. BAC calibration gathers the recorded features along the sequence.
- Sparse attention under Ulysses: after the all-to-all each rank holds the whole sequence for its own heads, so
  selection and kernels run unchanged on those heads (per-head thresholds are taken at the rank's head offset).
  Ring attention never holds a whole row of keys, and ``ulysses_anything`` splits heads unevenly: both are refused,
  as are joint-attention models (Flux, CogVideoX, ...), whose text tokens the split hook spreads over the ranks so
  that the all-to-all interleaves text and image chunks in an order the text-aware selection cannot rely on.

:func:`context_parallel` reads the layout from a model or attention module; the other helpers are what the
features call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "ContextParallelLayout",
    "UnsupportedParallelismError",
    "context_parallel",
    "cpu_context_parallel",
]

#: Name prefixes of the hooks diffusers' ``apply_context_parallel`` registers (``hooks/context_parallel.py``).
SPLIT_HOOK_PREFIXES = ("cp_input---", "cp_output---")


class UnsupportedParallelismError(ValueError):
    """A feature cannot run under this context-parallel configuration; the message names the configuration and what
    to do instead."""


@dataclass(frozen=True)
class ContextParallelLayout:
    """Where this rank sits in a context-parallel transformer.

    group: every rank holding a chunk of the same sequence (diffusers' flattened ring x ulysses mesh), the group
        whose ranks must take the same cache decisions.
    rank / world_size: this rank's place in ``group``; its chunk is the rank-th of world_size contiguous chunks.
    ulysses_rank: this rank's place in the Ulysses group: after the all-to-all it holds heads
        ``[ulysses_rank * local_heads, (ulysses_rank + 1) * local_heads)``.
    """

    ring_degree: int
    ulysses_degree: int
    ulysses_anything: bool
    ring_anything: bool
    group: object  # torch.distributed.ProcessGroup
    rank: int
    world_size: int
    ulysses_rank: int
    device: torch.device | None

    @property
    def description(self) -> str:
        extras = [name for name in ("ulysses_anything", "ring_anything") if getattr(self, name)]
        extra = "".join(f", {name}=True" for name in extras)
        return f"ContextParallelConfig(ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}{extra})"


def _layout_of(parallel_config) -> ContextParallelLayout | None:
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_flattened_mesh", None) is None:
        return None  # no CP, or a config whose mesh is not set up yet (enable_parallelism sets it up)
    mesh = cp._flattened_mesh
    group = mesh.get_group()
    world_size = torch.distributed.get_world_size(group)
    if world_size < 2:
        return None
    return ContextParallelLayout(
        ring_degree=int(cp.ring_degree),
        ulysses_degree=int(cp.ulysses_degree),
        ulysses_anything=bool(cp.ulysses_anything),
        ring_anything=bool(cp.ring_anything),
        group=group,
        rank=torch.distributed.get_rank(group),
        world_size=world_size,
        ulysses_rank=int(cp._ulysses_local_rank or 0),
        device=cp._device,
    )


def context_parallel(module: torch.nn.Module) -> ContextParallelLayout | None:
    """The context-parallel layout of a transformer (``enable_parallelism`` or ``from_pretrained(parallel_config=)``)
    or of one of its attention modules (whose processor diffusers gives the config), or None without CP."""
    config = getattr(module, "_parallel_config", None)
    if config is None:
        config = getattr(getattr(module, "processor", None), "_parallel_config", None)
    return _layout_of(config) if config is not None else None


# -- block caching ----------------------------------------------------------------------------------------------
def register_inside_context_parallel(module: torch.nn.Module, hook, name: str) -> None:
    """Register ``hook`` on ``module`` beneath diffusers' CP split/gather hooks, so that it sees the rank's chunk.

    A hook registered after ``enable_parallelism`` would otherwise wrap the split hook of ``blocks.0`` (Wan) and see
    the whole sequence going in but one rank's chunk coming out: the residual shapes would not match. The CP hooks
    and every hook above them are taken off (outermost first, which diffusers' registry unwinds exactly) and put
    back on top of ``hook`` in their order.
    """
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    order = list(registry._hook_order)
    first = next((i for i, n in enumerate(order) if n.startswith(SPLIT_HOOK_PREFIXES)), None)
    if first is None:
        registry.register_hook(hook, name)
        return
    above = [(n, registry.hooks[n]) for n in order[first:]]
    for n, _ in reversed(above):
        registry.remove_hook(n, recurse=False)
    registry.register_hook(hook, name)
    for n, h in above:
        registry.register_hook(h, n)


def sum_over_ranks(tensor: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
    """``tensor`` summed over the CP group (one all-reduce, in place on a copy)."""
    total = tensor.clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=layout.group)
    return total


def gather_sequence(tensor: torch.Tensor, layout: ContextParallelLayout, dim: int = -1) -> torch.Tensor:
    """The ranks' chunks of ``tensor`` concatenated along ``dim`` in rank order (the sequence order of diffusers'
    split). Moved to the CP device for the collective (NCCL holds no CPU tensors) and back."""
    home = tensor.device
    local = tensor.contiguous().to(layout.device or home)
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(layout.world_size)]
    torch.distributed.all_gather(
        sizes, torch.tensor([local.shape[dim]], dtype=torch.long, device=local.device), group=layout.group
    )
    chunks = []
    for size in sizes:
        shape = list(local.shape)
        shape[dim] = int(size)
        chunks.append(local.new_empty(shape))
    if len({int(s) for s in sizes}) == 1:
        torch.distributed.all_gather(chunks, local, group=layout.group)
    else:  # uneven chunks (ulysses_anything / ring_anything): gloo/NCCL all_gather wants equal sizes
        largest = max(int(s) for s in sizes)
        padded = torch.nn.functional.pad(local.movedim(dim, -1), (0, largest - local.shape[dim])).movedim(-1, dim)
        gathered = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(gathered, padded.contiguous(), group=layout.group)
        chunks = [g.narrow(dim, 0, int(s)) for g, s in zip(gathered, sizes)]
    return torch.cat(chunks, dim=dim).to(home)


# -- sparse attention -------------------------------------------------------------------------------------------
def check_sparse_attention(layout: ContextParallelLayout | None, family: str, joint: bool) -> None:
    """Raise :class:`UnsupportedParallelismError` unless sparse attention can run under ``layout`` (plain Ulysses
    on a model whose self-attention sees image tokens only)."""
    if layout is None:
        return
    fix = (
        "Use ContextParallelConfig(ulysses_degree=N) alone (N dividing the head count and the token count), or call "
        "disable_sparse_attention() and keep block caching, which runs under every CP configuration"
    )
    if layout.ring_degree > 1:
        raise UnsupportedParallelismError(
            f"sparse attention cannot run under ring attention ({layout.description}): each rank only ever holds a "
            f"chunk of the keys, so no rank can select a query block's key blocks over the whole sequence. {fix}."
        )
    if layout.ulysses_anything:
        raise UnsupportedParallelismError(
            f"sparse attention cannot run under {layout.description}: it splits heads and tokens unevenly, so a "
            f"rank's heads are not a known slice of the model's heads. {fix}."
        )
    if joint:
        raise UnsupportedParallelismError(
            f"sparse attention cannot run on a {family} transformer under {layout.description}: its text tokens are "
            f"split across ranks with the image tokens, and the all-to-all interleaves the ranks' text and image "
            f"chunks, so the selection cannot tell where text sits. Use a model whose self-attention is image-only "
            f"(Wan, ...), or call disable_sparse_attention() and keep block caching under CP."
        )


def local_heads(layout: ContextParallelLayout | None, heads: int) -> tuple[int, int]:
    """(first head, model head count) of the ``heads`` heads this rank's attention call holds."""
    if layout is None or layout.ulysses_degree == 1:
        return 0, heads
    return layout.ulysses_rank * heads, heads * layout.ulysses_degree


def full_tokens(layout: ContextParallelLayout | None, local: int) -> int:
    """The whole sequence's token count, from one rank's chunk of ``local`` tokens."""
    return local if layout is None else local * layout.world_size


# -- running on CPU ---------------------------------------------------------------------------------------------
@contextmanager
def cpu_context_parallel() -> Iterator[None]:
    """Lets ``enable_parallelism`` build a CPU (gloo) mesh: tests and ``bench parallel --sizes tiny`` on CPU.

    diffusers 0.42's ``_resolve_parallel_config`` places rank r on device ``r % torch.accelerator.device_count()``,
    which is ``0 % 0`` without an accelerator (ZeroDivisionError). Inside this context the count reads 1 when no
    accelerator is present; with one it changes nothing.
    """
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
