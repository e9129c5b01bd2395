"""Block-sparse flash-attention forward for Hopper in Gluon: a TMA producer warp feeds the consumer warpgroups,
whose MMAs overlap their softmax (FlashAttention-3's structure).

Why a second kernel: the Triton-language kernel (:mod:`.block_sparse_attention`) waits for every ``tl.dot`` before the
softmax that reads it, and loads K/V with the warps that compute; at head dim 128 it stays near 80% of cuDNN. Gluon
(``triton.experimental``) exposes what FA-3 uses: warp specialization with register reallocation, TMA copies tracked
by mbarriers, and the asynchronous warpgroup MMA with explicit waits.

* Producer (a one-warp worker partition, 24 registers): per listed key tile, wait until the consumers freed its ring
  slot, then TMA-copy the K and V tiles into it; ``ready[slot]`` completes when the bytes land.
* Consumers, by ``BLOCK_M`` (16 query rows per warp):

  - 64 rows (head dim 64): one warpgroup, two CTAs per SM (:func:`_consumer`). Per tile ``j``, with ``S_j`` in
    registers: issue ``S_{j+1} = Q K_{j+1}^T``; online softmax of ``S_j`` (base 2, fp32) while ``S_{j+1}`` and
    ``O += P_{j-1} V_{j-1}`` run on the tensor cores; wait for both, release tile ``j - 1``'s slot, rescale ``O``,
    issue ``P_j V_j``. ``P``'s registers are the MMA's operand until its product retires, so ``P`` is carried through
    that wait (reusing them corrupts ``O``).
  - 128 rows (head dim 128): two warpgroups of 64 rows, each its own partition (:func:`_consumer_pingpong`), taking
    turns on the tensor cores (FA-3's ping-pong: a warpgroup issues its MMAs once the other has issued its own, through
    two named barriers), so one warpgroup's softmax runs under the other's MMAs. Within a warpgroup, FA-3's order:
    issue ``S_j`` and ``O += P_{j-1} V_{j-1}``, softmax ``S_j`` under the PV product, wait, rescale. Two tiles per loop
    iteration, ``P`` alternating between two register sets: with one set, ptxas waits for the PV product before the
    softmax so that it can write the new ``P`` over the old. (In one partition of eight warps, Triton's slot release
    synchronises both warpgroups every tile, which undoes the turns.)

Same contract as :func:`.block_sparse_attention.block_sparse_attention` for what it covers (fp16 or bf16, head dim
64 or 128, no approximation of skipped blocks, layouts a 2-D TMA view addresses: :func:`tma_view`). The launcher there
routes calls here (:func:`eligible`) where it measured faster than the Triton-language kernel: lists wide enough
by their mean count, not the index tensor's capacity (:func:`lists_wide_enough`; at head dim 64 dense lists and the
cached approximation's complement, at 128 from 8% of the blocks). Gluon's API moves between Triton releases (3.9 renamed the TMA copy), so the kernel runs on the versions it
was validated on (:data:`VALIDATED_TRITON`; ``DIFFUSERS_BLOCK_GLUON`` = ``0`` / ``1`` turns it off / on regardless)
and a compile or launch failure falls back to the Triton-language kernel on that device for the rest of the process
(:data:`FAST_PATH`). Measured in
``benchmarks/labs/gluon-hopper-attention/``, ``benchmarks/labs/pingpong-attention/`` and ``bench attention`` (H100, dense lists, share of cuDNN's
throughput at 32K / 75K tokens): head dim 64 97.0% / 95.2% (Triton-language kernel 90.2% / 90.8%), head dim 128 with
the ping-pong 90.9% / 90.9% (Triton-language kernel 83.7% / 77.9%, this kernel without the ping-pong 84.8% / 81.9%).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch

from . import runtime
from .runtime import triton

try:  # Gluon is experimental (Triton >= 3.5); without it the Triton-language kernel serves.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    IMPORTED = triton is not None
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Triton
    gluon = gl = TensorDescriptor = None
    IMPORTED = False

__all__ = [
    "CONFIG",
    "FAST_PATH",
    "eligible",
    "enabled",
    "launch",
    "lists_wide_enough",
    "mean_list_width",
    "tma_view",
    "turned_off",
    "wide_enough",
]

#: The lists' mean width where the caller knows it: a number, a function giving one (called only where the route
#: depends on it), or None (read from the counts there).
ListWidth = float | Callable[[], float] | None

#: (BLOCK_N, NUM_STAGES, BLOCK_M) per head dim the launcher routes here: the fastest of the labs' candidates on an
#: H100 (16 query rows per consumer warp). BLOCK_M 64 is one consumer warpgroup with a register cap that fits two CTAs
#: per SM; BLOCK_M 128 is two consumer warpgroups taking turns (``benchmarks/labs/pingpong-attention/``: 128-key tiles
#: spill there, 61-64% of cuDNN).
CONFIG = {64: (128, 3, 64), 128: (64, 4, 128)}
#: Triton releases whose Gluon API this kernel was validated on (major.minor).
VALIDATED_TRITON = ("3.6",)
#: DIFFUSERS_BLOCK_GLUON: "1" always tries the kernel where Gluon imports, "0" never, unset: validated Triton only.
SWITCH = os.environ.get("DIFFUSERS_BLOCK_GLUON")
#: Per head dim, lists at least this share of the key blocks wide go to this kernel, narrower ones to the
#: Triton-language kernel (``benchmarks/labs/pingpong-attention/list_width.py``, H100, device time, Triton-language /
#: this kernel). Head dim 64 (one warpgroup): 0.98-1.00x on lists of 12.5-50% of the blocks, so from half (dense lists,
#: the cached approximation's complement). Head dim 128 (the ping-pong): 1.01x / 1.08x at 12.5%, 1.005x / 1.06x at 10%,
#: 0.96x / 1.03x at 5% (32K / 75K tokens), so from 8%.
MIN_LIST_SHARE = {64: 0.5, 128: 0.08}
#: The producer is a one-warp worker with few registers; the first consumer warpgroup is the default partition (the
#: kernel's ``num_warps``). (With the producer as the default partition ptxas serialized the consumers' asynchronous
#: MMAs for want of registers.)
PRODUCER_WARPS = 1
PRODUCER_REGISTERS = 24
#: Query rows per consumer warpgroup (the m64 warpgroup MMA); BLOCK_M of two warpgroups runs the ping-pong.
WARPGROUP_ROWS = 64
#: Registers of the second consumer warpgroup's partition (the first gets what the producer gives up).
CONSUMER_REGISTERS = 240
#: One consumer warpgroup (BLOCK_M = 64): a 128-register launch cap lets two CTAs share an SM (the consumers get
#: 232 after reallocation), so one CTA's softmax overlaps the other's MMAs.
MAX_REGISTERS_TWO_PER_SM = 128
#: TMA needs 16-byte aligned addresses and strides.
TMA_ALIGNMENT = 16


def tma_view(t: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """The 2-D view (shape, strides) over a (B, H, S, D) tensor in which head (b, h)'s rows are rows
    ``row0 + s`` at columns ``[col0, col0 + D)`` with ``row0, col0 = divmod(b * stride_b + h * stride_h, stride_s)``:
    contiguous (B, H, S, D) is a (B*H*S, D) matrix, a (B, S, H, D) buffer seen as (B, H, S, D) is (B*S, H*D).
    None if the layout has no such view or TMA cannot address it (the caller falls back to the pointer kernel)."""
    batch, heads, seq, dim = t.shape
    sb, sh, ss, sd = t.stride()
    if sd != 1 or ss < dim or (ss * t.element_size()) % TMA_ALIGNMENT or t.data_ptr() % TMA_ALIGNMENT:
        return None
    offsets = [b * sb + h * sh for b in range(batch) for h in range(heads)]
    width = max(o % ss for o in offsets) + dim
    if width > ss:  # a head's row would run into the next row
        return None
    return [max(o // ss for o in offsets) + seq, width], [ss, 1]


if IMPORTED:

    @gluon.jit
    def _tile_start(
        index_row, t, n_tiles, NUM_KV_BLOCKS, TILES: gl.constexpr, BLOCK_SIZE: gl.constexpr, BLOCK_N: gl.constexpr
    ):
        """First key of tile ``t`` of the list (tiles past the list repeat its last block, or block 0 if empty)."""
        kv_block = gl.load(index_row + gl.minimum(t, gl.maximum(n_tiles - 1, 0)) // TILES)
        kv_block = gl.minimum(gl.maximum(kv_block, 0), NUM_KV_BLOCKS - 1)
        return kv_block * BLOCK_SIZE + (t % TILES) * BLOCK_N

    #: Named barriers 8 and 9 (Triton's own partition barriers take the low ids) order the two consumer warpgroups'
    #: MMAs (ping-pong); each counts both warpgroups' threads. Gluon has no named barrier: inline PTX, once per thread.
    SCHEDULER_BARRIER = gl.constexpr(8)
    SCHEDULER_THREADS = gl.constexpr(2 * 128)

    @gluon.jit
    def _one_per_thread(value):
        """An int32 tensor holding ``value`` once per thread (inline PTX over it runs once per thread)."""
        warps: gl.constexpr = gl.num_warps()
        return gl.full([32 * warps], value, gl.int32, layout=gl.BlockedLayout([1], [32], [warps], [0]))

    @gluon.jit
    def _named_barrier(barrier, arrive_only, when):
        """``bar.sync`` (wait for the barrier's thread count) or ``bar.arrive`` (count in, go on) on a named barrier, where
        ``when`` (int32) is not 0."""
        if arrive_only:
            asm: gl.constexpr = "{ .reg .pred p; setp.ne.u32 p, $3, 0; @p bar.arrive $1, $2; mov.u32 $0, $3; }"
        else:
            asm: gl.constexpr = "{ .reg .pred p; setp.ne.u32 p, $3, 0; @p bar.sync $1, $2; mov.u32 $0, $3; }"
        return gl.inline_asm_elementwise(
            asm,
            "=r,r,r,r",
            [_one_per_thread(barrier), _one_per_thread(SCHEDULER_THREADS), _one_per_thread(when)],
            dtype=gl.int32,
            is_pure=False,
            pack=1,
        )

    @gluon.jit
    def _softmax_start(q_smem, sm_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr):
        """A consumer's starting registers: key offsets within a tile, running max and sum, zero output, the logits'
        zero accumulator, the base-2 scale. Logits and output are warpgroup-MMA accumulators (warps along M)."""
        warps: gl.constexpr = gl.num_warps()
        rows: gl.constexpr = q_smem.type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([rows], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([rows], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([rows, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([rows, BLOCK_N], gl.float32, layout=s_layout)
        return offs_n, m_i, l_i, acc, s_zero, sm_scale * 1.4426950408889634  # log2(e): exp -> exp2

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, MASKED: gl.constexpr):
        """Online softmax of one logits tile in base 2: P, the rescale factor alpha, the new max and row sum. Masked:
        columns past ``SEQ_K`` are -inf, and a row with no valid key yet keeps P = 0 (no (-inf) - (-inf))."""
        if MASKED:
            x = s * qk_scale + gl.expand_dims(gl.where(cols < SEQ_K, 0.0, float("-inf")), 0)
            m_new = gl.maximum(m_i, gl.max(x, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(x - gl.expand_dims(m_safe, 1))
            alpha = gl.exp2(m_i - m_safe)
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _producer(
        q_desc,
        k_desc,
        v_desc,
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        ready,
        empty,
        index_row,
        n_tiles,
        q_row,
        q_col,
        k_row,
        k_col,
        v_row,
        v_col,
        NUM_KV_BLOCKS,
        TILES: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr,
    ):
        mbarrier.expect(q_ready, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_ready, q_smem)
        # The block index of the next tile is loaded one tile ahead: its latency hides behind the wait for a free
        # slot instead of delaying the copy (dense lists: 3.2% / 2.3% less time at head dim 64, 32K / 75K tokens).
        start = _tile_start(index_row, 0, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N)
        for t in range(n_tiles):
            slot = t % NUM_STAGES
            next_start = _tile_start(index_row, t + 1, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N)
            # the slot's previous tile (t - NUM_STAGES) must be released by the consumers
            mbarrier.wait(empty.index(slot), ((t // NUM_STAGES) & 1) ^ 1, pred=t >= NUM_STAGES)
            bar = ready.index(slot)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_row + start, k_col], bar, k_smem.index(slot))
            tma.async_copy_global_to_shared(v_desc, [v_row + start, v_col], bar, v_smem.index(slot))
            start = next_start

    @gluon.jit
    def _consumer(
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        ready,
        empty,
        Out,
        OutRows,
        Lse,
        index_row,
        n_tiles,
        sm_scale,
        out_base,
        lse_base,
        m_start,
        stride_om,
        SEQ_Q,
        SEQ_K,
        NUM_KV_BLOCKS,
        HEAD_DIM: gl.constexpr,
        TILES: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        EVEN_K: gl.constexpr,
        SCATTER_OUT: gl.constexpr,
    ):
        rows: gl.constexpr = q_smem.type.shape[0]
        dtype: gl.constexpr = q_smem.dtype
        offs_n, m_i, l_i, acc, s_zero, qk_scale = _softmax_start(q_smem, sm_scale, HEAD_DIM, BLOCK_N)
        o_layout: gl.constexpr = acc.type.layout
        acc = warpgroup_mma_init(acc)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P: PV's A operand

        # P of the PV product in flight: its registers are the MMA's A operand and must stay untouched until the
        # product retires, so it is carried through the wait that retires it (reusing them corrupts the output).
        p_in_flight = gl.zeros([rows, BLOCK_N], dtype, layout=p_layout)
        mbarrier.wait(q_ready, 0)
        mbarrier.wait(ready.index(0), 0, pred=n_tiles > 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        for j in range(n_tiles):
            # the next tile's logits (past the list: whatever the slot holds, never used)
            nxt = (j + 1) % NUM_STAGES
            mbarrier.wait(ready.index(nxt), ((j + 1) // NUM_STAGES) & 1, pred=j + 1 < n_tiles)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            # online softmax of this tile while S_{j+1} and P_{j-1} V_{j-1} run
            if EVEN_K:
                cols = offs_n
            else:
                cols = _tile_start(index_row, j, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N) + offs_n
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, not EVEN_K)
            p = gl.convert_layout(p.to(dtype), p_layout)
            acc, s, p_in_flight = warpgroup_mma_wait(0, deps=(acc, s_next, p_in_flight))
            # tile j - 1 is done with (its logits long ago, its PV product now): hand its slot back
            mbarrier.arrive(empty.index((j + NUM_STAGES - 1) % NUM_STAGES), pred=j > 0)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            acc = warpgroup_mma(p, v_smem.index(j % NUM_STAGES), acc, is_async=True)
            p_in_flight = p
        acc, p_in_flight = warpgroup_mma_wait(0, deps=(acc, p_in_flight))

        _store_output(
            acc, m_i, l_i, Out, OutRows, Lse, out_base, lse_base, m_start, stride_om, SEQ_Q, HEAD_DIM, SCATTER_OUT
        )

    @gluon.jit
    def _store_output(
        acc,
        m_i,
        l_i,
        Out,
        OutRows,
        Lse,
        out_base,
        lse_base,
        m_start,
        stride_om,
        SEQ_Q,
        HEAD_DIM: gl.constexpr,
        SCATTER_OUT: gl.constexpr,
    ):
        """Normalise, natural-log lse, store (row i to OutRows[i] when scattering). Rows without a key are zero and
        -inf, whatever an empty list's ring slot held."""
        o_layout: gl.constexpr = acc.type.layout
        rows: gl.constexpr = acc.type.shape[0]
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
        has_key = l_o > 0.0
        acc = gl.where(gl.expand_dims(has_key, 1), acc / gl.expand_dims(gl.where(has_key, l_o, 1.0), 1), 0.0)
        lse = gl.where(has_key, (m_o + gl.log2(gl.where(has_key, l_o, 1.0))) * 0.6931471805599453, float("-inf"))
        offs_m = m_start + gl.arange(0, rows, layout=gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        m_mask = offs_m < SEQ_Q
        if SCATTER_OUT:
            out_m = gl.load(OutRows + offs_m, mask=m_mask, other=0).to(gl.int64)
        else:
            out_m = offs_m.to(gl.int64)
        o_ptrs = Out + out_base + gl.expand_dims(out_m * stride_om, 1) + gl.expand_dims(offs_d, 0)
        gl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=gl.expand_dims(m_mask, 1))
        gl.store(Lse + lse_base + offs_m, lse, mask=m_mask)

    @gluon.jit
    def _pingpong_step(
        j,
        p,
        acc,
        m_i,
        l_i,
        q_smem,
        k_smem,
        v_smem,
        ready,
        empty,
        qk_scale,
        s_zero,
        offs_n,
        index_row,
        n_tiles,
        SEQ_K,
        NUM_KV_BLOCKS,
        TILES: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        EVEN_K: gl.constexpr,
        WARPGROUP: gl.constexpr,
    ):
        """Tile ``j`` in FA-3's order, in this warpgroup's turn: issue ``S_j`` and ``O += P_{j-1} V_{j-1}``, let the
        other warpgroup issue its own, softmax ``S_j`` under the PV product, wait, release tile ``j - 1``, rescale.
        Returns the new P in registers other than ``p``'s (the PV product reads those until the wait)."""
        slot = j % NUM_STAGES
        prev = (j + NUM_STAGES - 1) % NUM_STAGES
        # the tile's first key, loaded before the MMAs (loaded after them, ptxas waited for the PV product there)
        start = 0
        if not EVEN_K:
            start = _tile_start(index_row, j, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N)
        mbarrier.wait(ready.index(slot), (j // NUM_STAGES) & 1)
        _named_barrier(SCHEDULER_BARRIER + WARPGROUP, False, 1)  # our turn
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
        # the other's turn (warpgroup 1's signal after the last tile would find nobody waiting)
        _named_barrier(SCHEDULER_BARRIER + 1 - WARPGROUP, True, ((j + 1 < n_tiles) | (WARPGROUP == 0)).to(gl.int32))
        s = warpgroup_mma_wait(1, deps=(s,))
        cols = start + offs_n
        p_next, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, not EVEN_K)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(empty.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
        return acc, gl.convert_layout(p_next.to(p.dtype), p.type.layout), m_i, l_i

    @gluon.jit
    def _consumer_pingpong(
        q_smem,
        k_smem,
        v_smem,
        q_ready,
        ready,
        empty,
        Out,
        OutRows,
        Lse,
        index_row,
        n_tiles,
        sm_scale,
        out_base,
        lse_base,
        m_start,
        stride_om,
        SEQ_Q,
        SEQ_K,
        NUM_KV_BLOCKS,
        HEAD_DIM: gl.constexpr,
        TILES: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        EVEN_K: gl.constexpr,
        SCATTER_OUT: gl.constexpr,
        WARPGROUP: gl.constexpr,
    ):
        dtype: gl.constexpr = q_smem.dtype
        offs_n, m_i, l_i, acc, s_zero, qk_scale = _softmax_start(q_smem, sm_scale, HEAD_DIM, BLOCK_N)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)

        # Tile 0's logits (warpgroup 0 goes first) and softmax, masked: that also zeroes P for an empty list.
        mbarrier.wait(q_ready, 0)
        mbarrier.wait(ready.index(0), 0, pred=n_tiles > 0)
        if WARPGROUP == 0:
            _named_barrier(SCHEDULER_BARRIER, True, 1)
        _named_barrier(SCHEDULER_BARRIER + WARPGROUP, False, 1)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _named_barrier(SCHEDULER_BARRIER + 1 - WARPGROUP, True, ((n_tiles > 1) | (WARPGROUP == 0)).to(gl.int32))
        s = warpgroup_mma_wait(0, deps=(s,))
        cols = _tile_start(index_row, 0, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N) + offs_n
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, gl.where(n_tiles > 0, cols, SEQ_K), SEQ_K, True)
        p_a = gl.convert_layout(p.to(dtype), p_layout)

        # Two tiles per iteration, P alternating between two register sets.
        for t in range((n_tiles - 1) // 2):
            acc, p_b, m_i, l_i = _pingpong_step(
                1 + 2 * t, p_a, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qk_scale, s_zero, offs_n,
                index_row, n_tiles, SEQ_K, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N, NUM_STAGES, EVEN_K, WARPGROUP,
            )  # fmt: skip
            acc, p_a, m_i, l_i = _pingpong_step(
                2 + 2 * t, p_b, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qk_scale, s_zero, offs_n,
                index_row, n_tiles, SEQ_K, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N, NUM_STAGES, EVEN_K, WARPGROUP,
            )  # fmt: skip
        if n_tiles % 2 == 0 and n_tiles > 0:  # one tile left
            acc, p_b, m_i, l_i = _pingpong_step(
                n_tiles - 1, p_a, acc, m_i, l_i, q_smem, k_smem, v_smem, ready, empty, qk_scale, s_zero, offs_n,
                index_row, n_tiles, SEQ_K, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N, NUM_STAGES, EVEN_K, WARPGROUP,
            )  # fmt: skip
            p_a = p_b
        acc = warpgroup_mma(p_a, v_smem.index((gl.maximum(n_tiles, 1) - 1) % NUM_STAGES), acc, is_async=True)
        acc, p_a = warpgroup_mma_wait(0, deps=(acc, p_a))
        _store_output(
            acc, m_i, l_i, Out, OutRows, Lse, out_base, lse_base, m_start, stride_om, SEQ_Q, HEAD_DIM, SCATTER_OUT
        )

    @gluon.jit
    def _block_sparse_attn_fwd_hopper(
        q_desc,
        k_desc,
        v_desc,
        Out,
        OutRows,
        Lse,
        BlockIndex,
        BlockCount,
        sm_scale,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_om,
        H,
        SEQ_Q,
        SEQ_K,
        NUM_Q_BLOCKS,
        MAX_KV_BLOCKS,
        NUM_KV_BLOCKS,
        HEAD_DIM: gl.constexpr,
        BLOCK_SIZE: gl.constexpr,
        EVEN_K: gl.constexpr,
        SCATTER_OUT: gl.constexpr,
        BLOCK_N: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr,
        PRODUCER_REGISTERS: gl.constexpr,
        PINGPONG: gl.constexpr,
        CONSUMER_REGISTERS: gl.constexpr,
    ):
        TILES: gl.constexpr = BLOCK_SIZE // BLOCK_N
        rows: gl.constexpr = q_desc.block_type.shape[0]
        start_m = gl.program_id(0)
        off_bh = gl.program_id(1)
        off_b = (off_bh // H).to(gl.int64)
        off_h = (off_bh % H).to(gl.int64)
        list_row = off_bh.to(gl.int64) * NUM_Q_BLOCKS + (start_m * rows) // BLOCK_SIZE
        n_tiles = gl.minimum(gl.maximum(gl.load(BlockCount + list_row), 0), MAX_KV_BLOCKS) * TILES
        index_row = BlockIndex + list_row * MAX_KV_BLOCKS
        # (row, column) of this head's first row in each 2-D TMA view (see tma_view)
        q_off = off_b * stride_qb + off_h * stride_qh
        k_off = off_b * stride_kb + off_h * stride_kh
        v_off = off_b * stride_vb + off_h * stride_vh
        q_row = (q_off // stride_qm).to(gl.int32) + start_m * rows
        k_row = (k_off // stride_kn).to(gl.int32)
        v_row = (v_off // stride_vn).to(gl.int32)
        q_col = (q_off % stride_qm).to(gl.int32)
        k_col = (k_off % stride_kn).to(gl.int32)
        v_col = (v_off % stride_vn).to(gl.int32)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2 if PINGPONG else 1)  # one release per consumer partition
        fence_async_shared()

        out_base = off_b * stride_ob + off_h * stride_oh
        lse_base = off_bh.to(gl.int64) * SEQ_Q
        if PINGPONG:  # one partition per consumer warpgroup, 64 query rows each
            gl.warp_specialize(
                [
                    (
                        _consumer_pingpong,
                        (
                            q_smem.slice(0, rows // 2),
                            k_smem,
                            v_smem,
                            q_ready,
                            ready,
                            empty,
                            Out,
                            OutRows,
                            Lse,
                            index_row,
                            n_tiles,
                            sm_scale,
                            out_base,
                            lse_base,
                            start_m * rows,
                            stride_om,
                            SEQ_Q,
                            SEQ_K,
                            NUM_KV_BLOCKS,
                            HEAD_DIM,
                            TILES,
                            BLOCK_SIZE,
                            BLOCK_N,
                            NUM_STAGES,
                            EVEN_K,
                            SCATTER_OUT,
                            0,
                        ),
                    ),
                    (
                        _consumer_pingpong,
                        (
                            q_smem.slice(rows // 2, rows // 2),
                            k_smem,
                            v_smem,
                            q_ready,
                            ready,
                            empty,
                            Out,
                            OutRows,
                            Lse,
                            index_row,
                            n_tiles,
                            sm_scale,
                            out_base,
                            lse_base,
                            start_m * rows + rows // 2,
                            stride_om,
                            SEQ_Q,
                            SEQ_K,
                            NUM_KV_BLOCKS,
                            HEAD_DIM,
                            TILES,
                            BLOCK_SIZE,
                            BLOCK_N,
                            NUM_STAGES,
                            EVEN_K,
                            SCATTER_OUT,
                            1,
                        ),
                    ),
                    (
                        _producer,
                        (
                            q_desc,
                            k_desc,
                            v_desc,
                            q_smem,
                            k_smem,
                            v_smem,
                            q_ready,
                            ready,
                            empty,
                            index_row,
                            n_tiles,
                            q_row,
                            q_col,
                            k_row,
                            k_col,
                            v_row,
                            v_col,
                            NUM_KV_BLOCKS,
                            TILES,
                            BLOCK_SIZE,
                            BLOCK_N,
                            NUM_STAGES,
                        ),
                    ),
                ],
                [gl.num_warps(), PRODUCER_WARPS],
                [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
            )
        else:
            gl.warp_specialize(
                [
                    (
                        _consumer,
                        (
                            q_smem,
                            k_smem,
                            v_smem,
                            q_ready,
                            ready,
                            empty,
                            Out,
                            OutRows,
                            Lse,
                            index_row,
                            n_tiles,
                            sm_scale,
                            out_base,
                            lse_base,
                            start_m * rows,
                            stride_om,
                            SEQ_Q,
                            SEQ_K,
                            NUM_KV_BLOCKS,
                            HEAD_DIM,
                            TILES,
                            BLOCK_SIZE,
                            BLOCK_N,
                            NUM_STAGES,
                            EVEN_K,
                            SCATTER_OUT,
                        ),
                    ),
                    (
                        _producer,
                        (
                            q_desc,
                            k_desc,
                            v_desc,
                            q_smem,
                            k_smem,
                            v_smem,
                            q_ready,
                            ready,
                            empty,
                            index_row,
                            n_tiles,
                            q_row,
                            q_col,
                            k_row,
                            k_col,
                            v_row,
                            v_col,
                            NUM_KV_BLOCKS,
                            TILES,
                            BLOCK_SIZE,
                            BLOCK_N,
                            NUM_STAGES,
                        ),
                    ),
                ],
                [PRODUCER_WARPS],
                [PRODUCER_REGISTERS],
            )
        mbarrier.invalidate(q_ready)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))


#: Turned off per device after a compile or launch failure there (the Triton-language kernel serves it then).
FAST_PATH = runtime.FastPath("the Gluon Hopper attention kernel")


def enabled(device=None) -> bool:
    """Gluon imported, not switched off, not failed before (on ``device``, if given), and a validated Triton
    (unless switched on)."""
    if not IMPORTED or SWITCH == "0" or (device is not None and not FAST_PATH.available(device)):
        return False
    return SWITCH == "1" or ".".join(triton.__version__.split(".")[:2]) in VALIDATED_TRITON


def eligible(q, k, v, block_index, block_count, block_size: int, approximation, list_width: ListWidth = None) -> bool:
    """Whether this kernel serves a call (the inputs have passed the launcher's checks): a Hopper GPU, a head dim and
    dtype it covers, and lists wide enough by their actual width (:func:`lists_wide_enough`, checked last: it may
    read the counts)."""
    if not q.is_cuda or not enabled(q.device) or approximation is not None:
        return False
    head_dim = q.shape[-1]
    if head_dim not in CONFIG or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    block_n, _, block_m = CONFIG[head_dim]
    if block_size % max(block_n, block_m) or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    views = [tma_view(t) for t in (q, k, v)]
    if not all(view is not None and view[0][0] < 2**31 for view in views):  # TMA coordinates are int32
        return False
    return lists_wide_enough(head_dim, block_index, block_count, -(-k.shape[2] // block_size), list_width)


def wide_enough(head_dim: int, list_width: float, num_kv_blocks: int) -> bool:
    """Whether lists ``list_width`` blocks wide on average (of ``num_kv_blocks``) are faster here
    (:data:`MIN_LIST_SHARE`)."""
    return head_dim in MIN_LIST_SHARE and list_width >= MIN_LIST_SHARE[head_dim] * num_kv_blocks


def lists_wide_enough(
    head_dim: int, block_index, block_count, num_kv_blocks: int, list_width: ListWidth = None
) -> bool:
    """:func:`wide_enough` by the lists' actual width, the mean of ``block_count``, not the index tensor's capacity
    (``block_index.shape[-1]``: ``max_blocks``, or every key block when uncapped, however few a row lists).

    The capacity bounds every count, so a capacity under the share decides without reading the counts. Otherwise the
    width comes from ``list_width`` (a number, or a function giving one, called only here) or, if None, from the
    counts themselves: one device sync. Lists reused over several calls (the sparse attention hook reuses them for
    ``refresh_interval`` steps) pass it, computed once per selection."""
    capacity = block_index.shape[-1]
    if not wide_enough(head_dim, capacity, num_kv_blocks):
        return False
    if callable(list_width):
        list_width = list_width()
    if list_width is None:
        list_width = mean_list_width(block_count, capacity)
    return wide_enough(head_dim, list_width, num_kv_blocks)


def mean_list_width(block_count: torch.Tensor, capacity: int) -> float:
    """Mean listed key blocks per query block, counts clamped to ``[0, capacity]`` as the kernels clamp them (a host
    value: one device sync on a GPU)."""
    return float(block_count.clamp(0, capacity).float().mean())


@contextmanager
def turned_off():
    """Within the block, calls go to the Triton-language kernel (benchmarks compare the two)."""
    global SWITCH
    saved, SWITCH = SWITCH, "0"
    try:
        yield
    finally:
        SWITCH = saved


def descriptor(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """Host TMA descriptor over :func:`tma_view` of ``t`` with (block_rows, D) boxes."""
    shape, strides = tma_view(t)
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, t.shape[-1]], gl_dtype)
    return TensorDescriptor(t, shape, strides, [block_rows, t.shape[-1]], layout)


def launch(q, k, v, out, out_rows, lse, block_index, block_count, sm_scale, block_size, config=None):
    """Run the kernel (``config``: ``(BLOCK_N, NUM_STAGES, BLOCK_M)``, default :data:`CONFIG`; BLOCK_M 128 runs the
    ping-pong); the caller has checked the inputs and :func:`eligible`. ``out`` may have any strides; ``lse`` is
    (B, H, S_q) fp32."""
    block_n, num_stages, block_m = config or CONFIG[q.shape[-1]]
    pingpong = block_m == 2 * WARPGROUP_ROWS
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _block_sparse_attn_fwd_hopper[grid](
        descriptor(q, block_m),
        descriptor(k, block_n),
        descriptor(v, block_n),
        out,
        out_rows if out_rows is not None else block_count,
        lse,
        block_index,
        block_count,
        sm_scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        heads,
        seq_q,
        seq_k,
        block_index.shape[2],
        block_index.shape[3],
        triton.cdiv(seq_k, block_size),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        EVEN_K=seq_k % block_size == 0,
        SCATTER_OUT=out_rows is not None,
        BLOCK_N=block_n,
        NUM_STAGES=num_stages,
        PRODUCER_WARPS=PRODUCER_WARPS,
        PRODUCER_REGISTERS=PRODUCER_REGISTERS,
        PINGPONG=pingpong,
        CONSUMER_REGISTERS=CONSUMER_REGISTERS,
        num_warps=WARPGROUP_ROWS // 16 if pingpong else block_m // 16,
        maxnreg=MAX_REGISTERS_TWO_PER_SM if block_m == WARPGROUP_ROWS else None,
    )
