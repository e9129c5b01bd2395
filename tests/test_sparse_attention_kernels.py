"""The pieces the sparse-attention hook adds around the two main kernels: the token gather with the rotary embedding
fused in, the attention kernel's scattered store (inverse permutation fused into the store), the selection from
handed-over key sums, the antidiagonal scoring's reference, and the rotary hand-over in the hook.

Triton kernels run under TRITON_INTERPRET=1 in a subprocess (Triton reads the variable at import), as in
tests/test_block_sparse_attention.py; the rest runs in-process on the PyTorch references.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_transformer, make_inputs, timestep_for
from triton_interpreter import run_worker

import diffusers_block as db
from diffusers_block.attention.hooks import SPARSE_ATTENTION_HOOK
from diffusers_block.kernels import (
    antidiagonal_block_mass,
    block_mask_from_index,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sums,
    block_sums_reference,
    gather_tokens,
    gather_tokens_reference,
    pooled_block_mass,
    rotate_interleaved,
    runtime,
    select_blocks,
    skipped_block_lists,
)
from diffusers_block.kernels.antidiagonal_masses import antidiagonal_block_masses
from diffusers_block.kernels.block_logits import mean_block_logits


def _tables(seq, dim, seed=0):
    """Rotary tables as diffusers builds Wan's: cos/sin of angles repeated per (2i, 2i+1) pair, fp32, (1, S, 1, D)."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(seq, dim // 2, generator=gen) * 6.0
    cos = angles.cos().repeat_interleave(2, dim=1)
    sin = angles.sin().repeat_interleave(2, dim=1)
    return cos[None, :, None], sin[None, :, None]


def _bshd(batch, seq, heads, dim, dtype, seed=0):
    """(B, H, S, D) transposed view of a (B, S, H, D) tensor: the layout a processor hands to SDPA."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, heads, dim, generator=gen).to(dtype).transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------------
# Worker (TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------------------------
def _worker() -> dict:
    assert runtime.INTERPRET
    results = {}
    # Gather (+ rotation, + block sums) against the reference, fp32 and bf16, odd lengths, strided input.
    for dtype in ("float32", "bfloat16"):
        for seq, dim, bs in ((100, 32, 16), (77, 24, 32)):
            x = _bshd(2, seq, 3, dim, getattr(torch, dtype), seed=seq)
            perm = torch.randperm(seq, generator=torch.Generator().manual_seed(1))
            cos, sin = _tables(seq, dim)
            out, sums = gather_tokens(x, perm, rotary=(cos, sin), block_size=bs)
            ref, ref_sums = gather_tokens_reference(
                x, perm, rotary=(cos.reshape(seq, dim), sin.reshape(seq, dim)), block_size=bs
            )
            ulp = torch.finfo(x.dtype).eps * ref.float().abs().clamp_min(1.0)
            plain = gather_tokens(x, perm)
            results[f"gather_{dtype}_{seq}"] = {
                "used_triton": runtime.use_triton(x),
                "contiguous": out.is_contiguous(),
                "within_one_ulp": bool(((out.float() - ref.float()).abs() <= ulp).all()),
                "sums_err": ((sums - ref_sums).abs().max() / ref_sums.abs().max()).item(),
                "plain_equal": torch.equal(plain, x[:, :, perm]),
                "identity_equal": torch.equal(gather_tokens(x, None), x.contiguous()),
            }
    # Scattered store: result row i lands on row perm[i] of a transposed (B, S, H, D) buffer; nothing else written.
    for seq, bs in ((100, 16), (64, 32)):
        q, k, v = (_bshd(1, seq, 2, 32, torch.float32, seed=s) for s in (1, 2, 3))
        nb = math.ceil(seq / bs)
        gen = torch.Generator().manual_seed(4)
        index = torch.argsort(torch.rand(1, 2, nb, nb, generator=gen), dim=-1)[..., : max(1, nb // 2)]
        index = index.to(torch.int32).contiguous()
        count = torch.randint(1, index.shape[-1] + 1, (1, 2, nb), generator=gen, dtype=torch.int32)
        perm = torch.randperm(seq, generator=gen)
        buffer = torch.full((1, seq, 2, 32), float("nan"))
        out = block_sparse_attention(q, k, v, index, count, block_size=bs, out=buffer.transpose(1, 2), out_rows=perm)
        ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), index, count, block_size=bs)
        results[f"scatter_{seq}"] = {
            "all_written": not bool(torch.isnan(buffer).any()),
            "is_buffer": out.data_ptr() == buffer.data_ptr(),
            "err": (out[:, :, perm].double() - ref).abs().max().item(),
        }
    # Block sums alone (no copy): any block size, tails, strided bf16 input; equal to the gather's sums.
    for seq, dim, bs in ((100, 32, 16), (77, 24, 24), (130, 64, 48)):
        x = _bshd(2, seq, 3, dim, torch.bfloat16, seed=seq)
        sums = block_sums(x, bs)
        ref = block_sums_reference(x.double(), bs)
        results[f"block_sums_{seq}_{bs}"] = {
            "shape_ok": tuple(sums.shape) == (2, 3, math.ceil(seq / bs), dim) and sums.dtype == torch.float32,
            "err": ((sums.double() - ref).abs().max() / ref.abs().max()).item(),
            "equal_to_gather": bs & (bs - 1) != 0 or torch.equal(sums, gather_tokens(x, None, block_size=bs)[1]),
        }
    # Block scores against their references: mean logits (their row softmax is the pooled block mass) and the
    # antidiagonal masses, odd lengths (short tail blocks), two heads.
    for seq, bs, stride in ((100, 16, 4), (77, 32, 8)):
        q, k = (_bshd(1, seq, 2, 32, torch.float32, seed=s) * 2 for s in (7, 8))
        logits = mean_block_logits(
            block_sums(q, bs), block_sums(k, bs), block_size=bs, seq_q=seq, seq_k=seq, scale=32**-0.5
        )
        mass = torch.softmax(logits * math.log(2.0), dim=-1).reshape(1, 2, *logits.shape[1:])
        anti = antidiagonal_block_masses(q, k, block_size=bs, stride=stride, scale=32**-0.5)
        results[f"scores_{seq}"] = {
            "mean_err": (mass.double() - pooled_block_mass(q.double(), k.double(), bs, 32**-0.5)).abs().max().item(),
            "anti_err": (
                anti.reshape(1, 2, *anti.shape[1:]).double()
                - antidiagonal_block_mass(q.double(), k.double(), bs, stride, 32**-0.5)
            )
            .abs()
            .max()
            .item(),
        }
    # Selection from the sums handed over by the gather == selection computing them itself.
    q, k = (_bshd(1, 130, 2, 32, torch.float32, seed=s) * 2 for s in (5, 6))
    q_gathered, query_sums = gather_tokens(q, None, block_size=16)
    k_gathered, key_sums = gather_tokens(k, None, block_size=16)
    a = select_blocks(q_gathered, k_gathered, block_size=16, threshold=0.6, query_sums=query_sums, key_sums=key_sums)
    b = select_blocks(q, k, block_size=16, threshold=0.6)
    results["handed_over_sums"] = {"equal": torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])}
    # The kernel reads the sums it is handed, not q and k: zeroed key sums make every key block score the same.
    flat = select_blocks(q, k, block_size=16, threshold=0.6, key_sums=torch.zeros_like(key_sums))
    results["handed_over_sums"]["sums_are_read"] = not torch.equal(flat[1], b[1])
    return results


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize(
    "name", ["gather_float32_100", "gather_float32_77", "gather_bfloat16_100", "gather_bfloat16_77"]
)
def test_gather_kernel_matches_reference(interpreted, name):
    res = interpreted[name]
    assert res["used_triton"] and res["contiguous"], res
    assert res["within_one_ulp"] and res["plain_equal"] and res["identity_equal"], res
    assert res["sums_err"] < 1e-2 if "bfloat16" in name else res["sums_err"] < 1e-6, res


@pytest.mark.parametrize("name", ["scatter_100", "scatter_64"])
def test_attention_scatters_rows_into_the_given_buffer(interpreted, name):
    res = interpreted[name]
    assert res["all_written"] and res["is_buffer"], res
    assert res["err"] < 1e-5, res


@pytest.mark.parametrize("name", ["block_sums_100_16", "block_sums_77_24", "block_sums_130_48"])
def test_block_sums_kernel_matches_reference(interpreted, name):
    res = interpreted[name]
    assert res["shape_ok"] and res["equal_to_gather"], res
    assert res["err"] < 1e-6, res  # fp32 sums of bf16 values: exact up to fp32 rounding


@pytest.mark.parametrize("name", ["scores_100", "scores_77"])
def test_block_score_kernels_match_references(interpreted, name):
    res = interpreted[name]
    assert res["mean_err"] < 1e-5 and res["anti_err"] < 1e-5, res


def test_block_score_cpu_fallbacks_match_references():
    q, k = (_bshd(1, 70, 2, 16, torch.float32, seed=s) for s in (1, 2))
    logits = mean_block_logits(block_sums(q, 16), block_sums(k, 16), block_size=16, seq_q=70, seq_k=70, scale=0.25)
    mass = torch.softmax(logits * math.log(2.0), dim=-1).reshape(1, 2, 5, 5)
    assert torch.allclose(mass, pooled_block_mass(q, k, 16, 0.25), atol=1e-6)
    anti = antidiagonal_block_masses(q, k, block_size=16, stride=4, scale=0.25)
    assert torch.allclose(anti.reshape(1, 2, 5, 5), antidiagonal_block_mass(q, k, 16, 4, 0.25), atol=1e-6)


def test_block_sums_cpu_fallback_is_the_reference():
    x = _bshd(1, 50, 2, 8, torch.float32)
    assert torch.equal(block_sums(x, 16), block_sums_reference(x, 16))
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        block_sums(x, 0)


def test_selection_from_handed_over_sums(interpreted):
    assert interpreted["handed_over_sums"]["equal"] and interpreted["handed_over_sums"]["sums_are_read"]


# ------------------------------------------------------------------------------------------------------------------
# References and hook (in-process)
# ------------------------------------------------------------------------------------------------------------------
def test_rotation_is_diffusers_wan_rotation():
    """rotate_interleaved is the rotation of diffusers' WanAttnProcessor: the q and k it hands to SDPA (caught by a
    TorchFunctionMode) on a module whose projections are identities."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                seen["q"], seen["k"] = kwargs.get("query", args[0] if args else None), kwargs.get("key")
            return func(*args, **kwargs)

    dim, heads, seq = 64, 2, 12
    attn = WanAttention(dim=dim, heads=heads, dim_head=dim // heads, eps=1e-6, processor=WanAttnProcessor())
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            linear.weight.copy_(torch.eye(dim))
            linear.bias.zero_()
    attn.norm_q = attn.norm_k = torch.nn.Identity()
    x = torch.randn(1, seq, dim)
    cos, sin = _tables(seq, dim // heads)
    seen = {}
    with torch.no_grad(), Spy():
        attn(x, None, None, (cos, sin))
    q = x.unflatten(2, (heads, -1)).transpose(1, 2)
    ours = rotate_interleaved(q, cos.reshape(seq, -1), sin.reshape(seq, -1))
    torch.testing.assert_close(seen["q"], ours, rtol=0, atol=0)
    torch.testing.assert_close(seen["k"], ours, rtol=0, atol=0)


def test_antidiagonal_with_stride_one_is_the_exact_block_mass():
    """With stride 1 every antidiagonal is a single logit: the block mass is the true softmax mass of each key
    block, averaged over the block's queries."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 70, 16, generator=gen, dtype=torch.float64)
    bs, scale = 16, 0.25
    mass = antidiagonal_block_mass(q, k, bs, 1, scale)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (1, 2, 70, 70)
    nb = math.ceil(70 / bs)
    pad = torch.zeros(1, 2, nb * bs, nb * bs, dtype=torch.float64)
    pad[:, :, :70, :70] = probs
    per_block = pad.view(1, 2, nb, bs, nb, bs).sum(-1)  # (1, 2, nq, rows, nk)
    rows = torch.tensor([min(bs, 70 - i * bs) for i in range(nb)], dtype=torch.float64)
    exact = per_block.sum(3) / rows[:, None]
    torch.testing.assert_close(mass, exact, rtol=1e-10, atol=1e-12)


def test_antidiagonal_mass_is_a_distribution_that_moves_with_its_key_blocks():
    """Rows of block masses sum to one; permuting whole key blocks permutes the mass columns alike."""
    gen = torch.Generator().manual_seed(1)
    bs, seq, dim = 32, 256, 32
    q, k = torch.randn(2, 1, 2, seq, dim, generator=gen, dtype=torch.float64) * 1.5
    scale = 1 / math.sqrt(dim)
    mass = antidiagonal_block_mass(q, k, bs, 4, scale)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))
    order = torch.randperm(seq // bs, generator=gen)
    shuffled = k.view(1, 2, seq // bs, bs, dim)[:, :, order].reshape(1, 2, seq, dim)
    torch.testing.assert_close(antidiagonal_block_mass(q, shuffled, bs, 4, scale), mass[..., order])


def test_config_scoring_stride_and_rotary_fields():
    with pytest.raises(ValueError, match="scoring"):
        db.SparseAttentionConfig(scoring="max")
    with pytest.raises(ValueError, match="stride"):
        db.SparseAttentionConfig(scoring="antidiagonal", stride=3)
    with pytest.raises(ValueError, match="stride"):
        db.SparseAttentionConfig(scoring="antidiagonal", stride=32, block_size=16)
    with pytest.raises(ValueError, match="fuse_rotary"):
        db.SparseAttentionConfig(fuse_rotary=1)
    assert db.SparseAttentionConfig(block_size=4).stride == 8  # the stride only matters for antidiagonal scoring


def _wan_forward(config):
    model = build_transformer("wan")
    inputs = make_inputs("wan", batch_size=2, frames=3)
    inputs.update(timestep_for("wan", 500.0, 2))
    with torch.no_grad():
        dense = model(**inputs)[0]
        db.enable_sparse_attention(model, config)
        sparse = model(**inputs)[0]
        db.disable_sparse_attention(model)
    return dense, sparse


@pytest.mark.parametrize("scoring", ["mean", "antidiagonal"])
def test_rotary_taken_over_from_wan_processor_changes_nothing(scoring):
    """The sparse path applying Wan's rotary embedding itself (fuse_rotary) gives what the processor's own
    rotation gives, at the same selection; all blocks kept, both equal dense attention."""
    base = dict(dense_steps=0, block_size=8, min_tokens=0, scoring=scoring, stride=2)
    _, fused = _wan_forward(db.SparseAttentionConfig(threshold=0.5, **base))
    dense, unfused = _wan_forward(db.SparseAttentionConfig(threshold=0.5, fuse_rotary=False, **base))
    assert not torch.equal(fused, dense)  # sparse indeed
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    _, kept = _wan_forward(db.SparseAttentionConfig(threshold=1.0, **base))
    torch.testing.assert_close(kept, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


def test_fallback_call_gets_the_rotation_the_hook_took():
    """A call the sparse path does not take (here: a causal mask) runs SDPA on q and k rotated as the processor
    would have rotated them."""
    model = build_transformer("wan")
    db.enable_sparse_attention(model, db.SparseAttentionConfig(dense_steps=0, block_size=8, min_tokens=0))
    hook = model.blocks[0].attn1._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK)
    q, k, v = (torch.randn(1, 2, 16, 24) for _ in range(3))
    cos, sin = _tables(16, 24)
    hook._call = {"step": 0, "branch": 0, "image": 16, "mode": "select", "calls": 0, "rotary": (cos, sin)}
    mask = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    call = dict(query=q, key=k, value=v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    out = hook.attend(call)
    rq, rk = (rotate_interleaved(t, cos.reshape(16, 24), sin.reshape(16, 24)) for t in (q, k))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(rq, rk, v, attn_mask=mask))
    db.disable_sparse_attention(model)


def test_cpu_path_writes_into_buffer_with_rows():
    """The CPU fallback honours out= and out_rows= like the kernel."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    index = torch.arange(3, dtype=torch.int32).expand(1, 2, 3, 3).contiguous()
    count = torch.full((1, 2, 3), 3, dtype=torch.int32)
    perm = torch.randperm(40, generator=gen)
    buffer = torch.zeros(1, 40, 2, 16)
    out = block_sparse_attention(q, k, v, index, count, block_size=16, out=buffer.transpose(1, 2), out_rows=perm)
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(out[:, :, perm], F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_rows must be"):
        block_sparse_attention(q, k, v, index, count, block_size=16, out_rows=perm[:5])
    assert block_mask_from_index(index, count, 3).all()


def test_skipped_lists_complement_the_lists_and_merge_into_dense_attention():
    """Lists and their complement cover every key block once; the two attention results, weighted by their lse
    (what approximation="cached" does on a selection step), are dense attention."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 72, 16, generator=gen) for _ in range(3))
    index, count = select_blocks(q, k, block_size=16, threshold=0.5, min_blocks=1)
    skipped, skipped_count = skipped_block_lists(index, count, 5)
    kept, rest = block_mask_from_index(index, count, 5), block_mask_from_index(skipped, skipped_count, 5)
    assert (kept ^ rest).all() and not (kept & rest).any() and (skipped_count + count == 5).all()
    width = torch.arange(5) < skipped_count[..., None]
    assert (skipped.diff(dim=-1)[..., : width.shape[-1] - 1][width[..., 1:]] > 0).all()  # ascending
    out, lse = block_sparse_attention(q, k, v, index, count, block_size=16, return_lse=True)
    out_skipped, lse_skipped = block_sparse_attention(q, k, v, skipped, skipped_count, block_size=16, return_lse=True)
    share = torch.nan_to_num(torch.sigmoid(lse_skipped - lse))[..., None]
    torch.testing.assert_close(torch.lerp(out, out_skipped, share), F.scaled_dot_product_attention(q, k, v))
    assert 0.05 < float(share.mean()) < 0.95  # the threshold left a real part of the mass to the complement


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
