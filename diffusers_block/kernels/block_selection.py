"""Fused block selection for block-sparse attention (Triton): which key blocks each query block attends to.

For every (batch, head, query block) it picks the fewest key blocks whose estimated attention mass reaches a
cumulative threshold, and writes them straight into the compact ``(block_index, block_count)`` lists that
:func:`~diffusers_block.kernels.block_sparse_attention.block_sparse_attention` consumes: no dense mask, no sort, no
host sync.

Estimate, per row of key blocks (``scoring``):
  * "mean": the block score of query block ``i`` and key block ``j`` is ``scale * mean(q_i) . mean(k_j) + log(n_j)``
    (``n_j`` the tokens in key block ``j``, so a short tail block counts for its size); a softmax over ``j`` turns a
    row of scores into block masses that sum to one (:func:`~.reference.pooled_block_mass`).
  * "antidiagonal" (XAttention): per stride row, a softmax over the antidiagonal means of ``stride x stride``
    logit tiles, summed per key block and averaged over the block's stride rows
    (:func:`~.reference.antidiagonal_block_mass`).

Choice per row: key blocks are ranked by mass, "forced" blocks first (the key blocks of text tokens, the query's
own block and its ``local_blocks`` neighbours); the row keeps the shortest prefix of that ranking whose mass
reaches ``threshold`` (per head), at least ``min_blocks`` and at most ``max_blocks`` long, but never fewer than the
forced blocks. Query blocks inside ``dense_queries`` (text queries of joint attention) keep everything up to
``max_blocks``. The kernel finds the cut without sorting: it bisects (31 steps, on the float's bit pattern) the
largest mass value ``c`` such that the blocks with mass >= c satisfy the rule, then compacts them in ascending block
order with a prefix sum. Ties at the cut are all kept (the reference, which sorts, keeps one of them).

Mean scoring first pools q and k per block (:func:`~.token_gather.block_sums`, one program per block: a read at
memory bandwidth, unless ``gather_tokens`` handed the sums over), so the kernel itself reads only (B, H, NB, D) sums.
Layout of one program: ``BLOCK_Q`` query blocks of one (batch, head). Pass 1, mean scoring: the program scores its
query blocks' means against the key block sums in ``BLOCK_K``-wide tiles with ``tl.dot`` (fp32), keeping a running
max/sum per row (online softmax); the scores go to an fp32 scratch row ``(NQ, NK)`` per head. Pass 1, antidiagonal
scoring: per group of query blocks, one sweep over the keys: per stride row the running softmax max and
normaliser, and each tile's exponential sums per key block into a scratch (with the max they were taken at); a pass
over that scratch rescales them into block masses (no second sweep of logits). Pass 2 reloads each row (``NK_PAD`` =
next power of two of the key blocks) in groups of rows, bisects all rows of a group at once and writes the index.
On CPU without ``TRITON_INTERPRET=1`` the launcher runs :func:`select_blocks_reference`.
"""

from __future__ import annotations

import math
import os

import torch

from . import runtime
from .reference import select_blocks_reference
from .runtime import tl, triton
from .token_gather import block_sums

__all__ = ["select_blocks", "MAX_KEY_BLOCKS", "SCORINGS"]

#: Most key blocks per row the kernel holds in registers (4096 blocks of 64 = 262,144 tokens).
MAX_KEY_BLOCKS = 4096
#: Forced blocks get priority 2.0 (masses are <= 1); the bisection runs over the bit patterns [0, bits(2.0)) = [0, 2^30),
#: so 31 steps find the cut exactly.
BISECTION_STEPS = 31
#: Tiles under TRITON_INTERPRET.
INTERPRET_BLOCK_Q = 16
INTERPRET_BLOCK_K = 16
#: Pass 2 holds a (ROW_GROUP, NK_PAD) tile: ROW_GROUP = min(16, BLOCK_Q, PASS2_ELEMENTS // NK_PAD) rows at once.
PASS2_ELEMENTS = 8192
#: Scorings of a (query block, key block) pair: mean pooling (cheap, default) or XAttention's antidiagonal sums.
SCORINGS = {"mean": 0, "antidiagonal": 1}
#: Antidiagonal scoring: key blocks per tile of the sweep (KEY_BLOCKS * block_size / stride columns), and
#: query blocks whose stride rows are stacked into one tile (QUERY_BLOCKS * block_size / stride rows: 64 rows with
#: blocks of 128 and stride 8, a full tensor-core tile). BLOCK_Q must be a multiple of QUERY_BLOCKS. Measured on an
#: H100 at 32K tokens (query x key blocks per tile) with the earlier two sweeps: 4 x 8 took 2.9 / 2.8 ms (head dim
#: 64 / 128), 4 x 4 3.1 / 3.7, 8 x 4 6.4 / 5.7, 8 x 8 4.5 / 6.6, 2 x 8 5.8 / 4.3; one sweep at 4 x 8: 1.8 / 1.5 ms.
ANTIDIAGONAL_KEY_BLOCKS = 8
ANTIDIAGONAL_QUERY_BLOCKS = 4
#: tl.dot needs every tile dim >= 16 on the GPU. The antidiagonal tiles stack the stride rows (block_size / stride
#: per block) of ANTIDIAGONAL_QUERY_BLOCKS query and ANTIDIAGONAL_KEY_BLOCKS key blocks, so a block needs at least
#: MIN_STRIDE_ROWS of them (4: stride <= 32 with blocks of 128).
MIN_DOT = 16
MIN_STRIDE_ROWS = MIN_DOT // min(ANTIDIAGONAL_QUERY_BLOCKS, ANTIDIAGONAL_KEY_BLOCKS)
#: GPU autotune candidates (BLOCK_Q, BLOCK_K, num_warps). Mean scoring multiplies (BLOCK_Q, D) query means, so
#: it needs BLOCK_Q >= 16 (tl.dot); antidiagonal scoring walks its query blocks one by one, and small BLOCK_Q
#: spread the long sweeps over more programs. Mean scoring reads only the block sums: few warps suffice.
GPU_CONFIGS = [(16, 64, 4), (16, 64, 8), (16, 128, 4), (32, 64, 8), (16, 64, 2), (8, 64, 4), (8, 128, 4), (4, 64, 4)]
#: Software pipelining depth: the loops are short and memory-light; deeper pipelines only multiply shared memory
#: (the antidiagonal sweeps hold (R, D) and (D, KEY_COLS) tiles per stage).
NUM_STAGES = 2
#: DIFFUSERS_BLOCK_AUTOTUNE=0 (as for block_sparse_attention) skips autotuning and uses the first config.
AUTOTUNE = os.environ.get("DIFFUSERS_BLOCK_AUTOTUNE", "1") != "0"


if triton is not None:

    @triton.jit
    def _pooled_scores(
        QSum,
        KSum,
        Scores,
        bh,
        pid_q,
        qk_scale,
        SEQ_Q,
        SEQ_K,
        NK,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Mean pooling: scores this program's query blocks (means from their sums) against the key block sums
        (base-2 logits into the scratch rows) and returns the row max and sum."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        NQ = tl.cdiv(SEQ_Q, BLOCK_SIZE)
        blocks = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_mask = blocks < NQ
        q_sum = tl.load(
            QSum + (bh * NQ + blocks[:, None]) * HEAD_DIM + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q_count = tl.minimum(tl.maximum(SEQ_Q - blocks * BLOCK_SIZE, 0), BLOCK_SIZE)
        qm = q_sum / tl.maximum(q_count, 1).to(tl.float32)[:, None]
        score_rows = Scores + (bh * NQ + blocks[:, None]) * NK

        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for start in range(0, NK, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_mask = cols < NK
            ks = tl.load(
                KSum + (bh * NK + cols[None, :]) * HEAD_DIM + offs_d[:, None],
                mask=col_mask[None, :] & d_mask[:, None],
                other=0.0,
            )
            n_k = tl.maximum(tl.minimum(SEQ_K - cols * BLOCK_SIZE, BLOCK_SIZE), 1).to(tl.float32)
            # scale * mean(q_i) . mean(k_j) + log(n_j), in base 2
            s = tl.dot(qm, ks, input_precision=INPUT_PRECISION) * (qk_scale / n_k)[None, :] + tl.math.log2(n_k)[None, :]
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
            tl.store(score_rows + cols[None, :], s, mask=row_mask[:, None] & col_mask[None, :])
        return m_i, l_i

    @triton.jit
    def _antidiagonal_logits(
        q_base,
        k_base,
        stride_qs,
        stride_ks,
        q_rows,
        key_start,
        qk_scale,
        SEQ_Q,
        SEQ_K,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STRIDE: tl.constexpr,
        KEY_COLS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """(rows, KEY_COLS) antidiagonal logits (base 2) of the stride rows starting at tokens ``q_rows`` against
        KEY_COLS stride columns from ``key_start``: the mean over t of q[row + t] . k[col + S-1-t], scaled; tokens
        past the sequence count as zero vectors, columns starting past SEQ_K are -inf."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        k_rows = key_start + tl.arange(0, KEY_COLS) * STRIDE
        logits = tl.zeros([q_rows.shape[0], KEY_COLS], dtype=tl.float32)
        for t in range(0, STRIDE):  # a loop, not unrolled: one set of tile buffers in shared memory
            qt = tl.load(
                q_base + (q_rows + t).to(tl.int64)[:, None] * stride_qs + offs_d[None, :],
                mask=((q_rows + t) < SEQ_Q)[:, None] & d_mask[None, :],
                other=0.0,
            )
            kr = k_rows + (STRIDE - 1 - t)
            kt = tl.load(
                k_base + kr.to(tl.int64)[None, :] * stride_ks + offs_d[:, None],
                mask=(kr < SEQ_K)[None, :] & d_mask[:, None],
                other=0.0,
            )
            if DOT_FP32:  # interpreter only: its bf16 tl.dot is wrong
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            logits = tl.dot(qt, kt, logits, input_precision=INPUT_PRECISION)
        logits = logits * (qk_scale / STRIDE)
        return tl.where((k_rows < SEQ_K)[None, :], logits, float("-inf"))

    @triton.jit
    def _antidiagonal_masses(
        Scores,
        Partial,
        TileMax,
        q_base,
        k_base,
        stride_qs,
        stride_ks,
        bh,
        pid_q,
        qk_scale,
        SEQ_Q,
        SEQ_K,
        NK,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        STRIDE: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        QUERY_BLOCKS: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        """Antidiagonal scoring (XAttention): per stride row a softmax over every stride column of the sequence,
        summed per key block, averaged over the query block's stride rows that start inside the sequence; the block
        masses themselves go to the scratch rows. QUERY_BLOCKS query blocks at a time (their R stride rows stacked:
        tensor-core tiles of QUERY_BLOCKS * R rows), one sweep over the keys: each tile's exponentials, taken
        against the row's running max, are summed per key block into ``Partial`` (with that max in ``TileMax``),
        and a pass over that scratch rescales them to the final max and normaliser (no second sweep of logits)."""
        R: tl.constexpr = BLOCK_SIZE // STRIDE
        ROWS: tl.constexpr = QUERY_BLOCKS * R
        KEY_COLS: tl.constexpr = KEY_BLOCKS * R
        TILE: tl.constexpr = KEY_BLOCKS * BLOCK_SIZE
        NQ = tl.cdiv(SEQ_Q, BLOCK_SIZE)
        NT = tl.cdiv(SEQ_K, TILE)
        a = tl.arange(0, ROWS)
        for g in range(0, BLOCK_Q, QUERY_BLOCKS):
            row_block = pid_q * BLOCK_Q + g + a // R
            q_rows = row_block * BLOCK_SIZE + (a % R) * STRIDE
            row_ok = row_block < NQ
            scratch_row = (bh * NQ + row_block) * R + a % R
            m_r = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            l_r = tl.zeros([ROWS], dtype=tl.float32)
            for tile in range(0, NT):
                x = _antidiagonal_logits(
                    q_base, k_base, stride_qs, stride_ks, q_rows, tile * TILE, qk_scale, SEQ_Q, SEQ_K,
                    HEAD_DIM, BLOCK_D, STRIDE, KEY_COLS, INPUT_PRECISION, DOT_FP32,
                )  # fmt: skip
                m_new = tl.maximum(m_r, tl.max(x, 1))  # finite: every tile has a column inside the sequence
                e = tl.math.exp2(x - m_new[:, None])
                l_r = l_r * tl.math.exp2(m_r - m_new) + tl.sum(e, 1)
                m_r = m_new
                cols = tile * KEY_BLOCKS + tl.arange(0, KEY_BLOCKS)
                part = tl.sum(tl.reshape(e, [ROWS, KEY_BLOCKS, R]), 2)
                tl.store(
                    Partial + scratch_row[:, None] * NK + cols[None, :],
                    part,
                    mask=row_ok[:, None] & (cols < NK)[None, :],
                )
                tl.store(TileMax + scratch_row * NT + tile, m_new, mask=row_ok)
            # Weight of a stride row: 1 / (its normaliser x the valid stride rows of its block); 0 past SEQ_Q.
            valid_rows = tl.minimum(tl.maximum(tl.cdiv(SEQ_Q - row_block * BLOCK_SIZE, STRIDE), 1), R)
            weight = tl.where(q_rows < SEQ_Q, 1.0 / (l_r * valid_rows.to(tl.float32)), 0.0)
            blocks = pid_q * BLOCK_Q + g + tl.arange(0, QUERY_BLOCKS)
            tl.debug_barrier()  # the scratch rows were written by other threads of this program
            for tile in range(0, NT):
                cols = tile * KEY_BLOCKS + tl.arange(0, KEY_BLOCKS)
                valid = row_ok[:, None] & (cols < NK)[None, :]
                part = tl.load(Partial + scratch_row[:, None] * NK + cols[None, :], mask=valid, other=0.0)
                m_t = tl.load(TileMax + scratch_row * NT + tile, mask=row_ok, other=0.0)
                scale = tl.where(row_ok, tl.math.exp2(m_t - m_r) * weight, 0.0)
                per_block = tl.sum(tl.reshape(part * scale[:, None], [QUERY_BLOCKS, R, KEY_BLOCKS]), 1)
                tl.store(
                    Scores + (bh * NQ + blocks[:, None]) * NK + cols[None, :],
                    per_block,
                    mask=(blocks < NQ)[:, None] & (cols < NK)[None, :],
                )

    @triton.jit
    def _block_selection_fwd(
        Q,
        K,
        QSum,
        KSum,
        Threshold,
        Scores,
        Partial,
        TileMax,
        RowStats,
        BlockIndex,
        BlockCount,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        H,
        SEQ_Q,
        SEQ_K,
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
        BLOCK_SIZE: tl.constexpr,
        SCORING: tl.constexpr,
        STRIDE: tl.constexpr,
        KEY_BLOCKS: tl.constexpr,
        QUERY_BLOCKS: tl.constexpr,
        BISECTION_STEPS: tl.constexpr,
        NK_PAD: tl.constexpr,
        ROW_GROUP: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        head = bh % H
        off_b = bh // H
        NQ = tl.cdiv(SEQ_Q, BLOCK_SIZE)
        q_base = Q + off_b * stride_qb + head * stride_qh
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_mask = rows < NQ

        # Pass 1: block scores of this program's BLOCK_Q query blocks against every key block, into the scratch.
        if SCORING == 0:
            m_i, l_i = _pooled_scores(
                QSum, KSum, Scores, bh, pid_q, qk_scale, SEQ_Q, SEQ_K, NK,
                HEAD_DIM, BLOCK_D, BLOCK_SIZE, INPUT_PRECISION, BLOCK_Q, BLOCK_K,
            )  # fmt: skip
        else:
            _antidiagonal_masses(
                Scores, Partial, TileMax, q_base, K + off_b * stride_kb + head * stride_kh, stride_qs, stride_ks, bh,
                pid_q, qk_scale, SEQ_Q, SEQ_K, NK, HEAD_DIM, BLOCK_D, BLOCK_SIZE, STRIDE, KEY_BLOCKS, QUERY_BLOCKS,
                INPUT_PRECISION, DOT_FP32, BLOCK_Q,
            )  # fmt: skip
            m_i = tl.zeros([BLOCK_Q], dtype=tl.float32)  # the scratch holds masses already
            l_i = tl.full([BLOCK_Q], 1.0, dtype=tl.float32)
        tl.store(RowStats + (bh * NQ + rows) * 2, m_i, mask=row_mask)
        tl.store(RowStats + (bh * NQ + rows) * 2 + 1, l_i, mask=row_mask)
        tl.debug_barrier()  # pass 2 reads scores and row stats other threads of this program wrote

        # Pass 2: ROW_GROUP rows at a time (a (ROW_GROUP, NK_PAD) tile), bisect each row's mass cut in parallel and
        # write the compact lists. Rows in parallel matter: the 31 bisection steps are latency-bound reductions.
        tau_head = tl.load(Threshold + head)
        cols = tl.arange(0, NK_PAD)
        col_valid = cols < NK
        for g in range(0, BLOCK_Q, ROW_GROUP):
            grow = pid_q * BLOCK_Q + g + tl.arange(0, ROW_GROUP)
            grow_mask = grow < NQ
            m_r = tl.load(RowStats + (bh * NQ + grow) * 2, mask=grow_mask, other=0.0)
            l_r = tl.load(RowStats + (bh * NQ + grow) * 2 + 1, mask=grow_mask, other=1.0)
            valid = grow_mask[:, None] & col_valid[None, :]
            s = tl.load(Scores + (bh * NQ + grow[:, None]) * NK + cols[None, :], mask=valid, other=0.0)
            if SCORING == 0:
                mass = tl.where(valid, tl.math.exp2(s - m_r[:, None]) / l_r[:, None], 0.0)
            else:
                mass = s
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

    def _row_group(meta) -> int:
        """Rows bisected together in pass 2: a (ROW_GROUP, NK_PAD) tile of about PASS2_ELEMENTS values, at most 16
        rows and never more than the program's own BLOCK_Q rows (the scratch rows of other programs are theirs)."""
        return max(1, min(16, meta["BLOCK_Q"], PASS2_ELEMENTS // meta["NK_PAD"]))

    _block_selection_fwd = triton.heuristics({"ROW_GROUP": _row_group})(_block_selection_fwd)

    def _prune_configs(configs, named_args, **kwargs):
        if kwargs.get("SCORING", named_args.get("SCORING", 0)) == SCORINGS["mean"]:
            return [c for c in configs if c.kwargs["BLOCK_Q"] >= MIN_DOT]
        return [c for c in configs if c.kwargs["BLOCK_Q"] % ANTIDIAGONAL_QUERY_BLOCKS == 0]

    _block_selection_fwd_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=NUM_STAGES)
            for bq, bk, w in GPU_CONFIGS
        ],
        key=["NK_PAD", "HEAD_DIM", "SCORING", "STRIDE", "BLOCK_SIZE"],
        prune_configs_by={"early_config_prune": _prune_configs},
        # Pass 1 rewrites the scratch and pass 2 the lists every time: re-running a config is harmless.
    )(_block_selection_fwd)


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
    scoring: str = "mean",
    stride: int = 8,
    query_sums: torch.Tensor | None = None,
    key_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head, query block) the fewest key blocks reaching ``threshold`` of the estimated attention mass.

    Args:
        q: (B, H, S_q, D); k: (B, H, S_k, D); fp16/bf16/fp32, same device, any strides with a contiguous last dim.
        block_size: tokens per block (as in block_sparse_attention).
        threshold: cumulative mass to reach, in [0, 1]; a float, or a (H,) tensor (per-head thresholds). 1.0 keeps
            every block (up to max_blocks).
        min_blocks / max_blocks: bounds on the count per row (max None = no cap); forced blocks are always kept.
        local_blocks: key blocks within this distance of the query block's own index are always kept (its own
            block with 0; -1 keeps no neighbourhood). Meaningful for self-attention (S_q == S_k).
        forced_keys: token range [start, end) of keys whose blocks every row keeps (text tokens of joint attention).
        dense_queries: token range of queries whose blocks keep every key block (up to max_blocks).
        scale: softmax scale, default 1 / sqrt(D).
        scoring: "mean" (softmax of mean-pooled block logits, one read of q and k) or "antidiagonal" (XAttention:
            per stride row, the softmax of antidiagonal means of ``stride`` x ``stride`` logit tiles, summed per key
            block; about 1 / (4 stride) of dense attention's work, closer to the true block masses).
        stride: antidiagonal stride (a power of two dividing block_size; block_size / stride >= 4 on the GPU).
        query_sums / key_sums: fp32 (B, H, ceil(S / block_size), D) sums of q / k per block if already at hand
            (``gather_tokens`` returns them), for mean scoring; computed by :func:`~.token_gather.block_sums`
            otherwise (a pass over q and k at memory bandwidth, most of the selection's time).

    Returns:
        ``(block_index, block_count)``: int32 (B, H, NQ, W) with ascending block ids in the first ``count`` slots,
        and (B, H, NQ); W = min(NK, max(max_blocks, forced blocks + neighbourhood)).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be (B, H, S, D) with equal B, H, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {list(SCORINGS)}; got {scoring!r}")
    if scoring == "antidiagonal" and (
        not isinstance(stride, int) or stride < 1 or stride & (stride - 1) or block_size % stride
    ):
        raise ValueError(f"stride must be a power of two dividing block_size ({block_size}); got {stride!r}")
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    num_q_blocks, num_kv_blocks = math.ceil(s_q / block_size), math.ceil(s_k / block_size)
    for name, sums, blocks in (("query_sums", query_sums, num_q_blocks), ("key_sums", key_sums, num_kv_blocks)):
        if sums is not None and tuple(sums.shape) != (batch, heads, blocks, head_dim):
            raise ValueError(
                f"{name} must have shape (B, H, ceil(S / block_size), D) = {(batch, heads, blocks, head_dim)}; "
                f"got {tuple(sums.shape)}"
            )
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
        scoring=scoring,
        stride=stride,
    )
    if not runtime.use_triton(q):
        return select_blocks_reference(q, k, tau, **kwargs)
    if num_kv_blocks > MAX_KEY_BLOCKS:
        raise ValueError(
            f"{num_kv_blocks} key blocks > {MAX_KEY_BLOCKS} supported by the selection kernel; use a larger block_size"
        )
    if scoring == "antidiagonal" and not runtime.INTERPRET and block_size // stride < MIN_STRIDE_ROWS:
        raise ValueError(
            f"antidiagonal scoring on the GPU needs block_size / stride >= {MIN_STRIDE_ROWS}; got {block_size} / {stride}"
        )

    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if scoring == "mean":
        query_sums, key_sums = (
            (block_sums(x, block_size) if sums is None else sums).to(torch.float32).contiguous()
            for x, sums in ((q, query_sums), (k, key_sums))
        )
    else:
        query_sums = key_sums = tau  # never read
    scores = torch.empty((batch * heads, num_q_blocks, num_kv_blocks), device=q.device, dtype=torch.float32)
    if scoring == "antidiagonal":  # per stride row: exponential sums per key block, and the max they were taken at
        rows = (batch * heads, num_q_blocks, block_size // stride)
        partial = torch.empty((*rows, num_kv_blocks), device=q.device, dtype=torch.float32)
        tile_max = torch.empty(
            (*rows, math.ceil(s_k / (ANTIDIAGONAL_KEY_BLOCKS * block_size))), device=q.device, dtype=torch.float32
        )
    else:
        partial = tile_max = scores  # never read
    row_stats = torch.empty((batch * heads, num_q_blocks, 2), device=q.device, dtype=torch.float32)
    index = torch.zeros((batch, heads, num_q_blocks, width), device=q.device, dtype=torch.int32)
    count = torch.empty((batch, heads, num_q_blocks), device=q.device, dtype=torch.int32)
    args = (
        q,
        k,
        query_sums,
        key_sums,
        tau.contiguous(),
        scores,
        partial,
        tile_max,
        row_stats,
        index,
        count,
        scale * 1.4426950408889634,  # log2(e): softmax in base 2
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        heads,
        s_q,
        s_k,
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
        "BLOCK_SIZE": block_size,
        "SCORING": SCORINGS[scoring],
        "STRIDE": stride,
        "KEY_BLOCKS": ANTIDIAGONAL_KEY_BLOCKS,
        "QUERY_BLOCKS": ANTIDIAGONAL_QUERY_BLOCKS,
        "BISECTION_STEPS": BISECTION_STEPS,
        "NK_PAD": nk_pad,
        # Means are fp32 (exact products); antidiagonal logits take q and k as they are, like attention does.
        "INPUT_PRECISION": "ieee" if scoring == "mean" or q.dtype == torch.float32 else "tf32",
        "DOT_FP32": runtime.INTERPRET and q.dtype == torch.bfloat16,
    }

    def grid(kw):
        return (triton.cdiv(num_q_blocks, kw["BLOCK_Q"]), batch * heads)

    if runtime.INTERPRET:
        meta.update(BLOCK_Q=INTERPRET_BLOCK_Q, BLOCK_K=INTERPRET_BLOCK_K)
        _block_selection_fwd[grid(meta)](*args, **meta)
    elif AUTOTUNE:
        with torch.cuda.device(q.device):
            _block_selection_fwd_autotuned[grid](*args, **meta)
    else:
        block_q, block_k, warps = GPU_CONFIGS[0] if scoring == "mean" else GPU_CONFIGS[-1]
        meta.update(BLOCK_Q=block_q, BLOCK_K=block_k)
        with torch.cuda.device(q.device):
            _block_selection_fwd[grid(meta)](*args, **meta, num_warps=warps, num_stages=NUM_STAGES)
    return index, count
