"""Fused block selection for block-sparse attention (Triton): which key blocks each query block attends to.

For every (batch, head, query block) it picks the fewest key blocks whose estimated attention mass reaches a
cumulative threshold, and writes them straight into the compact ``(block_index, block_count)`` lists that
:func:`~diffusers_block.kernels.block_sparse_attention.block_sparse_attention` consumes: no dense mask, no sort, no
host sync.

Estimate (mean pooling): the block score of query block ``i`` and key block ``j`` is ``scale * mean(q_i) .
mean(k_j) + log(n_j)`` (``n_j`` the tokens in key block ``j``, so a short tail block counts for its size); a softmax
over ``j`` turns a row of scores into block masses that sum to one.

Choice per row: key blocks are ranked by mass, "forced" blocks first (the key blocks of text tokens, the query's
own block and its ``local_blocks`` neighbours); the row keeps the shortest prefix of that ranking whose mass
reaches ``threshold`` (per head), at least ``min_blocks`` and at most ``max_blocks`` long, but never fewer than the
forced blocks. Query blocks inside ``dense_queries`` (text queries of joint attention) keep everything up to
``max_blocks``. The kernel finds the cut without sorting: it bisects (31 steps, on the float's bit pattern) the
largest mass value ``c`` such that the blocks with mass >= c satisfy the rule, then compacts them in ascending block
order with a prefix sum. Ties at the cut are all kept (the reference, which sorts, keeps one of them).

Layout of one program: ``BLOCK_Q`` query blocks of one (batch, head). Pass 1 computes their scores against all key
blocks in ``BLOCK_K``-wide tiles with ``tl.dot`` (fp32) and keeps a running max/sum per row (online softmax); the
scores go to an fp32 scratch row ``(NQ, NK)`` per head. Pass 2 reloads each row (``NK_PAD`` = next power of two of
the key blocks) in groups of rows, bisects all rows of a group at once and writes the index. The key means are read
once per ``BLOCK_Q`` rows.
On CPU without ``TRITON_INTERPRET=1`` the launcher runs :func:`select_blocks_reference`.
"""

from __future__ import annotations

import math
import os

import torch

from .reference import block_means, select_blocks_reference

try:  # Triton is Linux-only; the CPU fallback works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["select_blocks", "MAX_KEY_BLOCKS"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Most key blocks per row the kernel holds in registers (4096 blocks of 64 = 262,144 tokens).
MAX_KEY_BLOCKS = 4096
#: Forced blocks get priority 2.0 (masses are <= 1); the bisection runs over the bit patterns [0, bits(2.0)) = [0, 2^30),
#: so 31 steps find the cut exactly.
BISECTION_STEPS = 31
#: Tiles under TRITON_INTERPRET.
INTERPRET_BLOCK_Q = 16
INTERPRET_BLOCK_K = 16
#: Pass 2 holds a (ROW_GROUP, NK_PAD) tile: ROW_GROUP = min(16, PASS2_ELEMENTS // NK_PAD) rows at once.
PASS2_ELEMENTS = 8192
#: GPU autotune candidates (BLOCK_Q, BLOCK_K, num_warps); BLOCK_Q is a multiple of every ROW_GROUP (<= 16).
GPU_CONFIGS = [(16, 64, 8), (16, 64, 4), (32, 64, 8), (16, 128, 8), (16, 64, 16)]
#: DIFFUSERS_BLOCK_AUTOTUNE=0 (as for block_sparse_attention) skips autotuning and uses the first config.
AUTOTUNE = os.environ.get("DIFFUSERS_BLOCK_AUTOTUNE", "1") != "0"


if triton is not None:

    @triton.jit
    def _block_selection_fwd(
        QMean,
        KMean,
        KLog2Count,
        Threshold,
        Scores,
        RowStats,
        BlockIndex,
        BlockCount,
        qk_scale,
        H,
        NQ,
        NK,
        WIDTH,
        MIN_BLOCKS,
        MAX_BLOCKS,
        LOCAL,
        FORCE_LO,
        FORCE_HI,
        DENSE_LO,
        DENSE_HI,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BISECTION_STEPS: tl.constexpr,
        NK_PAD: tl.constexpr,
        ROW_GROUP: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        head = bh % H
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_mask = rows < NQ
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        qm = tl.load(
            QMean + (bh * NQ + rows[:, None]) * HEAD_DIM + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        score_rows = Scores + (bh * NQ + rows[:, None]) * NK

        # Pass 1: scores (base 2) of BLOCK_Q rows against every key block, running max / sum per row.
        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for start in range(0, NK, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < NK
            km = tl.load(
                KMean + (bh * NK + cols[None, :]) * HEAD_DIM + offs_d[:, None],
                mask=col_mask[None, :] & d_mask[:, None],
                other=0.0,
            )
            log2n = tl.load(KLog2Count + cols, mask=col_mask, other=float("-inf"))
            s = tl.dot(qm, km, input_precision=INPUT_PRECISION) * qk_scale + log2n[None, :]
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
            tl.store(score_rows + cols[None, :], s, mask=row_mask[:, None] & col_mask[None, :])
        tl.debug_barrier()  # pass 2 reads scores other threads of this program wrote

        # Pass 2: ROW_GROUP rows at a time (a (ROW_GROUP, NK_PAD) tile), bisect each row's mass cut in parallel and
        # write the compact lists. Rows in parallel matter: the 31 bisection steps are latency-bound reductions.
        tl.store(RowStats + (bh * NQ + rows) * 2, m_i, mask=row_mask)
        tl.store(RowStats + (bh * NQ + rows) * 2 + 1, l_i, mask=row_mask)
        tl.debug_barrier()
        tau_head = tl.load(Threshold + head)
        cols = tl.arange(0, NK_PAD)
        col_valid = cols < NK
        for g in range(0, BLOCK_Q, ROW_GROUP):
            grow = pid_q * BLOCK_Q + g + tl.arange(0, ROW_GROUP)
            grow_mask = grow < NQ
            m_r = tl.load(RowStats + (bh * NQ + grow) * 2, mask=grow_mask, other=0.0)
            l_r = tl.load(RowStats + (bh * NQ + grow) * 2 + 1, mask=grow_mask, other=1.0)
            valid = grow_mask[:, None] & col_valid[None, :]
            s = tl.load(Scores + (bh * NQ + grow[:, None]) * NK + cols[None, :], mask=valid, other=float("-inf"))
            mass = tl.math.exp2(s - m_r[:, None]) / l_r[:, None]
            forced = ((cols >= FORCE_LO) & (cols < FORCE_HI))[None, :]
            forced = forced | (tl.abs(cols[None, :] - grow[:, None]) <= LOCAL)  # LOCAL = -1: no neighbourhood
            forced = forced & valid
            dense_row = (grow >= DENSE_LO) & (grow < DENSE_HI)
            # A threshold of 1 keeps every block (fp32 masses can sum to 1 before the last block): like dense rows,
            # ask for more than any reachable mass, so that only MAX_BLOCKS ends the row.
            tau = tl.where(dense_row, 2.0, tau_head)
            tau = tl.where(tau >= 1.0, 2.0, tau)
            priority = tl.where(forced, 2.0, mass)
            priority = tl.where(valid, priority, -1.0)
            bits = priority.to(tl.int32, bitcast=True)  # order-preserving for non-negative floats
            lo = tl.zeros([ROW_GROUP], dtype=tl.int32)
            hi = tl.full([ROW_GROUP], 0x40000000, tl.int32)  # bits of 2.0: everything below is a candidate cut
            for _ in range(0, BISECTION_STEPS):
                mid = lo + (hi - lo) // 2
                chosen = bits >= mid[:, None]
                got = tl.sum(tl.where(chosen, mass, 0.0), 1)
                n = tl.sum(chosen.to(tl.int32), 1)
                ok = ((got >= tau) | (n >= MAX_BLOCKS)) & (n >= MIN_BLOCKS)
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            chosen = (bits >= lo[:, None]) & valid
            chosen_i = chosen.to(tl.int32)
            pos = tl.cumsum(chosen_i, 1) - 1
            out_rows = (bh * NQ + grow).to(tl.int64)
            targets = BlockIndex + out_rows[:, None] * WIDTH + pos
            tl.store(targets, (cols[None, :] + 0 * pos).to(tl.int32), mask=chosen & (pos < WIDTH))
            tl.store(BlockCount + out_rows, tl.minimum(tl.sum(chosen_i, 1), WIDTH), mask=grow_mask)

    _block_selection_fwd_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w) for bq, bk, w in GPU_CONFIGS],
        key=["NK_PAD", "HEAD_DIM", "ROW_GROUP"],
        # Pass 1 rewrites the scratch and pass 2 the lists every time: re-running a config is harmless.
    )(_block_selection_fwd)


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or INTERPRET)


def _block_range(token_range: tuple[int, int] | None, block_size: int, num_blocks: int) -> tuple[int, int]:
    """Blocks overlapping the token range [start, end) (empty range -> (0, 0))."""
    if token_range is None or token_range[1] <= token_range[0]:
        return 0, 0
    start, end = token_range
    return max(0, start // block_size), min(num_blocks, math.ceil(end / block_size))


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    threshold: float | torch.Tensor,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    local_blocks: int = 0,
    forced_keys: tuple[int, int] | None = None,
    dense_queries: tuple[int, int] | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head, query block) the fewest key blocks reaching ``threshold`` of the estimated attention mass.

    Args:
        q: (B, H, S_q, D); k: (B, H, S_k, D); fp16/bf16/fp32, same device.
        block_size: tokens per block (as in block_sparse_attention).
        threshold: cumulative mass to reach, in [0, 1]; a float, or a (H,) tensor (per-head thresholds). 1.0 keeps
            every block (up to max_blocks).
        min_blocks / max_blocks: bounds on the count per row (max None = no cap); forced blocks are always kept.
        local_blocks: key blocks within this distance of the query block's own index are always kept (its own
            block with 0; -1 keeps no neighbourhood). Meaningful for self-attention (S_q == S_k).
        forced_keys: token range [start, end) of keys whose blocks every row keeps (text tokens of joint attention).
        dense_queries: token range of queries whose blocks keep every key block (up to max_blocks).
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        ``(block_index, block_count)``: int32 (B, H, NQ, W) with ascending block ids in the first ``count`` slots,
        and (B, H, NQ); W = min(NK, max(max_blocks, forced blocks + neighbourhood)).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, H, S, D) with equal B, H, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    num_q_blocks, num_kv_blocks = math.ceil(s_q / block_size), math.ceil(s_k / block_size)
    if isinstance(threshold, torch.Tensor):
        tau = threshold.to(device=q.device, dtype=torch.float32).reshape(-1)
        if tau.numel() == 1:
            tau = tau.expand(heads)
        if tau.numel() != heads:
            raise ValueError(f"threshold tensor must have one value per head ({heads}); got {tuple(threshold.shape)}")
    else:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
        tau = torch.full((heads,), float(threshold), device=q.device, dtype=torch.float32)
    if min_blocks < 0 or (max_blocks is not None and max_blocks < 1):
        raise ValueError(f"need min_blocks >= 0 and max_blocks >= 1 (or None); got {min_blocks}, {max_blocks}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    force_lo, force_hi = _block_range(forced_keys, block_size, num_kv_blocks)
    dense_lo, dense_hi = _block_range(dense_queries, block_size, num_q_blocks)
    local = int(local_blocks) if local_blocks is not None else -1
    cap = num_kv_blocks if max_blocks is None else min(int(max_blocks), num_kv_blocks)
    forced_per_row = (force_hi - force_lo) + (2 * local + 1 if local >= 0 else 0)
    width = min(num_kv_blocks, max(cap, forced_per_row))
    min_eff = min(int(min_blocks), num_kv_blocks)
    kwargs = dict(
        block_size=block_size,
        scale=scale,
        min_blocks=min_eff,
        max_blocks=cap,
        width=width,
        local=local,
        force=(force_lo, force_hi),
        dense=(dense_lo, dense_hi),
    )
    if not _use_triton(q):
        return select_blocks_reference(q, k, tau, **kwargs)
    if num_kv_blocks > MAX_KEY_BLOCKS:
        raise ValueError(
            f"{num_kv_blocks} key blocks > {MAX_KEY_BLOCKS} supported by the selection kernel; use a larger block_size"
        )

    q_mean = block_means(q, block_size).contiguous()
    k_mean, k_count = block_means(k, block_size, return_counts=True)
    k_mean = k_mean.contiguous()
    log2_count = torch.log2(k_count.to(torch.float32)).contiguous()
    scores = torch.empty((batch * heads, num_q_blocks, num_kv_blocks), device=q.device, dtype=torch.float32)
    row_stats = torch.empty((batch * heads, num_q_blocks, 2), device=q.device, dtype=torch.float32)
    index = torch.zeros((batch, heads, num_q_blocks, width), device=q.device, dtype=torch.int32)
    count = torch.empty((batch, heads, num_q_blocks), device=q.device, dtype=torch.int32)
    args = (
        q_mean,
        k_mean,
        log2_count,
        tau.contiguous(),
        scores,
        row_stats,
        index,
        count,
        scale * 1.4426950408889634,  # log2(e): softmax in base 2
        heads,
        num_q_blocks,
        num_kv_blocks,
        width,
        min_eff,
        cap,
        local,
        force_lo,
        force_hi,
        dense_lo,
        dense_hi,
    )
    nk_pad = max(16, triton.next_power_of_2(num_kv_blocks))
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BISECTION_STEPS": BISECTION_STEPS,
        "NK_PAD": nk_pad,
        "ROW_GROUP": max(1, min(INTERPRET_BLOCK_Q if INTERPRET else 16, PASS2_ELEMENTS // nk_pad)),
        "INPUT_PRECISION": "ieee",
    }

    def grid(kw):
        return (triton.cdiv(num_q_blocks, kw["BLOCK_Q"]), batch * heads)

    if INTERPRET:
        meta.update(BLOCK_Q=INTERPRET_BLOCK_Q, BLOCK_K=INTERPRET_BLOCK_K)
        _block_selection_fwd[grid(meta)](*args, **meta)
    elif AUTOTUNE:
        with torch.cuda.device(q.device):
            _block_selection_fwd_autotuned[grid](*args, **meta)
    else:
        block_q, block_k, warps = GPU_CONFIGS[0]
        meta.update(BLOCK_Q=block_q, BLOCK_K=block_k)
        with torch.cuda.device(q.device):
            _block_selection_fwd[grid(meta)](*args, **meta, num_warps=warps)
    return index, count
