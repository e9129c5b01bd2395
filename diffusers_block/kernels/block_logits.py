"""Mean-pooled block logits for the block selection (Triton): how much attention each query block pays each key block.

``log2(e) * (scale * mean(q_i) . mean(k_j) + log(n_j))`` for every (query block ``i``, key block ``j``) of each
(batch, head), from the per-block sums of q and k (:func:`~.token_gather.block_sums`, or the token gather's by-product);
``n_j`` is the tokens in key block ``j``, so a short tail block counts for its size. Their row softmax is
:func:`~.reference.pooled_block_mass`, which :func:`~.block_selection.select_blocks` cuts.

A tiled GEMM of the sums, (NQ, D) x (D, NK) per head, with the means and the size term in its epilogue, on the tensor
cores in three TF32 passes (fp32 accuracy). It is a kernel of its own, not a pass of the cut, because the two want
different shapes: fused into one program (16-row FMA products, then the bisection) they took 234-255 registers per
thread, one program per SM, and 0.08 ms at 32K tokens, where this GEMM takes 0.007 ms
(``benchmarks/labs/block-selection/``).
On CPU without ``TRITON_INTERPRET=1`` the launcher runs :func:`~.reference.pooled_block_logits`.
"""

from __future__ import annotations

import contextlib

import torch

from . import runtime
from .reference import pooled_block_logits
from .runtime import tl, triton

__all__ = ["mean_block_logits"]

LOG2E = 1.4426950408889634
#: (query blocks, key blocks) per GEMM tile and warps; the whole head dim is one k-step.
LOGIT_TILE = (64, 64)
LOGIT_WARPS = 4


if triton is not None:

    @triton.jit
    def _mean_block_logits_fwd(
        QSum,
        KSum,
        Logits,
        qk_scale,
        SEQ_Q,
        SEQ_K,
        NQ,
        NK,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        TILE_Q: tl.constexpr,
        TILE_K: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_k = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        rows = pid_q * TILE_Q + tl.arange(0, TILE_Q)
        cols = pid_k * TILE_K + tl.arange(0, TILE_K)
        row_mask = rows < NQ
        col_mask = cols < NK
        qs = tl.load(
            QSum + (bh * NQ + rows[:, None]) * HEAD_DIM + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        ks = tl.load(
            KSum + (bh * NK + cols[None, :]) * HEAD_DIM + offs_d[:, None],
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        n_q = tl.maximum(tl.minimum(SEQ_Q - rows * BLOCK_SIZE, BLOCK_SIZE), 1).to(tl.float32)
        n_k = tl.maximum(tl.minimum(SEQ_K - cols * BLOCK_SIZE, BLOCK_SIZE), 1).to(tl.float32)
        # scale * mean(q_i) . mean(k_j) + log(n_j), in base 2 (qk_scale carries log2(e))
        dot = tl.dot(qs, ks, input_precision=INPUT_PRECISION)
        logits = dot * (qk_scale / n_q)[:, None] / n_k[None, :] + tl.math.log2(n_k)[None, :]
        tl.store(
            Logits + (bh * NQ + rows[:, None]) * NK + cols[None, :],
            logits,
            mask=row_mask[:, None] & col_mask[None, :],
        )


def mean_block_logits(
    query_sums: torch.Tensor, key_sums: torch.Tensor, *, block_size: int, seq_q: int, seq_k: int, scale: float
) -> torch.Tensor:
    """fp32 (B * H, NQ, NK) base-2 block logits from the fp32 (B, H, N, D) per-block sums of q and k (the sequences
    were ``seq_q`` / ``seq_k`` tokens long, which sets the size of each tail block)."""
    batch, heads, num_q, head_dim = query_sums.shape
    num_k = key_sums.shape[2]
    if not runtime.use_triton(query_sums):
        logits = pooled_block_logits(query_sums, key_sums, seq_q, seq_k, block_size, scale)
        return (logits * LOG2E).reshape(batch * heads, num_q, num_k)
    query_sums, key_sums = (t.to(torch.float32).contiguous() for t in (query_sums, key_sums))
    logits = torch.empty((batch * heads, num_q, num_k), device=query_sums.device, dtype=torch.float32)
    tile_q, tile_k = LOGIT_TILE
    with torch.cuda.device(query_sums.device) if query_sums.is_cuda else contextlib.nullcontext():
        _mean_block_logits_fwd[(triton.cdiv(num_q, tile_q), triton.cdiv(num_k, tile_k), batch * heads)](
            query_sums, key_sums, logits, scale * LOG2E, seq_q, seq_k, num_q, num_k,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_SIZE=block_size,
            # fp32 accuracy from the tensor cores: three TF32 products (the interpreter computes fp32 as it is)
            INPUT_PRECISION="ieee" if runtime.INTERPRET else "tf32x3",
            TILE_Q=tile_q,
            TILE_K=tile_k,
            num_warps=LOGIT_WARPS,
        )  # fmt: skip
    return logits
