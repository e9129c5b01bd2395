"""Plain PyTorch references for the Triton kernels in :mod:`diffusers_block.kernels`.

These are the ground truth the kernels are tested against and the CPU fallback the launchers use. They favour
clarity over speed (e.g. they materialise the dense ``(B, H, S_q, S_k)`` mask).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "block_means",
    "block_mask_from_index",
    "block_sizes",
    "block_sparse_attention_reference",
    "block_statistics",
    "block_sums_reference",
    "antidiagonal_block_mass",
    "dense_block_index",
    "gather_tokens_reference",
    "pooled_block_logits",
    "pooled_block_mass",
    "rotate_interleaved",
    "select_blocks_reference",
]


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
    approximation: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse (non-causal) attention via a dense boolean mask.

    ``q``: (B, H, S_q, D), ``k``/``v``: (B, H, S_k, D). Query block ``qb`` covers rows
    ``[qb * block_size, (qb + 1) * block_size)`` and attends to the key blocks listed in
    ``block_index[b, h, qb, :block_count[b, h, qb]]`` (tails of the last blocks are cut at ``S_q`` / ``S_k``).
    Rows that see no key (count 0) get zeros and an lse of ``-inf``. Computed in fp32 (fp64 for fp64 inputs, handy as
    a ground truth); the output has ``q``'s dtype, lse ``(B, H, S_q)`` is in the compute dtype (natural log).

    ``approximation`` (PISA-style) replaces dropping the skipped key blocks by a Taylor expansion of
    ``exp(q . k_t)`` around the block's mean key ``m_j``: ``exp(q.k_t) ~= exp(q.m_j) (1 + q.(k_t - m_j))`` (scaled
    logits). "zeroth" adds, per skipped block, ``exp(q.m_j) * sum_t v_t`` to the numerator and ``n_j exp(q.m_j)`` to
    the denominator; "first" also adds ``scale * q (sum_{skipped j} exp(q.m_j)) Hbar`` with ``Hbar`` the mean over
    all blocks of ``(K_j - m_j)^T V_j`` (see :func:`block_statistics`); the exact first-order term would use each
    block's own ``H_j``, one D x D product per block. The denominator has no first-order term (it sums to zero).
    """
    s_q, s_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    num_kv_blocks = math.ceil(s_k / block_size)
    block_mask = block_mask_from_index(block_index, block_count, num_kv_blocks)
    dense = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    dense = dense[..., :s_q, :s_k]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = q.to(compute)
    logits = torch.matmul(qc, k.to(compute).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~dense, float("-inf"))
    if approximation is None:
        lse = torch.logsumexp(logits, dim=-1)
        has_key = torch.isfinite(lse)
        probs = torch.exp(logits - torch.where(has_key, lse, torch.zeros_like(lse))[..., None])
        out = torch.matmul(probs, v.to(compute))
        out = torch.where(has_key[..., None], out, torch.zeros_like(out)).to(q.dtype)
        return (out, lse) if return_lse else out
    if approximation not in ("zeroth", "first"):
        raise ValueError(f"approximation must be None, 'zeroth' or 'first'; got {approximation!r}")

    key_mean, value_sum, counts, first_order = block_statistics(k, v, block_size)
    skipped = (~block_mask).repeat_interleave(block_size, dim=-2)[..., :s_q, :]  # (B, H, S_q, NK)
    coarse = torch.matmul(qc, key_mean.transpose(-1, -2)) * scale
    coarse = coarse.masked_fill(~skipped, float("-inf"))
    log_counts = torch.log(counts.to(compute))
    shift = torch.maximum(logits.amax(-1), (coarse + log_counts).amax(-1))
    has_key = torch.isfinite(shift)
    shift = torch.where(has_key, shift, torch.zeros_like(shift))[..., None]
    exact = torch.exp(logits - shift)
    approx = torch.exp(coarse - shift)  # exp(q.m_j), 0 for kept blocks
    numerator = torch.matmul(exact, v.to(compute)) + torch.matmul(approx, value_sum)
    if approximation == "first":
        numerator = numerator + scale * approx.sum(-1, keepdim=True) * torch.matmul(qc, first_order)
    denominator = exact.sum(-1) + (approx * counts.to(compute)).sum(-1)
    out = numerator / torch.where(has_key, denominator, torch.ones_like(denominator))[..., None]
    out = torch.where(has_key[..., None], out, torch.zeros_like(out)).to(q.dtype)
    lse = torch.where(has_key, shift[..., 0] + torch.log(denominator), torch.full_like(denominator, float("-inf")))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------
# Block statistics and block selection
# ---------------------------------------------------------------------------------------------------------------
def block_sums_reference(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of each block of ``block_size`` rows of ``x`` (B, H, S, D), in fp32 (fp64 for fp64): (B, H, NB, D), the
    last block possibly shorter (see :func:`~diffusers_block.kernels.token_gather.block_sums`). Reads ``x`` once,
    without an fp32 copy of it."""
    seq = x.shape[-2]
    full = seq // block_size
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = []
    if full:
        parts.append(x[..., : full * block_size, :].unflatten(-2, (full, block_size)).sum(-2, dtype=compute))
    if full * block_size < seq:
        parts.append(x[..., full * block_size :, :].sum(-2, keepdim=True, dtype=compute))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def block_means(
    x: torch.Tensor, block_size: int, *, return_counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block of ``block_size`` rows of ``x`` (B, H, S, D), in fp32 (fp64 for fp64): (B, H, NB, D).

    The last block may be shorter (its mean is over its own rows); ``return_counts`` also returns the int64 (NB,)
    number of rows per block.
    """
    sums = block_sums_reference(x, block_size)
    counts = block_sizes(x.shape[-2], block_size, device=x.device)
    means = sums / counts.to(sums.dtype)[:, None]
    return (means, counts) if return_counts else means


def block_sizes(seq: int, block_size: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 (ceil(seq / block_size),) tokens per block of a ``seq``-token sequence (the last block may be short)."""
    num_blocks = math.ceil(seq / block_size)
    counts = torch.full((num_blocks,), block_size, dtype=torch.int64, device=device)
    counts[-1] = seq - (num_blocks - 1) * block_size
    return counts


def block_statistics(
    k: torch.Tensor, v: torch.Tensor, block_size: int, *, first_order: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the approximation of skipped key blocks needs, per (batch, head), in fp32 (fp64 for fp64 inputs).

    Returns ``(key_mean, value_sum, counts, first_order)``: key means and value sums per block (B, H, NK, D), the
    int64 rows per block (NK,), and the mean first-order statistic ``(1 / NK) sum_j (K_j - mean_j)^T V_j`` (B, H, D,
    D), computed as ``(K^T V - sum_j mean_j value_sum_j^T) / NK`` (two products, no per-block D x D tensor), or
    zeros with ``first_order=False`` (what the zeroth-order approximation needs: it skips the products).
    """
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    key_mean, counts = block_means(k, block_size, return_counts=True)
    value_sum = block_means(v, block_size) * counts.to(compute)[:, None]
    if not first_order:
        return key_mean, value_sum, counts, key_mean.new_zeros(*k.shape[:-2], k.shape[-1], v.shape[-1])
    kv = torch.matmul(k.to(compute).transpose(-1, -2), v.to(compute))
    first_order = (kv - torch.matmul(key_mean.transpose(-1, -2), value_sum)) / len(counts)
    return key_mean, value_sum, counts, first_order


def pooled_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """(B, H, NQ, NK) block masses from mean pooling: the row softmax of :func:`pooled_block_logits`."""
    sums_q, sums_k = block_sums_reference(q, block_size), block_sums_reference(k, block_size)
    return torch.softmax(pooled_block_logits(sums_q, sums_k, q.shape[-2], k.shape[-2], block_size, scale), dim=-1)


def pooled_block_logits(
    query_sums: torch.Tensor, key_sums: torch.Tensor, seq_q: int, seq_k: int, block_size: int, scale: float
) -> torch.Tensor:
    """(B, H, NQ, NK) ``scale * mean(q_i) . mean(k_j) + log(n_j)`` from the per-block sums of q and k (sequences of
    ``seq_q`` / ``seq_k`` tokens; ``n_j`` the tokens of key block j, so a short tail block counts for its size)."""
    counts_q, counts_k = (block_sizes(seq, block_size, device=query_sums.device) for seq in (seq_q, seq_k))
    q_mean = query_sums / counts_q.to(query_sums.dtype)[:, None]
    k_mean = key_sums / counts_k.to(key_sums.dtype)[:, None]
    return torch.matmul(q_mean, k_mean.transpose(-1, -2)) * scale + torch.log(counts_k.to(q_mean.dtype))


def antidiagonal_block_mass(
    q: torch.Tensor, k: torch.Tensor, block_size: int, stride: int, scale: float
) -> torch.Tensor:
    """(B, H, NQ, NK) block masses from antidiagonal scoring (XAttention, arXiv 2503.16428).

    Cut each block into ``block_size / stride`` stride rows (queries) and stride columns (keys). The logit of stride
    row a and column c is the mean along the antidiagonal of their ``stride x stride`` logit tile,
    ``scale / stride * sum_t q[a*stride + t] . k[c*stride + stride-1-t]`` (tokens past the sequence are zero
    vectors; columns that start past it are left out). Each stride row takes a softmax over all columns; a block's
    mass is the sum over its columns, averaged over the query block's stride rows that start inside the sequence.
    Rows of the mass sum to one. Computed in fp32 (fp64 for fp64 inputs).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, s_q, dim = q.shape
    s_k = k.shape[2]
    num_q, num_k = math.ceil(s_q / block_size), math.ceil(s_k / block_size)
    rows = block_size // stride

    def padded(x: torch.Tensor, blocks: int) -> torch.Tensor:
        out = x.new_zeros(batch, heads, blocks * block_size, dim, dtype=compute)
        out[:, :, : x.shape[2]] = x.to(compute)
        return out.view(batch, heads, blocks * rows, stride, dim)

    qs = padded(q, num_q)
    ks = padded(k, num_k).flip(-2)  # offset stride-1-t against the query's t: the antidiagonal
    logits = torch.einsum("bhatd,bhctd->bhac", qs, ks) * (scale / stride)
    col_valid = torch.arange(num_k * rows, device=q.device) * stride < s_k
    logits = logits.masked_fill(~col_valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).view(batch, heads, num_q, rows, num_k, rows).sum(-1)
    row_valid = (torch.arange(num_q * rows, device=q.device) * stride < s_q).view(num_q, rows).to(compute)
    return (probs * row_valid[:, :, None]).sum(-2) / row_valid.sum(-1).clamp_min(1)[:, None]


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    threshold: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    min_blocks: int,
    max_blocks: int,
    width: int,
    local: int,
    force: tuple[int, int],
    dense: tuple[int, int],
    scoring: str = "mean",
    stride: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection rule of :mod:`.block_selection`, by sorting (see there for the arguments, already resolved to
    block ranges and clamped counts by :func:`~diffusers_block.kernels.block_selection.select_blocks`).

    Block masses come from :func:`pooled_block_mass` or :func:`antidiagonal_block_mass` (``scoring``); each row keeps the shortest
    prefix of the ranking (forced blocks first, then by mass) whose mass reaches the head's threshold (everything for
    ``dense`` rows, which max_blocks does not cap), clamped to [min_blocks, max_blocks] and to at least the forced blocks; written in ascending
    block order into ``width`` slots (unused slots hold 0).
    """
    if scoring == "antidiagonal":
        mass = antidiagonal_block_mass(q, k, block_size, stride, scale)
    else:
        mass = pooled_block_mass(q, k, block_size, scale)
    compute = mass.dtype
    batch, heads, num_q, num_k = mass.shape
    qb = torch.arange(num_q, device=q.device)[:, None]
    kb = torch.arange(num_k, device=q.device)[None, :]
    forced = ((kb >= force[0]) & (kb < force[1])) | ((kb - qb).abs() <= local)
    forced = forced.expand_as(mass)
    priority = torch.where(forced, torch.full_like(mass, 2.0), mass)
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    cumulative = torch.cumsum(torch.gather(mass, -1, order), dim=-1)
    tau = threshold.to(compute).view(1, heads, 1, 1).expand(batch, heads, num_q, 1)
    dense_rows = ((qb >= dense[0]) & (qb < dense[1])).view(1, 1, num_q, 1)
    tau = torch.where(dense_rows | (tau >= 1.0), torch.full_like(tau, 2.0), tau)  # 1.0 keeps everything
    k_len = torch.arange(1, num_k + 1, device=q.device)
    cap = torch.where(dense_rows, num_k, max_blocks)  # dense rows: no cap
    ok = ((cumulative >= tau) | (k_len >= cap)) & (k_len >= min_blocks)
    needed = torch.argmax(ok.to(torch.int8), dim=-1) + 1  # the first prefix length that satisfies the rule
    needed = torch.maximum(needed, forced.sum(-1))
    keep = torch.zeros_like(mass, dtype=torch.bool)
    keep.scatter_(-1, order, torch.arange(num_k, device=q.device).expand_as(order) < needed[..., None])
    count = keep.sum(-1).clamp(max=width)
    # Ascending block ids of the kept blocks first: sort the kept flags (stable) and take their positions.
    positions = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    slot = torch.arange(width, device=q.device)
    index = torch.where(slot < count[..., None], positions, torch.zeros_like(positions))
    return index.to(torch.int32).contiguous(), count.to(torch.int32)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding (``apply_rotary_emb`` in ``transformer_wan.py``), on (..., S, D) with
    (S, D) fp32 tables: interleaved pairs, fp32 arithmetic, one rounding to x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def gather_tokens_reference(
    x: torch.Tensor,
    perm: torch.Tensor | None = None,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rotate(x)[:, :, perm]`` contiguous (B, H, S, D), and with ``block_size`` the fp32 (fp64 for fp64) per-block
    sums of the result (see :func:`~diffusers_block.kernels.token_gather.gather_tokens`); ``rotary`` tables are
    (S, D) in the original token order."""
    if rotary is not None:
        x = rotate_interleaved(x, *rotary)
    out = (x if perm is None else x.index_select(2, perm.long())).contiguous()
    if block_size is None:
        return out
    return out, block_sums_reference(out, block_size)
