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
On CPU without ``TRITON_INTERPRET=1`` the launcher falls back to :func:`block_sparse_attention_reference`.
"""

from __future__ import annotations

import math
import os

import torch

from .reference import block_mask_from_index, block_sparse_attention_reference

try:  # Triton is Linux-only; the CPU fallback works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["block_sparse_attention", "MAX_HEAD_DIM", "MIN_BLOCK_SIZE"]

# ---------------------------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------------------------
#: Interpreter mode (Triton kernels run on CPU tensors through numpy): read once at import, like Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Largest supported head dim (register budget of one program).
MAX_HEAD_DIM = 128
#: Smallest supported ``block_size`` (``tl.dot`` needs tiles of at least 16); block sizes must be powers of two.
MIN_BLOCK_SIZE = 16
#: Tiles under TRITON_INTERPRET (one small config keeps CPU tests fast); clamped to ``block_size``.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32
#: GPU autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); tiles larger than ``block_size`` are pruned.
GPU_CONFIGS = [
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (32, 32, 4, 2),
    (16, 16, 4, 2),
]
#: Autotune key: retuned per head dim, block size, sequence lengths and dtype.
AUTOTUNE_KEY = ["SEQ_Q", "SEQ_K", "HEAD_DIM", "BLOCK_SIZE", "INPUT_PRECISION"]


if triton is not None:

    @triton.jit
    def _block_sparse_attn_fwd(
        Q,
        K,
        V,
        Out,
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
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
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
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:  # interpreter only: its bf16 tl.dot is wrong, so run bf16 dots in fp32
            q = q.to(tl.float32)
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp -> exp2

        for i in range(0, count):
            kv_block = tl.load(index_row + i)
            for j in range(0, BLOCK_SIZE // BLOCK_N):
                offs_n = kv_block * BLOCK_SIZE + j * BLOCK_N + offs_tile
                n_mask = (offs_n >= 0) & (offs_n < SEQ_K)
                k = tl.load(
                    k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None],
                    other=0.0,
                )
                if DOT_FP32:
                    k = k.to(tl.float32)
                qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
                qk = tl.where(n_mask[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # Rows that have seen no valid key yet keep m = -inf; shift by 0 instead to avoid (-inf) - (-inf).
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
                m_i = m_new

        has_key = l_i > 0.0
        acc = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(Lse + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=m_mask)

    def _prune_configs(configs, named_args, **kwargs):
        block_size = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    _block_sparse_attn_fwd_autotuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in GPU_CONFIGS
        ],
        key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_block_sparse_attn_fwd)


def _use_triton(q: torch.Tensor) -> bool:
    """Whether the launcher runs the Triton kernel (CUDA tensors, or any tensors under TRITON_INTERPRET=1)."""
    return triton is not None and (q.is_cuda or INTERPRET)


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

    if not _use_triton(q):
        if q.is_cuda:
            raise RuntimeError("block_sparse_attention on CUDA tensors needs triton")
        return block_sparse_attention_reference(
            q, k, v, block_index, block_count, block_size=block_size, scale=scale, return_lse=return_lse
        )

    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two >= {MIN_BLOCK_SIZE} for the Triton kernel; got {block_size}"
        )

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_index = block_index.contiguous()
    block_count = block_count.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, s_q), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    args = (
        q,
        k,
        v,
        out,
        lse,
        block_index,
        block_count,
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
    )
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_SIZE": block_size,
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter computes bf16 tl.dot wrongly (triton 3.9); upcast there. Never on the GPU.
        "DOT_FP32": INTERPRET and q.dtype == torch.bfloat16,
    }

    def grid(kw):
        return (triton.cdiv(s_q, kw["BLOCK_M"]), batch * heads)

    if INTERPRET:
        meta["BLOCK_M"] = min(INTERPRET_BLOCK_M, block_size)
        meta["BLOCK_N"] = min(INTERPRET_BLOCK_N, block_size)
        _block_sparse_attn_fwd[grid(meta)](*args, **meta)
    else:
        with torch.cuda.device(q.device):
            _block_sparse_attn_fwd_autotuned[grid](*args, **meta)
    return (out, lse) if return_lse else out
