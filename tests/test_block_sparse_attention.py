"""Block-sparse flash-attention kernel vs. the PyTorch reference.

The Triton kernel runs under ``TRITON_INTERPRET=1``. Triton reads that variable when a kernel is decorated, and the
rest of the suite imports the kernel module earlier without it, so the kernel checks run once in a subprocess (this
file executed as a script with the variable set) that reports errors as JSON; the tests here assert on them.

Ground truth is the reference run in fp64 on the same, already-rounded inputs (CPU fp32 matmuls were seen to be off
by ~5e-5 now and then under heavy CPU load, so the tests do not lean on them). Tolerances (max abs error): output
fp32 1e-5, fp16 2e-3, bf16 2e-2; lse (always accumulated in fp32) 1e-4 for every dtype.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_worker

# The package re-exports the function under the module's name, so fetch the module itself.
from diffusers_block.kernels import (
    block_mask_from_index,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_index,
    runtime,
)

OUT_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}
LSE_TOL = 1e-4


# ------------------------------------------------------------------------------------------------------------------
# Case builders (shared by the subprocess worker and the in-process tests)
# ------------------------------------------------------------------------------------------------------------------
def random_block_lists(batch, heads, num_q_blocks, num_kv_blocks, *, max_kv=None, seed=0):
    """Random unique key-block lists with counts in [0, max_kv], some forced to 0; unused slots hold junk."""
    gen = torch.Generator().manual_seed(seed)
    max_kv = num_kv_blocks if max_kv is None else max_kv
    perms = torch.argsort(torch.rand(batch, heads, num_q_blocks, num_kv_blocks, generator=gen), dim=-1)
    index = perms[..., :max_kv].to(torch.int32)
    count = torch.randint(0, max_kv + 1, (batch, heads, num_q_blocks), generator=gen, dtype=torch.int32)
    count.view(-1)[0] = 0  # at least one empty query block
    count.view(-1)[-1] = max_kv  # and one full one
    junk = torch.arange(max_kv) >= count[..., None].long()
    index = torch.where(junk, torch.full_like(index, 12345), index)  # must never be read
    return index.contiguous(), count


def make_qkv(batch, heads, s_q, s_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, s_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, s_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, s_k, head_dim, generator=gen).to(dtype)
    return q, k, v


def smooth_kv(batch, heads, seq, head_dim, block_size, seed=0):
    """Keys and values that vary smoothly within a block (a mean per block plus small noise), as in video tokens
    after tile reordering: the setting where approximating skipped blocks around their mean key pays off."""
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(seq / block_size)
    centers = torch.randn(batch, heads, nb, head_dim, generator=gen)
    k = centers.repeat_interleave(block_size, 2)[:, :, :seq] + 0.3 * torch.randn(
        batch, heads, seq, head_dim, generator=gen
    )
    v = torch.randn(batch, heads, nb, head_dim, generator=gen).repeat_interleave(block_size, 2)[:, :, :seq]
    v = v + 0.3 * torch.randn(batch, heads, seq, head_dim, generator=gen)
    q = torch.randn(batch, heads, seq, head_dim, generator=gen)
    return q, k, v


def reference64(q, k, v, index, count, **kwargs):
    """The reference in fp64 (ground truth)."""
    return block_sparse_attention_reference(q.double(), k.double(), v.double(), index, count, return_lse=True, **kwargs)


def compare(out, lse, ref_out, ref_lse):
    """Max abs errors; lse must be -inf exactly where the reference is, zero-count rows exactly zero."""
    ref_inf = torch.isinf(ref_lse)
    return {
        "out_err": (out.float() - ref_out.float()).abs().max().item(),
        "lse_err": (lse[~ref_inf] - ref_lse[~ref_inf]).abs().max().item() if (~ref_inf).any() else 0.0,
        "inf_match": bool(torch.equal(torch.isinf(lse), ref_inf) and (lse[ref_inf] < 0).all()),
        "empty_rows_zero": bool((out[ref_inf] == 0).all()),
        "num_empty_rows": int(ref_inf.sum()),
    }


# (name, B, H, S_q, S_k, D, block_size, dtype, max_kv or None)
SPARSE_CASES = [
    ("s100_d64_fp32", 2, 2, 100, 100, 64, 32, "float32", None),
    ("s100_d128_fp32", 1, 2, 100, 100, 128, 32, "float32", None),
    ("s100_d64_fp16", 2, 2, 100, 100, 64, 32, "float16", None),
    ("s100_d128_fp16", 1, 2, 100, 100, 128, 32, "float16", None),
    ("s100_d64_bf16", 1, 2, 100, 100, 64, 32, "bfloat16", None),
    ("cross_d40_bs16_fp32", 1, 2, 70, 130, 40, 16, "float32", None),  # non-pow2 head dim, S_q != S_k
    ("s150_bs64_subtiles_fp32", 1, 2, 150, 150, 32, 64, "float32", None),  # BLOCK_N=32 < block_size=64
    ("compact_list_fp16", 1, 2, 129, 129, 64, 16, "float16", 3),  # max_kv_blocks < num_kv_blocks
]


def _worker() -> dict:
    """Runs in a subprocess with TRITON_INTERPRET=1: every kernel check, returned as a JSON-able dict."""
    assert runtime.INTERPRET, "worker must run with TRITON_INTERPRET=1"
    results = {}
    for name, b, h, s_q, s_k, d, bs, dtype, max_kv in SPARSE_CASES:
        q, k, v = make_qkv(b, h, s_q, s_k, d, getattr(torch, dtype))
        index, count = random_block_lists(b, h, math.ceil(s_q / bs), math.ceil(s_k / bs), max_kv=max_kv)
        out, lse = block_sparse_attention(q, k, v, index, count, block_size=bs, return_lse=True)
        ref_out, ref_lse = reference64(q, k, v, index, count, block_size=bs)
        res = compare(out, lse, ref_out, ref_lse)
        res.update(dtype=dtype, out_dtype_ok=out.dtype == q.dtype, used_triton=runtime.use_triton(q))
        results[name] = res

    # All blocks kept == dense attention (SDPA), lse == logsumexp of the scaled logits; custom scale and a
    # non-contiguous q (built from a (B, S, H, D) tensor) on top.
    b, h, s, d, bs = 1, 3, 100, 64, 32
    q, k, v = make_qkv(b, h, s, s, d, torch.float32, seed=1)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of a (B, S, H, D) layout
    index, count = dense_block_index(b, h, math.ceil(s / bs), math.ceil(s / bs))
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=bs, scale=0.2, return_lse=True)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.2)
    logits = q.double() @ k.double().transpose(-1, -2) * 0.2
    results["dense_vs_sdpa"] = {
        "out_err": (out.double() - sdpa).abs().max().item(),
        "lse_err": (lse.double() - torch.logsumexp(logits, -1)).abs().max().item(),
        "used_triton": runtime.use_triton(q),
    }

    # Triton-only constraints raise clear errors.
    errors = {}
    q, k, v = make_qkv(1, 1, 48, 48, 64, torch.float32)
    index, count = dense_block_index(1, 1, 2, 2)
    try:
        block_sparse_attention(q, k, v, index, count, block_size=24)
    except ValueError as e:
        errors["block_size_24"] = str(e)
    q, k, v = make_qkv(1, 1, 32, 32, 256, torch.float32)
    index, count = dense_block_index(1, 1, 2, 2)
    try:
        block_sparse_attention(q, k, v, index, count, block_size=16)
    except ValueError as e:
        errors["head_dim_256"] = str(e)
    results["errors"] = errors

    # Approximation of skipped blocks: kernel == reference (same approximation), and all blocks kept == dense.
    for order in ("zeroth", "first"):
        for dtype, s, bs, d in (("float32", 150, 32, 32), ("float16", 100, 16, 64)):
            q, k, v = (t.to(getattr(torch, dtype)) for t in smooth_kv(1, 2, s, d, bs))
            nb = math.ceil(s / bs)
            index, count = random_block_lists(1, 2, nb, nb, seed=3)
            out, lse = block_sparse_attention(
                q, k, v, index, count, block_size=bs, return_lse=True, approximation=order
            )
            ref_out, ref_lse = reference64(q, k, v, index, count, block_size=bs, approximation=order)
            res = compare(out, lse, ref_out, ref_lse)
            res.update(dtype=dtype, used_triton=runtime.use_triton(q))
            results[f"approx_{order}_{dtype}"] = res
        q, k, v = smooth_kv(1, 2, 100, 32, 16)
        index, count = dense_block_index(1, 2, 7, 7)
        out = block_sparse_attention(q, k, v, index, count, block_size=16, approximation=order)
        sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        results[f"approx_{order}_all_kept"] = {"out_err": (out.double() - sdpa).abs().max().item()}
    return results


# ------------------------------------------------------------------------------------------------------------------
# Triton (interpreter) checks
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("name", [c[0] for c in SPARSE_CASES])
def test_kernel_matches_reference(interpreted, name):
    res = interpreted[name]
    assert res["used_triton"], "the Triton kernel (interpreter) was not used"
    assert res["out_dtype_ok"]
    assert res["out_err"] <= OUT_TOL[res["dtype"]], res
    assert res["lse_err"] <= LSE_TOL, res
    assert res["inf_match"], res
    assert res["num_empty_rows"] > 0 and res["empty_rows_zero"], res


def test_kernel_dense_equals_sdpa(interpreted):
    res = interpreted["dense_vs_sdpa"]
    assert res["used_triton"]
    assert res["out_err"] <= 1e-5, res
    assert res["lse_err"] <= 1e-5, res


@pytest.mark.parametrize("order", ["zeroth", "first"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kernel_approximation_matches_reference(interpreted, order, dtype):
    res = interpreted[f"approx_{order}_{dtype}"]
    assert res["used_triton"]
    # Rows with count 0 are approximated too, so no row is empty: every lse is finite. The block statistics enter
    # the tensor cores in the input dtype, so the approximated part of the lse carries fp16 rounding of the mean keys.
    lse_tol = LSE_TOL if dtype == "float32" else 1e-3
    assert res["out_err"] <= OUT_TOL[dtype] and res["lse_err"] <= lse_tol and res["num_empty_rows"] == 0, res


@pytest.mark.parametrize("order", ["zeroth", "first"])
def test_kernel_approximation_all_kept_is_dense(interpreted, order):
    assert interpreted[f"approx_{order}_all_kept"]["out_err"] <= 1e-5


def test_kernel_rejects_unsupported_configs(interpreted):
    errors = interpreted["errors"]
    assert "power of two" in errors.get("block_size_24", ""), errors
    assert "head dim 256" in errors.get("head_dim_256", ""), errors


# ------------------------------------------------------------------------------------------------------------------
# In-process: reference, CPU fallback, validation
# ------------------------------------------------------------------------------------------------------------------
def test_reference_dense_equals_sdpa():
    q, k, v = make_qkv(2, 2, 100, 100, 64, torch.float32)
    index, count = dense_block_index(2, 2, 4, 4)
    out, lse = block_sparse_attention_reference(q, k, v, index, count, block_size=32, return_lse=True)
    q, k, v = q.double(), k.double(), v.double()
    torch.testing.assert_close(out.double(), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) / 8.0, -1), atol=1e-5, rtol=0)


def test_block_mask_from_index():
    index = torch.tensor([[[[2, 0, 7], [1, 9, 9]]]], dtype=torch.int32)
    count = torch.tensor([[[2, 1]]], dtype=torch.int32)
    mask = block_mask_from_index(index, count, 3)
    assert mask.tolist() == [[[[True, False, True], [False, True, False]]]]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="tests the non-interpreted CPU path")
def test_cpu_fallback_matches_reference():
    q, k, v = make_qkv(1, 2, 100, 100, 64, torch.float16)
    index, count = random_block_lists(1, 2, 4, 4)
    assert not runtime.use_triton(q)
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=32, return_lse=True)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    res = compare(out, lse, *reference64(q, k, v, index, count, block_size=32))
    assert res["out_err"] <= OUT_TOL["float16"] and res["lse_err"] <= LSE_TOL and res["inf_match"], res
    assert (out[0, 0, :32] == 0).all() and torch.isinf(lse[0, 0, :32]).all()  # count[0, 0, 0] == 0


def test_approximation_beats_drop_only():
    """At the same block lists, approximating the skipped blocks is closer to dense attention than dropping them,
    and the first-order term does not make it worse (reference, fp64)."""
    q, k, v = (t.double() for t in smooth_kv(2, 2, 256, 32, 32, seed=4))
    index, count = random_block_lists(2, 2, 8, 8, max_kv=2, seed=5)  # at most 2 of 8 key blocks per query block
    dense = F.scaled_dot_product_attention(q, k, v)
    errors = {}
    for order in (None, "zeroth", "first"):
        out = block_sparse_attention_reference(q, k, v, index, count, block_size=32, approximation=order)
        errors[order] = ((out - dense).norm() / dense.norm()).item()
    assert errors["zeroth"] < 0.5 * errors[None], errors
    assert errors["first"] <= errors["zeroth"] * 1.05, errors


def test_approximation_rejects_unknown_order():
    q, k, v, index, count = _valid_inputs()
    with pytest.raises(ValueError, match="approximation must be one of"):
        block_sparse_attention(q, k, v, index, count, block_size=32, approximation="second")


def _valid_inputs():
    q, k, v = make_qkv(1, 2, 100, 100, 64, torch.float32)
    index, count = dense_block_index(1, 2, 4, 4)
    return q, k, v, index, count


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "4-D"),
        (lambda a: {**a, "v": a["v"][:, :, :50]}, ValueError, "same shape"),
        (lambda a: {**a, "k": a["k"][..., :32], "v": a["v"][..., :32]}, ValueError, "head dim"),
        (lambda a: {**a, "q": a["q"].half()}, TypeError, "share a dtype"),
        (lambda a: {**a, "q": a["q"].double(), "k": a["k"].double(), "v": a["v"].double()}, TypeError, "float16"),
        (lambda a: {**a, "block_index": a["block_index"].long()}, TypeError, "int32"),
        (lambda a: {**a, "block_count": a["block_count"][..., :3]}, ValueError, "block_count must have shape"),
        (lambda a: {**a, "block_index": a["block_index"][:, :, :3]}, ValueError, "block_index must have shape"),
        (lambda a: {**a, "block_size": 0}, ValueError, "positive int"),
        (lambda a: {**a, "q": [1.0]}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(mutate, exc, match):
    q, k, v, index, count = _valid_inputs()
    args = mutate({"q": q, "k": k, "v": v, "block_index": index, "block_count": count, "block_size": 32})
    with pytest.raises(exc, match=match):
        block_sparse_attention(
            args["q"], args["k"], args["v"], args["block_index"], args["block_count"], block_size=args["block_size"]
        )


def test_check_indices():
    q, k, v, index, count = _valid_inputs()
    bad = index.clone()
    bad[0, 1, 2, 0] = 4  # out of range
    with pytest.raises(ValueError, match="outside"):
        block_sparse_attention(q, k, v, bad, count, block_size=32, check_indices=True)
    dup = index.clone()
    dup[0, 0, 1, 1] = dup[0, 0, 1, 0]
    with pytest.raises(ValueError, match="repeats"):
        block_sparse_attention(q, k, v, dup, count, block_size=32, check_indices=True)
    count = count.clone()
    count[0, 0, 1] = 1  # the duplicate is now past the count: fine
    block_sparse_attention(q, k, v, dup, count, block_size=32, check_indices=True)


# ------------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("order", ["zeroth", "first"])
def test_gpu_approximation_matches_reference(order):
    q, k, v = (t.cuda().bfloat16() for t in smooth_kv(1, 4, 1000, 128, 64))
    index, count = (t.cuda() for t in random_block_lists(1, 4, 16, 16, max_kv=4))
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=64, return_lse=True, approximation=order)
    res = compare(out, lse, *reference64(q, k, v, index, count, block_size=64, approximation=order))
    assert res["out_err"] <= OUT_TOL["bfloat16"] and res["lse_err"] <= 2e-2, res  # tf32 statistics dots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim, block_size, seq", [(64, 64, 1000), (128, 128, 777), (64, 32, 300)])
def test_gpu_kernel_matches_reference(dtype, head_dim, block_size, seq):
    q, k, v = (t.cuda() for t in make_qkv(2, 3, seq, seq, head_dim, dtype))
    nb = math.ceil(seq / block_size)
    index, count = (t.cuda() for t in random_block_lists(2, 3, nb, nb))
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=block_size, return_lse=True)
    res = compare(out, lse, *reference64(q, k, v, index, count, block_size=block_size))
    assert res["out_err"] <= OUT_TOL[str(dtype).split(".")[-1]], res
    assert res["lse_err"] <= LSE_TOL and res["inf_match"] and res["empty_rows_zero"], res


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
