"""Token gather with the rotary embedding applied on the way, in one pass (Triton).

Sparse attention attends in a permuted token order (3D tiles, text last). Done with ``index_select``, every layer
pays one read and one write of q, k and v for the gather, and Wan's processor already paid several fp32 passes for
its rotary embedding before that. This kernel does both in the single pass the gather needs anyway:

    out[b, h, i, :] = rotate(x[b, h, perm[i], :], cos[perm[i]], sin[perm[i]])     (rotation optional)

with the rotation of diffusers' Wan processor (``apply_rotary_emb`` in ``transformer_wan.py``: interleaved pairs,
fp32 arithmetic, rounded once to x's dtype)::

    out[2i]     = x[2i] * cos[2i] - x[2i+1] * sin[2i+1]
    out[2i + 1] = x[2i] * sin[2i+1] + x[2i+1] * cos[2i]

``x`` is (B, H, S, D) with any strides on B, H, S and a contiguous last dim (a transposed (B, S, H, D) projection
output is read in place); ``out`` is contiguous (B, H, S, D), what the attention kernel reads fastest. Optionally it
also writes the fp32 sums of ``out`` over blocks of ``block_size`` rows (B, H, NB, D), which the block selection
needs: pooling then costs no extra pass. One program handles one block of rows of one (batch, head), in chunks of
``CHUNK`` rows, so every block sum is written by one program (no atomics).

:func:`block_sums` runs the same kernel without the copy: the sums alone, for a selection that has no gather pass to
ride on. A separate pooling pass has every block to itself, one program each, so it reads at memory bandwidth; pooling
inside the selection kernel gave each program many blocks to read one after another, and the selection at 32K tokens
took twice the time of reading q and k.
On CPU without ``TRITON_INTERPRET=1`` the launchers run :func:`~.reference.gather_tokens_reference`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import runtime
from .reference import block_sums_reference, gather_tokens_reference
from .runtime import tl, triton

__all__ = ["block_sums", "gather_tokens"]

#: Rows per program when no block sums are asked for (any block size works; 128 rows x 128 dims = 32 KB of bf16).
DEFAULT_ROWS = 128
#: Rows loaded at once inside a program: CHUNK x BLOCK_D elements stay <= this (registers of 4 warps).
CHUNK_ELEMENTS = 4096
#: A memory-bound copy: 4 warps per program, no software pipelining needed beyond the default.
NUM_WARPS = 4
#: Block sums alone (no copy): rows loaded at once (CHUNK x BLOCK_D <= this) and warps per program. Measured on an
#: H100 (benchmarks/labs/block-selection, q of 32K / 75K tokens x 1536 wide, head dim 128, ms): 8192 / 2 warps
#: 0.042 / 0.091, 4096 / 2 0.042 / 0.091, 8192 / 4 0.048 / 0.099, 16384 / 4 0.046 / 0.090, 16384 / 8 0.051 / 0.102,
#: 4096 / 4 0.070 / 0.142; PyTorch's reduction 0.041 / 0.085.
SUMS_CHUNK_ELEMENTS = 8192
SUMS_NUM_WARPS = 2


if triton is not None:

    @triton.jit
    def _gather_tokens_fwd(
        X,
        Perm,
        Cos,
        Sin,
        Out,
        Sums,
        stride_xb,
        stride_xh,
        stride_xs,
        stride_cs,
        H,
        SEQ,
        NUM_BLOCKS,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
        CHUNK: tl.constexpr,
        PERMUTE: tl.constexpr,
        ROTATE: tl.constexpr,
        SUMS: tl.constexpr,
        COPY: tl.constexpr,
    ):
        # Heads are the fast grid axis: programs running together read the same rows of the rotary tables (fp32,
        # (S, D), shared by all heads), which then come from L2 instead of device memory once per head.
        bh = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1)
        off_b = bh // H
        off_h = bh % H
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        x_base = X + off_b * stride_xb + off_h * stride_xh
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, ROWS, CHUNK):
            in_block = start + tl.arange(0, CHUNK)
            rows = pid_s * ROWS + in_block
            r_mask = (rows < SEQ) & (in_block < ROWS)  # ROWS need not be a multiple of CHUNK
            mask = r_mask[:, None] & d_mask[None, :]
            if PERMUTE:
                src = tl.load(Perm + rows, mask=r_mask, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            # Whole rows, contiguous (16-byte vector loads); the (2i, 2i+1) pairs are split apart in registers.
            x = tl.load(x_base + src[:, None] * stride_xs + offs_d[None, :], mask=mask, other=0.0)
            if ROTATE:
                table = src[:, None] * stride_cs + offs_d[None, :]
                x1, x2 = tl.split(tl.reshape(x.to(tl.float32), [CHUNK, BLOCK_D // 2, 2]))
                cos, _ = tl.split(tl.reshape(tl.load(Cos + table, mask=mask, other=0.0), [CHUNK, BLOCK_D // 2, 2]))
                _, sin = tl.split(tl.reshape(tl.load(Sin + table, mask=mask, other=0.0), [CHUNK, BLOCK_D // 2, 2]))
                y = tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), [CHUNK, BLOCK_D]).to(x.dtype)
            else:
                y = x
            if COPY:
                tl.store(Out + (bh * SEQ + rows[:, None]) * HEAD_DIM + offs_d[None, :], y, mask=mask)
            if SUMS:
                total += tl.sum(tl.where(mask, y.to(tl.float32), 0.0), 0)
        if SUMS:
            tl.store(Sums + (bh * NUM_BLOCKS + pid_s) * HEAD_DIM + offs_d, total, mask=d_mask)


def _rotary_tables(rotary, seq: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) as fp32 (S, D) views (Wan passes (1, S, 1, D)); raises if they do not fit the sequence."""
    cos, sin = rotary
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
        raise TypeError("rotary must be a (cos, sin) pair of tensors")
    if cos.shape != sin.shape or cos.numel() != seq * head_dim or cos.shape[-1] != head_dim:
        raise ValueError(
            f"rotary tables {tuple(cos.shape)} / {tuple(sin.shape)} do not fit {seq} tokens x {head_dim} dims; "
            "pass (cos, sin) of shape (S, D) or (1, S, 1, D) in the original token order"
        )
    cos, sin = (t.reshape(seq, head_dim).to(device=device, dtype=torch.float32) for t in (cos, sin))
    return cos.contiguous(), sin.contiguous()


def gather_tokens(
    x: torch.Tensor,
    perm: torch.Tensor | None = None,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x[:, :, perm]`` as a contiguous (B, H, S, D) tensor, rotated by ``rotary`` on the way.

    Args:
        x: (B, H, S, D) fp16/bf16/fp32, any strides with a contiguous last dim.
        perm: int (S,) source token of each output row (None: identity).
        rotary: (cos, sin) fp32 tables, (S, D) or (1, S, 1, D), indexed by the *source* token (the original order),
            applied as diffusers' Wan processor does (interleaved pairs). None: no rotation.
        block_size: also return the fp32 (B, H, ceil(S / block_size), D) sums of the output rows per block.

    Returns:
        ``out``, or ``(out, block_sums)`` with ``block_size``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, S, D); got {tuple(x.shape)}")
    batch, heads, seq, head_dim = x.shape
    if perm is not None and (perm.dim() != 1 or perm.numel() != seq or perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"perm must be an int32/int64 (S,) = ({seq},) tensor; got {perm.dtype} {tuple(perm.shape)}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two; got {block_size!r}")
    if rotary is not None:
        rotary = _rotary_tables(rotary, seq, head_dim, x.device)
        if head_dim % 2:
            raise ValueError(f"the rotary embedding needs an even head dim; got {head_dim}")
    if not runtime.use_triton(x):
        return gather_tokens_reference(x, perm, rotary=rotary, block_size=block_size)

    out = torch.empty((batch, heads, seq, head_dim), device=x.device, dtype=x.dtype)
    sums = _launch(x, perm, rotary, out, block_size)
    return (out, sums) if block_size is not None else out


def block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 (B, H, ceil(S / block_size), D) sums of ``x`` (B, H, S, D) over blocks of ``block_size`` rows (the last
    block may be short): one read of ``x``, any strides with a contiguous last dim, any block size."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, S, D); got {tuple(x.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if not runtime.use_triton(x):
        return block_sums_reference(x, block_size)
    return _launch(x, None, None, None, block_size, SUMS_CHUNK_ELEMENTS, SUMS_NUM_WARPS)


def _launch(x, perm, rotary, out, block_size, chunk_elements=CHUNK_ELEMENTS, num_warps=NUM_WARPS):
    """One pass over ``x``: the (permuted, rotated) rows into ``out`` unless it is None, and with ``block_size`` the
    fp32 block sums, which it returns."""
    batch, heads, seq, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = block_size if block_size is not None else DEFAULT_ROWS
    num_blocks = math.ceil(seq / rows)
    sums = None
    if block_size is not None:
        sums = torch.empty((batch, heads, num_blocks, head_dim), device=x.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    unused = x  # pointer arguments a disabled feature never reads
    cos, sin = rotary if rotary is not None else (unused, unused)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gather_tokens_fwd[(batch * heads, num_blocks)](
            x,
            perm if perm is not None else unused,
            cos,
            sin,
            out if out is not None else unused,
            sums if sums is not None else unused,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            head_dim,
            heads,
            seq,
            num_blocks,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            ROWS=rows,
            CHUNK=max(1, min(triton.next_power_of_2(rows), chunk_elements // block_d)),
            PERMUTE=perm is not None,
            ROTATE=rotary is not None,
            SUMS=sums is not None,
            COPY=out is not None,
            num_warps=num_warps,
        )
    return sums
