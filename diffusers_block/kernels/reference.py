"""Plain PyTorch references for the Triton kernels in :mod:`diffusers_block.kernels`.

These are the ground truth the kernels are tested against and the CPU fallback the launchers use. They favour
clarity over speed (e.g. they materialise the dense ``(B, H, S_q, S_k)`` mask).
"""

from __future__ import annotations

import math

import torch

__all__ = ["block_mask_from_index", "block_sparse_attention_reference", "dense_block_index"]


def dense_block_index(
    batch: int, heads: int, num_q_blocks: int, num_kv_blocks: int, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists that keep every key block for every query block (block-sparse == dense attention).

    Returns ``(block_index, block_count)``: int32 tensors of shapes ``(B, H, num_q_blocks, num_kv_blocks)`` (each row
    is ``0 .. num_kv_blocks - 1``) and ``(B, H, num_q_blocks)`` (all equal to ``num_kv_blocks``), both contiguous.
    """
    index = torch.arange(num_kv_blocks, dtype=torch.int32, device=device)
    index = index.expand(batch, heads, num_q_blocks, num_kv_blocks).contiguous()
    count = torch.full((batch, heads, num_q_blocks), num_kv_blocks, dtype=torch.int32, device=device)
    return index, count


def block_mask_from_index(block_index: torch.Tensor, block_count: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Dense boolean block mask ``(B, H, num_q_blocks, num_kv_blocks)`` from a compact block list.

    Only the first ``block_count[b, h, qb]`` entries of ``block_index[b, h, qb]`` are used (counts are clamped to
    ``[0, max_kv_blocks]``). Raises ``ValueError`` if a used entry is outside ``[0, num_kv_blocks)``.
    """
    max_kv = block_index.shape[-1]
    count = block_count.long().clamp(0, max_kv)
    valid = torch.arange(max_kv, device=block_index.device) < count[..., None]
    index = block_index.long()
    used = index[valid]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_kv_blocks):
        raise ValueError(
            f"block_index has entries outside [0, {num_kv_blocks}) among its first block_count entries "
            f"(min {int(used.min())}, max {int(used.max())})"
        )
    # Invalid slots scatter into a dump column that is dropped afterwards.
    index = torch.where(valid, index, torch.full_like(index, num_kv_blocks))
    mask = torch.zeros(*index.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(-1, index, True)
    return mask[..., :num_kv_blocks]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse (non-causal) attention via a dense boolean mask.

    ``q``: (B, H, S_q, D), ``k``/``v``: (B, H, S_k, D). Query block ``qb`` covers rows
    ``[qb * block_size, (qb + 1) * block_size)`` and attends to the key blocks listed in
    ``block_index[b, h, qb, :block_count[b, h, qb]]`` (tails of the last blocks are cut at ``S_q`` / ``S_k``).
    Rows that see no key (count 0) get zeros and an lse of ``-inf``. Computed in fp32 (fp64 for fp64 inputs, handy as
    a ground truth); the output has ``q``'s dtype, lse ``(B, H, S_q)`` is in the compute dtype (natural log).
    """
    s_q, s_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    num_kv_blocks = math.ceil(s_k / block_size)
    block_mask = block_mask_from_index(block_index, block_count, num_kv_blocks)
    dense = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    dense = dense[..., :s_q, :s_k]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~dense, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    has_key = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(has_key, lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(probs, v.to(compute))
    out = torch.where(has_key[..., None], out, torch.zeros_like(out)).to(q.dtype)
    return (out, lse) if return_lse else out
