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
    index, _ = random_block_lists(1, 2, 2, 2)
    assert not hopper.eligible(q, k, v, index, 128, None)  # CPU tensors
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
    # the launcher routes the head dims in CONFIG here, and the result is this kernel's
    assert hopper.eligible(q, k, v, index, 128, None) == (dim in hopper.CONFIG)
    routed = block_sparse_attention(q, k, v, index, count, block_size=128, out_rows=rows)
    assert not hopper.FAST_PATH.failures, hopper.FAST_PATH.failures
    if dim in hopper.CONFIG:
        assert torch.equal(routed, out)


def test_list_width_routing_per_head_dim():
    # head dim 64: from half the blocks; 128 (the ping-pong): from 8%, so 10% lists go there and 5% lists do not
    assert hopper.wide_enough(64, 128, 256) and not hopper.wide_enough(64, 127, 256)
    assert hopper.wide_enough(128, 26, 256) and hopper.wide_enough(128, 59, 592)  # 10% at 32K / 75K tokens
    assert not hopper.wide_enough(128, 13, 256) and not hopper.wide_enough(128, 30, 592)  # 5%
    assert not hopper.wide_enough(96, 256, 256)  # no config for other head dims
