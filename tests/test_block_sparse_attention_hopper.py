"""The Gluon Hopper kernel: its TMA views and dispatch rules on CPU; on an sm_90 GPU with a validated Triton, its
results against the fp64 reference and against the Triton-language kernel (tolerances as in
``test_block_sparse_attention``)."""

from __future__ import annotations

import math

import pytest
import torch
from test_block_sparse_attention import LSE_TOL, OUT_TOL, compare, make_qkv, random_block_lists, reference64

from diffusers_block.kernels import block_sparse_attention
from diffusers_block.kernels import block_sparse_attention_hopper as hopper


def _read_view(t: torch.Tensor):
    """Every head of ``t`` read back through its 2-D TMA view (what the kernel's copies address)."""
    (rows, width), (row_stride, _) = hopper.tma_view(t)
    view = torch.as_strided(t, (rows, width), (row_stride, 1), storage_offset=t.storage_offset())
    batch, heads, seq, dim = t.shape
    out = torch.empty_like(t)
    for b in range(batch):
        for h in range(heads):
            row0, col0 = divmod(b * t.stride(0) + h * t.stride(1), row_stride)
            out[b, h] = view[row0 : row0 + seq, col0 : col0 + dim]
    return out


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "heads_interleaved", "fused_projection_slice", "broadcast_heads"],
)
def test_tma_view_addresses_every_head(layout):
    """Contiguous (B, H, S, D), a (B, S, H, D) buffer seen as (B, H, S, D), a slice of a fused QKV projection and a
    stride-0 head dim: the 2-D view holds each head at (row0 + s, col0 + d)."""
    gen = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        t = torch.randn(2, 3, 50, 64, generator=gen)
    elif layout == "heads_interleaved":
        t = torch.randn(2, 50, 3, 64, generator=gen).transpose(1, 2)
    elif layout == "fused_projection_slice":
        t = torch.randn(2, 50, 3, 3 * 64, generator=gen).transpose(1, 2)[..., 64:128]
    else:
        t = torch.randn(2, 1, 50, 64, generator=gen).expand(2, 3, 50, 64)
    assert torch.equal(_read_view(t), t)


def test_tma_view_refuses_what_tma_cannot_address():
    assert hopper.tma_view(torch.randn(2, 50, 3, 65)[..., :64].transpose(1, 2)) is None  # 130-byte rows
    assert hopper.tma_view(torch.randn(2, 3, 64, 50).transpose(-1, -2)) is None  # head dim not contiguous
    overlapping = torch.as_strided(torch.randn(4096), (1, 2, 10, 64), (0, 32, 64, 1))  # heads 32 apart, rows 64
    assert hopper.tma_view(overlapping) is None


def test_not_eligible_off_hopper_or_when_turned_off(monkeypatch):
    q, k, v = make_qkv(1, 2, 256, 256, 128, torch.bfloat16)
    index, count = random_block_lists(1, 2, 2, 2)
    assert not hopper.eligible(q, k, v, index, count, 128, None)  # CPU tensors
    monkeypatch.setattr(hopper, "SWITCH", "1")
    assert hopper.enabled() == hopper.IMPORTED
    with hopper.turned_off():
        assert not hopper.enabled()
    assert hopper.SWITCH == "1"  # restored
    monkeypatch.setattr(hopper, "SWITCH", None)
    monkeypatch.setattr(hopper, "VALIDATED_TRITON", ())
    assert not hopper.enabled()  # an unvalidated Triton keeps to the Triton-language kernel


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper.enabled()


# (B, H, S_q, S_k, head dim, layout, lists): lengths with tails, empty query blocks, junk past the counts
GPU_CASES = [
    (2, 3, 1000, 777, 128, "contiguous", "random"),
    (2, 3, 1024, 777, 128, "contiguous", "full"),
    (1, 4, 1024, 1024, 128, "heads_interleaved", "random"),
    (1, 2, 1000, 1000, 128, "fused_projection_slice", "full"),
    (2, 3, 1000, 777, 64, "fused_projection_slice", "random"),
    (1, 2, 2048, 2048, 64, "contiguous", "full"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU and a validated Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[2]}x{c[3]}_d{c[4]}_{c[5]}_{c[6]}")
@pytest.mark.parametrize("scatter", [False, True])
def test_gpu_hopper_kernel_matches_reference(case, dtype, scatter):
    batch, heads, s_q, s_k, dim, layout, lists = case
    q, k, v = make_qkv(batch, heads, s_q, s_k, dim, dtype)
    if layout == "heads_interleaved":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "fused_projection_slice":
        q, k, v = (torch.cat([t, t, t], -1)[..., dim : 2 * dim] for t in (q, k, v))
    q, k, v = (t.cuda() for t in (q, k, v))
    nq, nk = math.ceil(s_q / 128), math.ceil(s_k / 128)
    index, count = random_block_lists(batch, heads, nq, nk)
    if lists == "full":  # every key block, in a random order
        index = torch.argsort(torch.rand(batch, heads, nq, nk, generator=torch.Generator().manual_seed(1)), -1)
        index, count = index.to(torch.int32), torch.full_like(count, nk)
    index, count = index.cuda(), count.cuda()
    rows = torch.randperm(s_q, device="cuda") if scatter else None
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    hopper.launch(q, k, v, out, rows, lse, index, count, dim**-0.5, 128)
    got = out[:, :, rows] if scatter else out
    res = compare(got, lse, *reference64(q, k, v, index, count, block_size=128))
    tol = OUT_TOL[str(dtype).split(".")[-1]]
    assert res["out_err"] <= tol, res
    assert res["lse_err"] <= LSE_TOL and res["inf_match"] and res["empty_rows_zero"], res
    with hopper.turned_off():  # the Triton-language kernel on the same call
        triton_out = block_sparse_attention(q, k, v, index, count, block_size=128, out_rows=rows)
    assert (out.float() - triton_out.float()).abs().max().item() <= tol
    # the launcher routes the head dims in CONFIG here where the lists are wide by their counts, and the result is
    # this kernel's
    routed_here = dim in hopper.CONFIG and hopper.lists_wide_enough(dim, index, count, nk)
    assert hopper.eligible(q, k, v, index, count, 128, None) == routed_here
    assert routed_here or lists == "random"  # every block listed: always here
    routed = block_sparse_attention(q, k, v, index, count, block_size=128, out_rows=rows)
    assert not hopper.FAST_PATH.failures, hopper.FAST_PATH.failures
    if routed_here:
        assert torch.equal(routed, out)


def test_list_width_routing_per_head_dim():
    # head dim 64: from half the blocks; 128 (the ping-pong): from 8%, so 10% lists go there and 5% lists do not
    assert hopper.wide_enough(64, 128, 256) and not hopper.wide_enough(64, 127, 256)
    assert hopper.wide_enough(128, 26, 256) and hopper.wide_enough(128, 59, 592)  # 10% at 32K / 75K tokens
    assert not hopper.wide_enough(128, 13, 256) and not hopper.wide_enough(128, 30, 592)  # 5%
    assert not hopper.wide_enough(96, 256, 256)  # no config for other head dims


def _lists(capacity: int, width: int, num_kv_blocks: int = 256):
    """(index, count) of capacity ``capacity`` (``max_blocks``, or every key block when uncapped), each row listing
    ``width`` blocks."""
    index = torch.arange(capacity, dtype=torch.int32).expand(1, 2, 4, capacity).contiguous()
    return index, torch.full((1, 2, 4), width, dtype=torch.int32)


def test_routing_reads_the_counts_not_the_capacity():
    """Uncapped lists (``max_blocks=None``: capacity = every key block) that list 5% of the blocks take the
    Triton-language kernel at head dim 128, as 5% lists of capacity 5% do; 10% lists take the Gluon kernel."""
    index, count = _lists(256, 13)
    assert hopper.wide_enough(128, index.shape[-1], 256)  # what the capacity alone said (the old rule)
    assert not hopper.lists_wide_enough(128, index, count, 256)  # 13 of 256 blocks: the narrow-list path
    assert hopper.lists_wide_enough(128, *_lists(256, 26), 256)  # 10%: the Gluon kernel
    assert not hopper.lists_wide_enough(128, *_lists(13, 13), 256)
    # head dim 64: from half the blocks, by the counts
    assert not hopper.lists_wide_enough(64, *_lists(256, 127), 256) and hopper.lists_wide_enough(
        64, *_lists(256, 128), 256
    )
    # uneven rows: the mean decides (one dense row among narrow ones does not make the lists wide)
    count = torch.tensor([[[256, 4, 4, 4], [4, 4, 4, 4]]], dtype=torch.int32)
    assert not hopper.lists_wide_enough(64, index, count, 256)
    assert hopper.mean_list_width(count, 256) == pytest.approx((256 + 7 * 4) / 8)
    # counts past the capacity count as the capacity, as the kernels clamp them
    assert hopper.mean_list_width(torch.full((1, 1, 2), 400, dtype=torch.int32), 256) == 256.0


def test_routing_takes_the_callers_width_and_reads_it_only_when_needed():
    index, count = _lists(256, 13)
    asked = []

    def width():
        asked.append(1)
        return 200.0

    assert hopper.lists_wide_enough(128, index, count, 256, width)  # the caller's width, not the counts
    assert asked == [1]
    assert not hopper.lists_wide_enough(128, index, count, 256, 13.0)
    # a capacity under the share decides alone: the width is not asked for (no device sync on a GPU)
    assert not hopper.lists_wide_enough(128, *_lists(16, 16), 256, width)
    assert not hopper.lists_wide_enough(96, index, count, 256, width)  # no kernel for this head dim
    assert asked == [1]


@pytest.mark.parametrize("approximation", [None, "cached"])
def test_sparse_attention_passes_each_selections_width_read_once(monkeypatch, approximation):
    """The hook's path hands the launcher the lists' mean width, computed once per selection however many calls
    reuse the lists (one device sync per selection at most, none per call); the cached approximation's complement
    gets the complement's width."""
    from diffusers_block import SparseAttentionConfig
    from diffusers_block.attention import functional

    widths, reads = [], []
    kernel, mean_width = functional.block_sparse_attention, functional.mean_list_width

    def spy_kernel(*args, list_width=None, **kwargs):
        widths.append((list_width(), args[4]))  # what the launcher would read, and the counts it was for
        return kernel(*args, list_width=list_width, **kwargs)

    def spy_mean(count, capacity):
        reads.append(1)
        return mean_width(count, capacity)

    monkeypatch.setattr(functional, "block_sparse_attention", spy_kernel)
    monkeypatch.setattr(functional, "mean_list_width", spy_mean)
    q, k, v = make_qkv(1, 2, 128, 128, 32, torch.float32)
    config = SparseAttentionConfig(threshold=0.5, block_size=16, min_tokens=0, approximation=approximation)
    common = dict(config=config, thresholds=torch.full((2,), 0.5), scale=None, text=0, text_first=False, grid=None)
    _, selection = functional.sparse_self_attention(q, k, v, **common)
    for _ in range(2):
        functional.sparse_self_attention(q, k, v, selection=selection, **common)
    assert len(reads) == 1  # once for the selection, not per call
    for width, count in widths:
        assert width == pytest.approx(count.float().mean().item())
    assert len(widths) == (4 if approximation == "cached" else 3)  # the complement once, on the selection call
    assert 0 < selection.mean_width() < 8
