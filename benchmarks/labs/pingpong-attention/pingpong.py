"""FA-3's ping-pong for the Gluon Hopper kernel (lab variant of
``diffusers_block.kernels.block_sparse_attention_hopper``).

The package kernel's two consumer warpgroups (64 query rows each) run in lockstep: both issue their MMAs, both run
their softmax. FA-3 staggers them with two named barriers ("warp scheduler barriers"): a warpgroup issues its logits
and PV products only after the other warpgroup has issued its own, so one warpgroup's softmax runs while the other's
MMAs occupy the tensor cores. Within a warpgroup the order is FA-3's intra-warpgroup overlap:

    issue S_j = Q K_j^T;  issue O += P_{j-1} V_{j-1};  wait for S_j;  softmax(S_j) (under the PV product);
    wait for the PV product;  release tile j - 1;  O *= alpha_j;  P_j <- softmax

Gluon (Triton 3.6) has no named barrier, so ``bar.sync`` / ``bar.arrive`` are inline PTX run once per thread; the
barrier id is the warpgroup's (``%tid.x / 128``; the consumers are the default partition, warps 0-7).
"""

from __future__ import annotations

import importlib

hop = importlib.import_module("diffusers_block.kernels.block_sparse_attention_hopper")
gluon, gl = hop.gluon, hop.gl
mbarrier, tma = hop.mbarrier, hop.tma
warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait = (
    hop.warpgroup_mma,
    hop.warpgroup_mma_init,
    hop.warpgroup_mma_wait,
)
fence_async_shared = hop.fence_async_shared
triton = hop.triton

#: Named barrier ids of the two consumer warpgroups (Triton's own partition barriers use the low ids).
SCHEDULER_BARRIER = 8
THREADS_PER_WARPGROUP = 128


@gluon.jit
def _one_per_thread(value):
    """An int32 tensor holding ``value`` once per thread (inline PTX over it runs once per thread)."""
    warps: gl.constexpr = gl.num_warps()
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [warps], [0])
    return gl.full([32 * warps], value, gl.int32, layout=layout)


@gluon.jit
def _warpgroup(WG: gl.constexpr):
    """This thread's consumer warpgroup: ``WG``, or from ``%tid.x`` when both warpgroups share a partition (-1)."""
    if WG >= 0:
        return _one_per_thread(WG)
    else:
        return gl.inline_asm_elementwise(
            "shr.u32 $0, $1, 7;",
            "=r,r",
            [
                gl.inline_asm_elementwise(
                    "mov.u32 $0, %tid.x;", "=r,r", [_one_per_thread(0)], dtype=gl.int32, is_pure=True, pack=1
                )
            ],
            dtype=gl.int32,
            is_pure=True,
            pack=1,
        )


@gluon.jit
def _scheduler_sync(wg):
    """Wait until the other warpgroup has issued its MMAs (or, for warpgroup 0, the start signal)."""
    return gl.inline_asm_elementwise(
        """{
        .reg .u32 w;
        add.u32 w, $1, 8;
        bar.sync w, 256;
        mov.u32 $0, $1;
        }""",
        "=r,r",
        [wg],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _scheduler_arrive(wg, more):
    """Let the other warpgroup issue its MMAs (warpgroup 1's last signal is dropped: nobody waits for it)."""
    return gl.inline_asm_elementwise(
        """{
        .reg .u32 w;
        .reg .pred p;
        setp.ne.u32 p, $2, 0;
        setp.eq.or.u32 p, $1, 0, p;
        xor.b32 w, $1, 1;
        add.u32 w, w, 8;
        @p bar.arrive w, 256;
        mov.u32 $0, $1;
        }""",
        "=r,r,r",
        [wg, more],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _scheduler_start(wg):
    """Warpgroup 0 signals itself once: it goes first."""
    return gl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.eq.u32 p, $1, 0;
        @p bar.arrive 8, 256;
        mov.u32 $0, $1;
        }""",
        "=r,r",
        [wg],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, MASKED: gl.constexpr):
    """Online softmax of one logits tile (base 2): P, alpha, and the new statistics."""
    if MASKED:
        x = s * qk_scale + gl.expand_dims(gl.where(cols < SEQ_K, 0.0, float("-inf")), 0)
        m_new = gl.maximum(m_i, gl.max(x, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: avoid (-inf) - (-inf)
        p = gl.exp2(x - gl.expand_dims(m_safe, 1))
        alpha = gl.exp2(m_i - m_safe)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _fa3_step(
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
    o_layout: gl.constexpr,
    index_row,
    n_tiles,
    SEQ_K,
    NUM_KV_BLOCKS,
    TILES: gl.constexpr,
    BLOCK_SIZE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    EVEN_K: gl.constexpr,
    PINGPONG: gl.constexpr,
    WG: gl.constexpr,
):
    """Tile j: issue S_j and O += P_{j-1} V_{j-1}; softmax S_j under the PV product; then O *= alpha and the new P
    (in registers other than ``p``'s, which the PV product reads: the caller alternates two sets)."""
    slot = j % NUM_STAGES
    prev = (j + NUM_STAGES - 1) % NUM_STAGES
    mbarrier.wait(ready.index(slot), (j // NUM_STAGES) & 1)
    if PINGPONG:
        _scheduler_sync(_warpgroup(WG))
    s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
    if PINGPONG:
        _scheduler_arrive(_warpgroup(WG), _one_per_thread((j + 1 < n_tiles).to(gl.int32)))
    s = warpgroup_mma_wait(1, deps=(s,))
    if EVEN_K:
        p_next, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, offs_n, SEQ_K, False)
    else:
        cols = hop._tile_start(index_row, j, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N) + offs_n
        p_next, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, True)
    acc, p = warpgroup_mma_wait(0, deps=(acc, p))
    mbarrier.arrive(empty.index(prev))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
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
    PINGPONG: gl.constexpr,
    WG: gl.constexpr,
):
    warps: gl.constexpr = gl.num_warps()
    rows: gl.constexpr = q_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([rows], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([rows], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([rows, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([rows, BLOCK_N], gl.float32, layout=s_layout)
    qk_scale = sm_scale * 1.4426950408889634

    # Tile 0: logits, softmax (masked: also neutralises an empty list, whose slot holds no tile).
    mbarrier.wait(q_ready, 0)
    mbarrier.wait(ready.index(0), 0, pred=n_tiles > 0)
    if PINGPONG:
        _scheduler_start(_warpgroup(WG))
        _scheduler_sync(_warpgroup(WG))
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        _scheduler_arrive(_warpgroup(WG), _one_per_thread((n_tiles > 1).to(gl.int32)))
    s = warpgroup_mma_wait(0, deps=(s,))
    cols = hop._tile_start(index_row, 0, n_tiles, NUM_KV_BLOCKS, TILES, BLOCK_SIZE, BLOCK_N) + offs_n
    cols = gl.where(n_tiles > 0, cols, SEQ_K)
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, cols, SEQ_K, True)
    p_a = gl.convert_layout(p.to(dtype), p_layout)

    # Two tiles per iteration, P alternating between two register sets (with one set, ptxas waits for the PV
    # product before the softmax so that it can write the new P over the old).
    for t in range((n_tiles - 1) // 2):
        acc, p_b, m_i, l_i = _fa3_step(
            1 + 2 * t,
            p_a,
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
            o_layout,
            index_row,
            n_tiles,
            SEQ_K,
            NUM_KV_BLOCKS,
            TILES,
            BLOCK_SIZE,
            BLOCK_N,
            NUM_STAGES,
            EVEN_K,
            PINGPONG,
            WG,
        )
        acc, p_a, m_i, l_i = _fa3_step(
            2 + 2 * t,
            p_b,
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
            o_layout,
            index_row,
            n_tiles,
            SEQ_K,
            NUM_KV_BLOCKS,
            TILES,
            BLOCK_SIZE,
            BLOCK_N,
            NUM_STAGES,
            EVEN_K,
            PINGPONG,
            WG,
        )
    if n_tiles % 2 == 0 and n_tiles > 0:  # one tile left over
        acc, p_b, m_i, l_i = _fa3_step(
            n_tiles - 1,
            p_a,
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
            o_layout,
            index_row,
            n_tiles,
            SEQ_K,
            NUM_KV_BLOCKS,
            TILES,
            BLOCK_SIZE,
            BLOCK_N,
            NUM_STAGES,
            EVEN_K,
            PINGPONG,
            WG,
        )
        p_a = p_b

    last = (gl.maximum(n_tiles, 1) - 1) % NUM_STAGES
    acc = warpgroup_mma(p_a, v_smem.index(last), acc, is_async=True)
    acc, p_a = warpgroup_mma_wait(0, deps=(acc, p_a))

    # Epilogue: normalise (rows without a key: zero, whatever an empty list's slot held), lse, store.
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
    gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(m_mask, 1))
    gl.store(Lse + lse_base + offs_m, lse, mask=m_mask)


@gluon.jit
def _block_sparse_attn_fwd_pingpong(
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
    SPLIT_WARPGROUPS: gl.constexpr,
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
    CONSUMERS: gl.constexpr = 2 if SPLIT_WARPGROUPS else 1
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    fence_async_shared()

    out_base = off_b * stride_ob + off_h * stride_oh
    lse_base = off_bh.to(gl.int64) * SEQ_Q
    if SPLIT_WARPGROUPS:  # one partition per consumer warpgroup, 64 query rows each
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
                        PINGPONG,
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
                        PINGPONG,
                        1,
                    ),
                ),
                (
                    hop._producer,
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
                    _consumer_pingpong,
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
                        PINGPONG,
                        -1,
                    ),
                ),
                (
                    hop._producer,
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


def launch(
    q,
    k,
    v,
    out,
    out_rows,
    lse,
    block_index,
    block_count,
    sm_scale,
    block_size,
    config,
    pingpong=True,
    split=False,
    consumer_registers=240,
):
    """Run the lab kernel (``config``: ``(BLOCK_N, NUM_STAGES, BLOCK_M)``, required); the caller has checked
    the inputs and :func:`eligible`. ``out`` may have any strides; ``lse`` is (B, H, S_q) fp32."""
    block_n, num_stages, block_m = config
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    _block_sparse_attn_fwd_pingpong[grid](
        hop.descriptor(q, block_m),
        hop.descriptor(k, block_n),
        hop.descriptor(v, block_n),
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
        PRODUCER_WARPS=hop.PRODUCER_WARPS,
        PRODUCER_REGISTERS=hop.PRODUCER_REGISTERS,
        PINGPONG=pingpong,
        SPLIT_WARPGROUPS=split,
        CONSUMER_REGISTERS=consumer_registers,
        num_warps=block_m // 16 // (2 if split else 1),
        maxnreg=hop.MAX_REGISTERS_TWO_PER_SM if block_m == 64 else None,
    )
