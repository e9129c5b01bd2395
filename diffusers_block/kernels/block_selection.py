"""Block selection for block-sparse attention (Triton): which key blocks each query block attends to.

For every (batch, head, query block) it picks the fewest key blocks whose estimated attention mass reaches a
cumulative threshold, and writes them straight into the compact ``(block_index, block_count)`` lists that
:func:`~diffusers_block.kernels.block_sparse_attention.block_sparse_attention` consumes: no dense mask, no sort, no
host sync.

Estimate, per row of key blocks (``scoring``, kernels in :mod:`.block_logits` and :mod:`.antidiagonal_masses`):
  * "mean": the row softmax of ``scale * mean(q_i) . mean(k_j) + log(n_j)`` (:func:`~.reference.pooled_block_mass`),
    from per-block sums of q and k: :func:`~.token_gather.block_sums` pools them (one program per block, at memory
    bandwidth, most of the selection's time) unless ``gather_tokens`` handed them over on its way.
  * "antidiagonal" (XAttention): per stride row, a softmax over the antidiagonal means of ``stride x stride``
    logit tiles, summed per key block and averaged over the block's stride rows
    (:func:`~.reference.antidiagonal_block_mass`).

Choice per row (this module's kernel): key blocks are ranked by mass, "forced" blocks first (the key blocks of text
tokens, the query's own block and its ``local_blocks`` neighbours); the row keeps the shortest prefix of that ranking
whose mass reaches ``threshold`` (per head), at least ``min_blocks`` and at most ``max_blocks`` long, but never fewer
than the forced blocks. Query blocks inside ``dense_queries`` (text queries of joint attention) keep every block,
whatever ``max_blocks`` says. The kernel finds the cut without sorting: it bisects (31 steps, on the float's bit pattern) the
largest mass value ``c`` such that the blocks with mass >= c satisfy the rule, then compacts them in ascending block
order with a prefix sum. Ties at the cut are all kept (the reference, which sorts, keeps one of them).

One program cuts ``ROWS`` rows held whole in registers (``NK_PAD`` = next power of two of the key blocks), with as
few warps as keep about ``ROW_ELEMENTS_PER_THREAD`` values per thread: the 31 bisection steps are chains of row
reductions, cheapest inside one warp, and small programs keep many of them in flight per SM.
On CPU without ``TRITON_INTERPRET=1`` the launcher runs :func:`select_blocks_reference`.
"""

from __future__ import annotations

import math

import torch

from . import runtime
from .antidiagonal_masses import antidiagonal_block_masses
from .block_logits import mean_block_logits
from .reference import select_blocks_reference
from .runtime import tl, triton
from .token_gather import block_sums

__all__ = ["select_blocks", "MAX_KEY_BLOCKS", "SCORINGS"]

#: Most key blocks per row the kernel holds in registers (4096 blocks of 64 = 262,144 tokens).
MAX_KEY_BLOCKS = 4096
#: Forced blocks get priority 2.0 (masses are <= 1); the bisection runs over the bit patterns [0, bits(2.0)) = [0, 2^30),
#: so at most 31 steps find the cut exactly (it stops earlier once no bracket holds two blocks).
BISECTION_STEPS = 31
#: Scorings of a (query block, key block) pair: mean pooling (cheap, default) or XAttention's antidiagonal sums.
SCORINGS = {"mean": 0, "antidiagonal": 1}
#: Values of a row per thread: sets the warps of a program (NK_PAD / (32 * this), at least 1, at most 8). Four
#: (ROWS, NK_PAD) tensors live through the bisection; 32 values each stay clear of the 255-register cap.
ROW_ELEMENTS_PER_THREAD = 32
#: GPU autotune candidates: rows per program (each with the warps its row length needs, see _row_warps).
ROW_CONFIGS = [1, 2, 4]
#: Rows per program under TRITON_INTERPRET.
INTERPRET_ROWS = 4


if triton is not None:

    @triton.jit
    def _select_blocks_fwd(
        Scores,
        Threshold,
        BlockIndex,
        BlockCount,
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
        LOGITS: tl.constexpr,
        BISECTION_STEPS: tl.constexpr,
        NK_PAD: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = pid_q * ROWS + tl.arange(0, ROWS)
        row_mask = rows < NQ
        cols = tl.arange(0, NK_PAD)
        valid = row_mask[:, None] & (cols < NK)[None, :]
        s = tl.load(Scores + (bh * NQ + rows[:, None]) * NK + cols[None, :], mask=valid, other=float("-inf"))
        if LOGITS:  # base-2 logits: the row softmax, whole rows in registers
            p = tl.math.exp2(s - tl.max(s, 1)[:, None])
            mass = p / tl.sum(p, 1)[:, None]
        else:  # masses already
            mass = s
        mass = tl.where(valid, mass, 0.0)
        forced = ((cols >= FORCE_LO) & (cols < FORCE_HI))[None, :]
        forced = forced | (tl.abs(cols[None, :] - rows[:, None]) <= LOCAL)  # LOCAL = -1: no neighbourhood
        forced = forced & valid
        dense_row = (rows >= DENSE_LO) & (rows < DENSE_HI)
        cap = tl.where(dense_row, NK, MAX_BLOCKS)  # dense rows: no cap
        # A threshold of 1 keeps every block (fp32 masses can sum to 1 before the last block): like dense rows, ask
        # for more than any reachable mass, so that only the cap ends the row.
        tau = tl.where(dense_row, 2.0, tl.load(Threshold + bh % H))
        tau = tl.where(tau >= 1.0, 2.0, tau)
        priority = tl.where(forced, 2.0, mass)
        priority = tl.where(valid, priority, -1.0)
        bits = priority.to(tl.int32, bitcast=True)  # order-preserving for non-negative floats
        # Bisect the cut c in [lo, hi) = [0, bits(2.0)), keeping the rule true at lo and false at hi, and the number
        # of blocks at or above each (n_lo, n_hi). A row whose forced blocks satisfy the rule keeps just them. Once
        # every row's bracket holds at most one block, further steps cannot change which blocks are >= lo: stop.
        n_lo = tl.sum((bits >= 0).to(tl.int32), 1)
        forced_set = bits >= 0x40000000  # bits of 2.0
        n_hi = tl.sum(forced_set.to(tl.int32), 1)
        got_hi = tl.sum(tl.where(forced_set, mass, 0.0), 1)
        forced_enough = ((got_hi >= tau) | (n_hi >= cap)) & (n_hi >= MIN_BLOCKS)
        lo = tl.where(forced_enough, 0x40000000, 0)
        n_lo = tl.where(forced_enough, n_hi, n_lo)
        hi = tl.full([ROWS], 0x40000000, tl.int32)
        step = 0
        while (step < BISECTION_STEPS) & (tl.max(n_lo - n_hi, 0) > 1):
            mid = lo + (hi - lo) // 2
            chosen = bits >= mid[:, None]
            got = tl.sum(tl.where(chosen, mass, 0.0), 1)
            n = tl.sum(chosen.to(tl.int32), 1)
            ok = ((got >= tau) | (n >= cap)) & (n >= MIN_BLOCKS)
            lo = tl.where(ok, mid, lo)
            n_lo = tl.where(ok, n, n_lo)
            hi = tl.where(ok, hi, mid)
            n_hi = tl.where(ok, n_hi, n)
            step += 1
        chosen = (bits >= lo[:, None]) & valid
        chosen_i = chosen.to(tl.int32)
        pos = tl.cumsum(chosen_i, 1) - 1
        out_rows = bh * NQ + rows
        targets = BlockIndex + out_rows[:, None] * WIDTH + pos
        tl.store(targets, (cols[None, :] + 0 * pos).to(tl.int32), mask=chosen & (pos < WIDTH))
        tl.store(BlockCount + out_rows, tl.minimum(tl.sum(chosen_i, 1), WIDTH), mask=row_mask)

    def _row_warps(nk_pad: int, rows: int) -> int:
        """Warps that hold ``rows`` rows of ``nk_pad`` values at about ROW_ELEMENTS_PER_THREAD per thread."""
        return max(1, min(8, rows * nk_pad // (32 * ROW_ELEMENTS_PER_THREAD)))

    def _keep_row_configs(configs, named_args, **kwargs):
        """Of the (rows, warps) candidates, those whose warps fit this row length (the autotuner then times them)."""
        nk_pad = kwargs.get("NK_PAD", named_args.get("NK_PAD"))
        return [c for c in configs if c.num_warps == _row_warps(nk_pad, c.kwargs["ROWS"])]

    _select_blocks_fwd_autotuned = triton.autotune(
        configs=[triton.Config({"ROWS": r}, num_warps=w, num_stages=1) for r in ROW_CONFIGS for w in (1, 2, 4, 8)],
        key=["NK_PAD", "LOGITS"],
        prune_configs_by={"early_config_prune": _keep_row_configs},
        # every run rewrites the lists: re-running a config is harmless
    )(_select_blocks_fwd)


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
        dense_queries: token range of queries whose blocks keep every key block (max_blocks does not apply).
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
        and (B, H, NQ); W = min(NK, max(max_blocks, forced blocks + neighbourhood)), or NK with dense queries.
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
        if sums is not None and sums.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}); got {sums.device}")
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
    width = num_kv_blocks if dense_hi > dense_lo else min(num_kv_blocks, max(cap, forced_per_row))
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

    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if scoring == "mean":
        query_sums, key_sums = (
            block_sums(x, block_size) if sums is None else sums for x, sums in ((q, query_sums), (k, key_sums))
        )
        scores = mean_block_logits(query_sums, key_sums, block_size=block_size, seq_q=s_q, seq_k=s_k, scale=scale)
    else:
        scores = antidiagonal_block_masses(q, k, block_size=block_size, stride=stride, scale=scale)
    index = torch.zeros((batch, heads, num_q_blocks, width), device=q.device, dtype=torch.int32)
    count = torch.empty((batch, heads, num_q_blocks), device=q.device, dtype=torch.int32)
    args = (
        scores, tau.contiguous(), index, count, heads, num_q_blocks, num_kv_blocks, width, min_eff, cap, local,
        force_lo, force_hi, dense_lo, dense_hi,
    )  # fmt: skip
    nk_pad = max(16, triton.next_power_of_2(num_kv_blocks))
    meta = {"LOGITS": scoring == "mean", "BISECTION_STEPS": BISECTION_STEPS, "NK_PAD": nk_pad}

    def grid(kw):
        return (triton.cdiv(num_q_blocks, kw["ROWS"]), batch * heads)

    rows = ROW_CONFIGS[0]
    runtime.launch_tuned(
        _select_blocks_fwd,
        _select_blocks_fwd_autotuned,
        grid,
        args,
        meta,
        interpret={"ROWS": INTERPRET_ROWS},
        default={"ROWS": rows, "num_warps": _row_warps(nk_pad, rows)},
        device=q.device,
    )
    return index, count
