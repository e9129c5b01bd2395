"""Block-sparse flash-attention forward (non-causal) in Triton.

Layout: ``q`` is (B, H, S_q, D) and ``k``/``v`` are (B, H, S_k, D), any strides on B/H/S but a contiguous last dim
(a tensor whose last-dim stride is not 1 is copied with ``.contiguous()``). Sequences are split into blocks of
``block_size`` rows; query block ``qb`` attends only to the key blocks
``block_index[b, h, qb, :block_count[b, h, qb]]`` (int32, shapes (B, H, num_q_blocks, max_kv_blocks) and
(B, H, num_q_blocks)). There is no dense mask. Tails (``S % block_size != 0``) are masked for queries and keys.

Semantics:
  * counts are clamped to ``[0, max_kv_blocks]``; query blocks with count 0 give zero output rows and lse ``-inf``;
  * listed key blocks must be unique and in ``[0, ceil(S_k / block_size))`` (``check_indices=True`` verifies this at
    the cost of a device sync; the kernel itself only masks keys outside ``[0, S_k)``, a duplicate counts twice);
  * lse is the fp32 natural-log log-sum-exp of the scaled logits per query row, shape (B, H, S_q).

The kernel follows the Triton fused-attention tutorial: online softmax in base 2, fp32 accumulators, inputs fp16,
bf16 or fp32 (fp32 dots use IEEE precision, not TF32; under the interpreter bf16 dots run in fp32 because its
bf16 ``tl.dot`` is wrong). A program handles ``BLOCK_M`` query rows (BLOCK_M divides
``block_size``) and walks each listed key block in ``BLOCK_N``-wide tiles (BLOCK_N divides ``block_size``).
Head dims up to 128 are supported; non-powers of two are padded to the next power of two (>= 16) and masked.
The key tail of the last block is not masked at the load (rows are clamped, or zero-filled by TMA) but by a -inf
bias, so the inner loop has no branch and is software-pipelined for any length.
On Hopper, K/V tiles can come through the tensor-memory copy engine (host TensorDescriptors); those configs race
the pointer ones in the autotuner (see TMA_CONFIGS). The output can be written into a given buffer (``out``, any
strides) and row ``i`` scattered to row ``out_rows[i]``: the inverse token permutation costs no pass of its own.
On CPU without ``TRITON_INTERPRET=1`` the launcher falls back to :func:`block_sparse_attention_reference`.
"""

from __future__ import annotations

import math
import os

import torch

from . import block_sparse_attention_hopper as hopper
from . import runtime
from .reference import block_mask_from_index, block_sparse_attention_reference, block_statistics
from .runtime import tl, triton

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = [
    "APPROXIMATIONS",
    "block_sparse_attention",
    "kept_block_mask",
    "MAX_HEAD_DIM",
    "MIN_BLOCK_SIZE",
    "skipped_block_lists",
]

# ---------------------------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------------------------
#: Largest supported head dim (register budget of one program).
MAX_HEAD_DIM = 128
#: Smallest supported ``block_size`` (``tl.dot`` needs tiles of at least 16); block sizes must be powers of two.
MIN_BLOCK_SIZE = 16
#: Tiles under TRITON_INTERPRET (one small config keeps CPU tests fast); clamped to ``block_size``.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32
#: GPU autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper: 128-row programs with 8 warps
#: (two warpgroups) are the fused-attention tutorial's best on H100; one warpgroup per 128 rows wins at head dim 128
#: (measured on an H100: 128 x 64 with 2 stages fits two programs per SM) and 128 x 128 at head dim 64 (0.89 of
#: cuDNN at 75K tokens, against 0.80 for 8 warps); the smaller ones serve small block sizes.
#: Tiles larger than ``block_size`` are pruned.
GPU_CONFIGS = [
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 3),
    (128, 64, 4, 2),
    (64, 128, 4, 2),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
    (16, 16, 4, 2),
]
#: Hopper (sm_90+) candidates that load K/V tiles with the tensor-memory copy engine (host TensorDescriptors);
#: they race the pointer configs above in one autotuner. DIFFUSERS_BLOCK_TMA=0 keeps to the pointer configs, and a
#: TMA compile or launch failure falls back to them on that device for the rest of the process (:data:`TMA_PATH`).
TMA_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
TMA = os.environ.get("DIFFUSERS_BLOCK_TMA", "1") != "0"
#: TMA needs 16-byte aligned base addresses and strides.
TMA_ALIGNMENT = 16
#: Autotune key: retuned per head dim, block size, sequence lengths, list width (so that dense lists and sparse
#: ones get their own tiles: few blocks per row favour other shapes), dtype and approximation order.
AUTOTUNE_KEY = ["SEQ_Q", "SEQ_K", "MAX_KV_BLOCKS", "HEAD_DIM", "BLOCK_SIZE", "INPUT_PRECISION", "APPROX", "SCATTER_OUT"]
#: Approximation of skipped key blocks -> the kernel's APPROX switch.
APPROXIMATIONS = {None: 0, "zeroth": 1, "first": 2}


if triton is not None:

    @triton.jit
    def _tile_probabilities(
        q,
        k,
        offs_n,
        SEQ_K,
        qk_scale,
        m_i,
        l_i,
        EVEN_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Logits of one tile (k as (D, BLOCK_N)) and the online-softmax bookkeeping in base 2 (tutorial arithmetic):
        returns (m_new, l_new, p, alpha). Columns past SEQ_K (the tail of the last key block) get a -inf bias."""
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION)
        if EVEN_K:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            qk = qk * qk_scale + tl.where(offs_n < SEQ_K, 0.0, float("-inf"))[None, :]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no valid key yet keeps m = -inf; shift by 0 to avoid (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        return m_new, l_i * alpha + tl.sum(p, 1), p, alpha

    @triton.jit
    def _attend_tile(
        q,
        k_base,
        v_base,
        offs_n,
        offs_d,
        d_mask,
        stride_kn,
        stride_vn,
        SEQ_K,
        qk_scale,
        m_i,
        l_i,
        acc,
        EVEN_K: tl.constexpr,
        EVEN_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """One BLOCK_N-wide tile of keys through pointers. Keys past SEQ_K are not masked at the load: their rows are
        clamped to the last key, so every load is unconditional and the loop has no branch (Triton pipelines only
        branch-free loop bodies); the -inf bias removes them. V is loaded after the logits, as in the tutorial:
        loaded with K, a V tile stays live in registers through the softmax."""
        if EVEN_K:
            rows = offs_n
        else:
            rows = tl.minimum(offs_n, SEQ_K - 1)
        k_ptrs = k_base + rows[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_d[None, :]
        if EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        if DOT_FP32:  # interpreter only: its bf16 tl.dot is wrong, so run bf16 dots in fp32
            k = k.to(tl.float32)
        m_new, l_i, p, alpha = _tile_probabilities(q, k, offs_n, SEQ_K, qk_scale, m_i, l_i, EVEN_K, INPUT_PRECISION)
        if EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _block_sparse_attn_fwd(
        Q,
        K,
        V,
        DescK,
        DescV,
        Out,
        OutRows,
        Lse,
        BlockIndex,
        BlockCount,
        KMean,
        VSum,
        KLog2Count,
        KeptMask,
        FirstOrder,
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
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_Q: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
        APPROX: tl.constexpr,
        SCATTER_OUT: tl.constexpr,
        USE_TMA: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_tile = tl.arange(0, BLOCK_N)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < SEQ_Q

        # Block list of this program's query block (BLOCK_M divides BLOCK_SIZE, so one program = one query block).
        q_block = (start_m * BLOCK_M) // BLOCK_SIZE
        list_row = off_bh.to(tl.int64) * NUM_Q_BLOCKS + q_block
        count = tl.load(BlockCount + list_row)
        count = tl.minimum(tl.maximum(count, 0), MAX_KV_BLOCKS)
        index_row = BlockIndex + list_row * MAX_KV_BLOCKS

        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        if EVEN_Q and EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:  # interpreter only: its bf16 tl.dot is wrong, so run bf16 dots in fp32
            q = q.to(tl.float32)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp -> exp2

        # One flat, branch-free loop over (listed block, tile of BLOCK_N keys), so that the compiler pipelines the
        # loads; tiles past SEQ_K are handled inside _attend_tile without a branch.
        # The next tile's block index is loaded one tile ahead, so its latency is not on the K/V loads' path.
        last = tl.maximum(count * TILES - 1, 0)
        kv_next = tl.load(index_row, mask=count > 0, other=0)
        for it in range(0, count * TILES):
            kv_block = kv_next
            kv_next = tl.load(index_row + tl.minimum(it + 1, last) // TILES)
            start_n = kv_block * BLOCK_SIZE + (it % TILES) * BLOCK_N
            offs_n = start_n + offs_tile
            if USE_TMA:  # Hopper: the copy engine fetches the tiles (zero-filled past SEQ_K and HEAD_DIM)
                coords = [off_b.to(tl.int32), off_h.to(tl.int32), start_n, 0]
                k = tl.reshape(DescK.load(coords), [BLOCK_N, BLOCK_D])
                m_i, l_i, p, alpha = _tile_probabilities(
                    q, tl.trans(k), offs_n, SEQ_K, qk_scale, m_i, l_i, EVEN_K, INPUT_PRECISION
                )
                v = tl.reshape(DescV.load(coords), [BLOCK_N, BLOCK_D])
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
            else:
                m_i, l_i, acc = _attend_tile(
                    q,
                    k_base,
                    v_base,
                    offs_n,
                    offs_d,
                    d_mask,
                    stride_kn,
                    stride_vn,
                    SEQ_K,
                    qk_scale,
                    m_i,
                    l_i,
                    acc,
                    EVEN_K,
                    EVEN_D,
                    INPUT_PRECISION,
                    DOT_FP32,
                )

        if APPROX > 0:
            # Skipped key blocks, approximated around their mean key (PISA): block j adds exp(q.kmean_j) * vsum_j to
            # the numerator and n_j * exp(q.kmean_j) to the denominator (zeroth order); the first-order term
            # sum_j exp(q.kmean_j) * scale * q (K_j - kmean_j)^T V_j uses the mean statistic of all blocks for every
            # j (one D x D product per row instead of one per block).
            stat_row = off_bh.to(tl.int64) * NUM_KV_BLOCKS
            e_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, NUM_KV_BLOCKS, BLOCK_N):
                cb = start + offs_tile
                c_mask = cb < NUM_KV_BLOCKS
                kept = tl.load(KeptMask + list_row * NUM_KV_BLOCKS + cb, mask=c_mask, other=1)
                skip = c_mask & (kept == 0)
                km = tl.load(
                    KMean + (stat_row + cb[None, :]) * HEAD_DIM + offs_d[:, None],
                    mask=c_mask[None, :] & d_mask[:, None],
                    other=0.0,
                )
                if DOT_FP32:
                    km = km.to(tl.float32)
                s = tl.dot(q, km, input_precision=INPUT_PRECISION) * qk_scale
                log2n = tl.load(KLog2Count + cb, mask=c_mask, other=0.0)
                s_den = tl.where(skip[None, :], s + log2n[None, :], float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_den, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.where(skip[None, :], tl.math.exp2(s - m_safe[:, None]), 0.0)  # exp(q.kmean_j), shifted
                alpha = tl.math.exp2(m_i - m_safe)
                vs = tl.load(
                    VSum + (stat_row + cb[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=c_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    vs = vs.to(tl.float32)
                l_i = l_i * alpha + tl.sum(p * tl.math.exp2(log2n)[None, :], 1)
                e_sum = e_sum * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(vs.dtype), vs, acc * alpha[:, None], input_precision=INPUT_PRECISION)
                m_i = m_new
            if APPROX > 1:
                fo = tl.load(
                    FirstOrder
                    + off_bh.to(tl.int64) * HEAD_DIM * HEAD_DIM
                    + offs_d[:, None] * HEAD_DIM
                    + offs_d[None, :],
                    mask=d_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    fo = fo.to(tl.float32)
                qh = tl.dot(q, fo, input_precision=INPUT_PRECISION)
                acc += (e_sum * sm_scale)[:, None] * qh

        has_key = l_i > 0.0
        acc = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        if SCATTER_OUT:  # row i goes to row OutRows[i] (the inverse token permutation, fused into the store)
            out_m = tl.load(OutRows + offs_m, mask=m_mask, other=0).to(tl.int64)
        else:
            out_m = offs_m
        o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + out_m[:, None] * stride_om + offs_d[None, :]
        if EVEN_Q and EVEN_D:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty))
            tl.store(Lse + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse)
        else:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
            tl.store(Lse + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=m_mask)

    def _prune_configs(configs, named_args, **kwargs):
        block_size = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size]
        if kwargs.get("APPROX", named_args.get("APPROX", 0)):  # the coarse pass adds registers: narrow tiles only
            kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 64 and c.num_stages <= 3] or kept
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    def _tma_block_shapes(nargs) -> None:
        """Pre-hook of the TMA configs: the host descriptors' boxes are one (BLOCK_N, BLOCK_D) tile of one head."""
        for name in ("DescK", "DescV"):
            if TensorDescriptor is not None and isinstance(nargs[name], TensorDescriptor):
                nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]

    _POINTER_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": False}, num_warps=w, num_stages=s)
        for bm, bn, w, s in GPU_CONFIGS
    ]
    _TMA_CONFIGS = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": True}, num_warps=w, num_stages=s, pre_hook=_tma_block_shapes
        )
        for bm, bn, w, s in TMA_CONFIGS
    ]
    _block_sparse_attn_fwd_autotuned = triton.autotune(
        configs=_POINTER_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs}
    )(_block_sparse_attn_fwd)
    #: Where the copy engine can be used: pointer and TMA configs race, the autotuner keeps the faster.
    _block_sparse_attn_fwd_tma_autotuned = triton.autotune(
        configs=_POINTER_CONFIGS + _TMA_CONFIGS,
        key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_block_sparse_attn_fwd)


def default_config(block_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used without autotuning: the largest tiles that fit the block."""
    block_m, block_n = min(128, block_size), min(64, block_size)
    return block_m, block_n, 8 if block_m == 128 else 4, 3 if block_n >= 32 else 2


def _check_inputs(q, k, v, block_index, block_count, block_size) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("block_index", block_index), ("block_count", block_count)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, heads and head dim (layout B, H, S, D)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must be float16, bfloat16 or float32; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_index.dtype != torch.int32 or block_count.dtype != torch.int32:
        raise TypeError(f"block_index and block_count must be int32; got {block_index.dtype} and {block_count.dtype}")
    devices = {t.device for t in (q, k, v, block_index, block_count)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, block_index, block_count must be on one device; got {sorted(map(str, devices))}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    if s_q == 0 or s_k == 0 or head_dim == 0:
        raise ValueError(f"empty sequence or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    num_q_blocks = math.ceil(s_q / block_size)
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (batch, heads, num_q_blocks):
        raise ValueError(
            f"block_index must have shape (B, H, ceil(S_q / block_size), max_kv_blocks) = "
            f"({batch}, {heads}, {num_q_blocks}, *); got {tuple(block_index.shape)}"
        )
    if tuple(block_count.shape) != (batch, heads, num_q_blocks):
        raise ValueError(
            f"block_count must have shape (B, H, ceil(S_q / block_size)) = ({batch}, {heads}, {num_q_blocks}); "
            f"got {tuple(block_count.shape)}"
        )


def _check_output(q: torch.Tensor, out: torch.Tensor | None, out_rows: torch.Tensor | None) -> None:
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be a tensor of q's shape {tuple(q.shape)}, dtype {q.dtype} and device; got "
                f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
            )
        if out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dim (stride 1); pass a transposed buffer, not a copy")
    if out_rows is not None and (
        not isinstance(out_rows, torch.Tensor)
        or out_rows.dim() != 1
        or out_rows.numel() != q.shape[2]
        or out_rows.dtype not in (torch.int32, torch.int64)
        or out_rows.device != q.device
    ):
        raise ValueError(f"out_rows must be an int32/int64 ({q.shape[2]},) tensor on q's device (a permutation)")


def kept_block_mask(block_index: torch.Tensor, block_count: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """uint8 (B, H, NQ, NK): 1 where a key block is listed for the query block. No range check, no host sync (the
    approximation needs the complement: which blocks were skipped)."""
    width = block_index.shape[-1]
    valid = torch.arange(width, device=block_index.device) < block_count.long().clamp(0, width)[..., None]
    index = torch.where(valid, block_index.long().clamp(0, num_kv_blocks - 1), num_kv_blocks)
    kept = torch.zeros(*index.shape[:-1], num_kv_blocks + 1, dtype=torch.uint8, device=index.device)
    kept.scatter_(-1, index, 1)
    return kept[..., :num_kv_blocks].contiguous()


def skipped_block_lists(
    block_index: torch.Tensor, block_count: torch.Tensor, num_kv_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The complement of block lists: per query block, the key blocks it does not list, in ascending order, as
    ``(index, count)`` of width ``num_kv_blocks`` (int32, no host sync). Attending to both lists covers every key once,
    so the two results merge (by their lse) into dense attention."""
    skipped = kept_block_mask(block_index, block_count, num_kv_blocks) == 0
    index = torch.sort(skipped.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return index.to(torch.int32).contiguous(), skipped.sum(-1, dtype=torch.int32)


def _check_index_values(block_index: torch.Tensor, block_count: torch.Tensor, num_kv_blocks: int) -> None:
    """Raise ValueError if a used entry is out of range or repeated within its row (syncs on GPU)."""
    block_mask_from_index(block_index, block_count, num_kv_blocks)  # range check
    max_kv = block_index.shape[-1]
    valid = torch.arange(max_kv, device=block_index.device) < block_count.long().clamp(0, max_kv)[..., None]
    used = torch.where(valid, block_index.long(), torch.full_like(block_index, -1, dtype=torch.long))
    used = used.sort(dim=-1).values
    if bool(((used[..., 1:] == used[..., :-1]) & (used[..., 1:] >= 0)).any()):
        raise ValueError("block_index repeats a key block within the first block_count entries of a row")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    return_lse: bool = False,
    check_indices: bool = False,
    approximation: str | None = None,
    statistics: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    list_width: hopper.ListWidth = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Non-causal block-sparse attention ``softmax(q k^T * scale + block_mask) v``.

    Args:
        q: (B, H, S_q, D) fp16/bf16/fp32; k, v: (B, H, S_k, D), same dtype and device. Last dim contiguous.
        block_index: int32 (B, H, ceil(S_q / block_size), max_kv_blocks) key-block indices per query block.
        block_count: int32 (B, H, ceil(S_q / block_size)); only the first ``block_count`` entries of a row are used.
        block_size: rows per query/key block (power of two >= 16 for the Triton kernel; any for the CPU fallback).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the fp32 (B, H, S_q) natural-log log-sum-exp of the scaled, masked logits.
        check_indices: verify indices are in range and unique (device sync on GPU).
        approximation: None (skipped key blocks are dropped), "zeroth" or "first": skipped blocks are approximated
            around their mean key (see :func:`~diffusers_block.kernels.reference.block_sparse_attention_reference`).
        statistics: ``block_statistics(k, v, block_size)`` if already computed (e.g. shared by several calls).
        out: (B, H, S_q, D) tensor to write into (any strides, contiguous last dim; e.g. a transposed (B, S, H, D)
            buffer, which a processor then flattens for free); a new contiguous tensor if None.
        out_rows: int (S_q,): result row ``i`` is written to row ``out_rows[i]`` of ``out`` (a permutation: the
            inverse token reordering, fused into the store). lse stays in the input order.
        list_width: the mean of ``block_count`` (listed key blocks per query block) if the caller knows it, or a
            function giving it: the launcher routes by the lists' actual width, not ``block_index``'s capacity
            (:func:`~.block_sparse_attention_hopper.lists_wide_enough`). Needed only on Hopper where the capacity
            is wide enough for the Gluon kernel; None reads it from ``block_count`` there (one device sync), so
            lists reused over several calls should pass it.

    Returns:
        ``out`` (B, H, S_q, D) in q's dtype, or ``(out, lse)``. Query blocks with count 0 give zeros and lse -inf.
    """
    _check_inputs(q, k, v, block_index, block_count, block_size)
    batch, heads, s_q, head_dim = q.shape
    s_k = k.shape[2]
    num_q_blocks, max_kv_blocks = block_index.shape[2], block_index.shape[3]
    num_kv_blocks = math.ceil(s_k / block_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if check_indices:
        _check_index_values(block_index, block_count, num_kv_blocks)
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {list(APPROXIMATIONS)}; got {approximation!r}")

    _check_output(q, out, out_rows)

    if not runtime.use_triton(q):
        if q.is_cuda:
            raise RuntimeError("block_sparse_attention on CUDA tensors needs triton")
        result, lse = block_sparse_attention_reference(
            q,
            k,
            v,
            block_index,
            block_count,
            block_size=block_size,
            scale=scale,
            return_lse=True,
            approximation=approximation,
        )
        if out is not None or out_rows is not None:
            target = out if out is not None else torch.empty_like(result)
            target[:, :, out_rows.long() if out_rows is not None else slice(None)] = result
            result = target
        return (result, lse) if return_lse else result

    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two >= {MIN_BLOCK_SIZE} for the Triton kernel; got {block_size}"
        )

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_index = block_index.contiguous()
    block_count = block_count.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, s_q), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if approximation is None:
        key_mean = value_sum = log2_count = kept = first_order = q  # never read (APPROX = 0)
    else:
        key_mean, value_sum, counts, first_order = (
            block_statistics(k, v, block_size, first_order=approximation == "first")
            if statistics is None
            else statistics
        )
        # In q's dtype: the tensor cores take them like k and v (fp32 copies of q would not fit in registers).
        key_mean, value_sum, first_order = (t.to(q.dtype).contiguous() for t in (key_mean, value_sum, first_order))
        log2_count = torch.log2(counts.to(device=q.device, dtype=torch.float32)).contiguous()
        kept = kept_block_mask(block_index, block_count, num_kv_blocks)
    args = (
        q,
        k,
        v,
        k,  # DescK / DescV: TensorDescriptors on the TMA path, never read otherwise
        v,
        out,
        out_rows if out_rows is not None else block_count,  # never read without SCATTER_OUT
        lse,
        block_index,
        block_count,
        key_mean,
        value_sum,
        log2_count,
        kept,
        first_order,
        scale,
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
        s_q,
        s_k,
        num_q_blocks,
        max_kv_blocks,
        num_kv_blocks,
    )
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_SIZE": block_size,
        "EVEN_K": s_k % block_size == 0,
        "EVEN_Q": s_q % block_size == 0,
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter computes bf16 tl.dot wrongly (triton 3.9); upcast there. Never on the GPU.
        "DOT_FP32": runtime.INTERPRET and q.dtype == torch.bfloat16,
        "APPROX": APPROXIMATIONS[approximation],
        "SCATTER_OUT": out_rows is not None,
    }

    def grid(kw):
        return (triton.cdiv(s_q, kw["BLOCK_M"]), batch * heads)

    if runtime.INTERPRET:
        meta.update(BLOCK_M=min(INTERPRET_BLOCK_M, block_size), BLOCK_N=min(INTERPRET_BLOCK_N, block_size))
        _block_sparse_attn_fwd[grid(meta)](*args, **meta, USE_TMA=False)
        return (out, lse) if return_lse else out
    with torch.cuda.device(q.device):
        # Hopper, lists wide by their counts: the warp-specialized Gluon kernel (its docstring says why and when); a
        # compile or launch failure turns it off on this device and the Triton-language kernel serves the call.
        gluon = hopper.eligible(q, k, v, block_index, block_count, block_size, approximation, list_width)
        if gluon and hopper.FAST_PATH.run(
            q.device, lambda: hopper.launch(q, k, v, out, out_rows, lse, block_index, block_count, scale, block_size)
        ):
            return (out, lse) if return_lse else out
        if _tma_eligible(k, v, approximation):
            descriptors = tuple(
                TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d]) for t in (k, v)
            )
            tma_args = args[:3] + descriptors + args[5:]
            if TMA_PATH.run(q.device, lambda: _launch(tma_args, meta, grid, block_size, tma=True)):
                return (out, lse) if return_lse else out
        _launch(args, meta, grid, block_size, tma=False)
    return (out, lse) if return_lse else out


#: The TMA configs, turned off per device after a compile or launch failure there (pointer configs serve it then).
TMA_PATH = runtime.FastPath("the TMA configs of the block-sparse attention kernel")


def _tma_eligible(k: torch.Tensor, v: torch.Tensor, approximation: str | None) -> bool:
    """TMA descriptors are possible: Hopper or newer, 16-bit inputs, aligned, no approximation pass."""
    if not (TMA and TensorDescriptor is not None and approximation is None and TMA_PATH.available(k.device)):
        return False
    head_dim = k.shape[-1]
    if k.dtype not in (torch.float16, torch.bfloat16) or head_dim != triton.next_power_of_2(head_dim) or head_dim < 16:
        return False  # 16-bit tiles whose box is the whole head dim
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    return all(
        t.data_ptr() % TMA_ALIGNMENT == 0 and all(st * t.element_size() % TMA_ALIGNMENT == 0 for st in t.stride()[:-1])
        for t in (k, v)
    )


def _launch(args: tuple, meta: dict, grid, block_size: int, *, tma: bool) -> None:
    if runtime.AUTOTUNE:
        tuner = _block_sparse_attn_fwd_tma_autotuned if tma else _block_sparse_attn_fwd_autotuned
        tuner[grid](*args, **meta)
    else:
        block_m, block_n, warps, stages = default_config(block_size)
        meta = dict(meta, BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma)
        if tma:
            _tma_block_shapes({**dict(zip(("DescK", "DescV"), args[3:5])), **meta})
        _block_sparse_attn_fwd[grid(meta)](*args, **meta, num_warps=warps, num_stages=stages)
