"""Antidiagonal block masses for the block selection (Triton): XAttention's scoring (arXiv 2503.16428).

Cut each block into ``block_size / stride`` stride rows (queries) and stride columns (keys); the logit of a stride row
and column is the mean along the antidiagonal of their ``stride x stride`` logit tile. Each stride row takes a softmax
over all columns; a block's mass is the sum over its columns, averaged over the query block's stride rows
(:func:`~.reference.antidiagonal_block_mass`). Rows of the (B * H, NQ, NK) output are masses (they sum to one), which
:func:`~.block_selection.select_blocks` cuts. About 1 / (4 stride) of dense attention's work, closer to the true block
masses than mean pooling.
On CPU without ``TRITON_INTERPRET=1`` the launcher runs the reference.
"""

from __future__ import annotations

import math

import torch

from . import runtime
from .reference import antidiagonal_block_mass
from .runtime import tl, triton

__all__ = ["antidiagonal_block_masses", "MIN_STRIDE_ROWS"]

LOG2E = 1.4426950408889634
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
#: Antidiagonal autotune candidates (BLOCK_Q query blocks per program, num_warps): small BLOCK_Q spread the long
#: sweeps over more programs.
ANTIDIAGONAL_CONFIGS = [(4, 4), (8, 4), (4, 8), (8, 8)]
#: Query blocks per program under TRITON_INTERPRET.
INTERPRET_BLOCK_Q = 8
#: Software pipelining depth: the sweeps are short and memory-light; deeper pipelines only multiply shared memory
#: (they hold (R, D) and (D, KEY_COLS) tiles per stage).
NUM_STAGES = 2


if triton is not None:

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
    def _antidiagonal_masses_fwd(
        Q,
        K,
        Scores,
        Partial,
        TileMax,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_ks,
        H,
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
        """Per stride row a softmax over every stride column of the sequence, summed per key block, averaged over
        the query block's stride rows that start inside the sequence; the block masses go to ``Scores``.
        QUERY_BLOCKS query blocks at a time (their R stride rows stacked: tensor-core tiles of QUERY_BLOCKS * R
        rows), one sweep over the keys: each tile's exponentials, taken against the row's running max, are summed
        per key block into ``Partial`` (with that max in ``TileMax``), and a pass over that scratch rescales them to
        the final max and normaliser (no second sweep of logits)."""
        pid_q = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        q_base = Q + (bh // H) * stride_qb + (bh % H) * stride_qh
        k_base = K + (bh // H) * stride_kb + (bh % H) * stride_kh
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

    _antidiagonal_masses_fwd_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_Q": block_q}, num_warps=warps, num_stages=NUM_STAGES)
            for block_q, warps in ANTIDIAGONAL_CONFIGS
        ],
        key=["NK", "HEAD_DIM", "STRIDE", "BLOCK_SIZE"],
        # every run rewrites the scratch and the masses: re-running a config is harmless
    )(_antidiagonal_masses_fwd)


def antidiagonal_block_masses(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, stride: int, scale: float
) -> torch.Tensor:
    """fp32 (B * H, NQ, NK) block masses of XAttention's antidiagonal scoring, q and k (B, H, S, D) with a
    contiguous last dim."""
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    num_q, num_k = math.ceil(s_q / block_size), math.ceil(s_k / block_size)
    if not runtime.use_triton(q):
        mass = antidiagonal_block_mass(q, k, block_size, stride, scale)
        return mass.to(torch.float32).reshape(batch * heads, num_q, num_k)
    if not runtime.INTERPRET and block_size // stride < MIN_STRIDE_ROWS:
        raise ValueError(
            f"antidiagonal scoring on the GPU needs block_size / stride >= {MIN_STRIDE_ROWS}; got {block_size} / {stride}"
        )
    masses = torch.empty((batch * heads, num_q, num_k), device=q.device, dtype=torch.float32)
    # per stride row: exponential sums per key block, and the max they were taken at
    rows = (batch * heads, num_q, block_size // stride)
    partial = torch.empty((*rows, num_k), device=q.device, dtype=torch.float32)
    tile_max = torch.empty(
        (*rows, math.ceil(s_k / (ANTIDIAGONAL_KEY_BLOCKS * block_size))), device=q.device, dtype=torch.float32
    )
    args = (
        q, k, masses, partial, tile_max, *q.stride()[:3], *k.stride()[:3], heads, scale * LOG2E, s_q, s_k, num_k,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_SIZE": block_size,
        "STRIDE": stride,
        "KEY_BLOCKS": ANTIDIAGONAL_KEY_BLOCKS,
        "QUERY_BLOCKS": ANTIDIAGONAL_QUERY_BLOCKS,
        # the logits take q and k as they are, like attention does
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "DOT_FP32": runtime.INTERPRET and q.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
    }

    def grid(kw):
        return (triton.cdiv(num_q, kw["BLOCK_Q"]), batch * heads)

    block_q, warps = ANTIDIAGONAL_CONFIGS[0]
    runtime.launch_tuned(
        _antidiagonal_masses_fwd,
        _antidiagonal_masses_fwd_autotuned,
        grid,
        args,
        meta,
        interpret={"BLOCK_Q": INTERPRET_BLOCK_Q},
        default={"BLOCK_Q": block_q, "num_warps": warps, "num_stages": NUM_STAGES},
        device=q.device,
    )
    return masses
