"""The fused block-selection kernel against its PyTorch reference, and the selection rule itself.

The kernel checks run in a subprocess with TRITON_INTERPRET=1 (Triton reads it at import), like
tests/test_block_sparse_attention.py; the in-process tests check the rule through the reference (CPU fallback).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys

import pytest
import torch
from triton_interpreter import run_worker

from diffusers_block.kernels import block_mask_from_index, select_blocks

sel_module = importlib.import_module("diffusers_block.kernels.block_selection")
from diffusers_block.kernels import runtime  # noqa: E402


def structured_qk(batch, heads, seq, dim, block_size, seed=0, dtype=torch.float32):
    """Queries/keys with a per-block component, so block masses are far from uniform (as in real attention)."""
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(seq / block_size)
    centers = torch.randn(batch, heads, nb, dim, generator=gen) * 2.0
    base = centers.repeat_interleave(block_size, dim=2)[:, :, :seq]
    q = (base + torch.randn(batch, heads, seq, dim, generator=gen)).to(dtype)
    k = (base + torch.randn(batch, heads, seq, dim, generator=gen)).to(dtype)
    return q, k


# (name, B, H, S_q, S_k, D, block_size, kwargs)
CASES = [
    ("threshold_0.5", 1, 2, 130, 130, 32, 16, dict(threshold=0.5)),
    (
        "forced_text_local",
        2,
        2,
        100,
        100,
        24,
        16,
        dict(threshold=0.7, local_blocks=1, forced_keys=(90, 100), dense_queries=(90, 100)),
    ),
    ("min_max", 1, 2, 128, 128, 64, 16, dict(threshold=0.95, min_blocks=2, max_blocks=3)),
    # Text queries of joint attention keep every block, whatever max_blocks says; image queries keep the text.
    (
        "dense_text_uncapped",
        1,
        2,
        100,
        100,
        24,
        16,
        dict(threshold=0.05, max_blocks=1, local_blocks=-1, forced_keys=(85, 100), dense_queries=(85, 100)),
    ),
    ("per_head", 1, 3, 96, 96, 16, 16, dict(threshold=[0.3, 0.6, 0.99])),
    ("cross_lengths", 1, 1, 64, 112, 32, 16, dict(threshold=0.8, local_blocks=-1)),
    ("all_kept", 1, 2, 70, 70, 32, 16, dict(threshold=1.0)),
    # The forced blocks alone reach the threshold: exactly they are kept (the bisection's early stop must not keep one
    # more); and a zero threshold with no minimum keeps just the query's own block.
    ("forced_enough", 1, 2, 130, 130, 32, 16, dict(threshold=0.05, local_blocks=2, forced_keys=(96, 130))),
    ("zero_threshold", 1, 2, 100, 100, 32, 16, dict(threshold=0.0, min_blocks=0, local_blocks=0)),
    ("antidiagonal", 1, 2, 130, 130, 32, 16, dict(threshold=0.7, scoring="antidiagonal", stride=4)),
    (
        "antidiagonal_cross_forced",
        2,
        1,
        70,
        100,
        24,
        16,
        dict(threshold=0.6, scoring="antidiagonal", stride=2, local_blocks=-1, forced_keys=(90, 100)),
    ),
]


def _run_case(b, h, s_q, s_k, d, bs, kwargs):
    q, _ = structured_qk(b, h, s_q, d, bs, seed=1)
    _, k = structured_qk(b, h, s_k, d, bs, seed=1)
    kwargs = dict(kwargs)
    if isinstance(kwargs["threshold"], list):
        kwargs["threshold"] = torch.tensor(kwargs["threshold"])
    return q, k, select_blocks(q, k, block_size=bs, **kwargs), kwargs


def _worker() -> dict:
    assert runtime.INTERPRET, "worker must run with TRITON_INTERPRET=1"
    results = {}
    for name, b, h, s_q, s_k, d, bs, kwargs in CASES:
        q, k, (index, count), kw = _run_case(b, h, s_q, s_k, d, bs, kwargs)
        runtime.INTERPRET = False  # the same call through the reference
        ref_index, ref_count = select_blocks(q, k, block_size=bs, **kw)
        runtime.INTERPRET = True
        nk = math.ceil(s_k / bs)
        results[name] = {
            "used_triton": runtime.use_triton(q),
            "count_equal": torch.equal(count, ref_count),
            "index_equal": torch.equal(
                torch.where(torch.arange(index.shape[-1]) < count[..., None].long(), index, -1),
                torch.where(torch.arange(ref_index.shape[-1]) < ref_count[..., None].long(), ref_index, -1),
            ),
            "mask_equal": torch.equal(
                block_mask_from_index(index, count, nk), block_mask_from_index(ref_index, ref_count, nk)
            ),
            "density": count.float().mean().item() / nk,
        }
    return results


@pytest.fixture(scope="module")
def interpreted():
    return run_worker(__file__)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kernel_matches_reference(interpreted, name):
    res = interpreted[name]
    assert res["used_triton"], "the Triton kernel (interpreter) was not used"
    assert res["count_equal"] and res["index_equal"] and res["mask_equal"], res


def test_kernel_selects_sparsely(interpreted):
    assert interpreted["threshold_0.5"]["density"] < 0.5, interpreted["threshold_0.5"]
    assert interpreted["antidiagonal"]["density"] < 0.7, interpreted["antidiagonal"]
    assert interpreted["all_kept"]["density"] == 1.0
    assert interpreted["zero_threshold"]["density"] == pytest.approx(1 / 7)  # one of 7 key blocks per row


# ------------------------------------------------------------------------------------------------------------------
# The rule, through the reference (CPU fallback)
# ------------------------------------------------------------------------------------------------------------------
def _mask(q, k, bs, **kwargs):
    index, count = select_blocks(q, k, block_size=bs, **kwargs)
    return block_mask_from_index(index, count, math.ceil(k.shape[2] / bs)), index, count


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="tests the non-interpreted CPU path")
def test_rule_reaches_threshold_with_fewest_blocks():
    bs = 16
    q, k = structured_qk(1, 2, 160, 32, bs)
    mask, index, count = _mask(q, k, bs, threshold=0.6, local_blocks=-1, min_blocks=0)
    # Block masses as the rule defines them, recomputed here from the pooled q / k.
    qm = q.unflatten(2, (10, bs)).mean(3)
    km = k.unflatten(2, (10, bs)).mean(3)
    mass = torch.softmax(qm @ km.transpose(-1, -2) / math.sqrt(32) + math.log(bs), dim=-1)
    kept_mass = (mass * mask).sum(-1)
    assert (kept_mass >= 0.6 - 1e-6).all()
    # Dropping the lightest kept block of any row falls below the threshold: the set is minimal.
    lightest = torch.where(mask, mass, torch.full_like(mass, 2.0)).amin(-1)
    assert (kept_mass - lightest < 0.6).all()
    # Kept lists are in ascending block order.
    for row, n in zip(index.view(-1, index.shape[-1]), count.view(-1)):
        assert torch.all(row[1:n] > row[: n - 1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="tests the non-interpreted CPU path")
def test_rule_forced_dense_and_bounds():
    bs = 16
    q, k = structured_qk(1, 2, 160, 32, bs)
    mask, _, count = _mask(q, k, bs, threshold=0.3, local_blocks=1, forced_keys=(130, 160), dense_queries=(150, 160))
    nb = 10
    assert mask[..., 8:].all()  # key blocks 8, 9 hold tokens 130..159
    assert mask[..., 9, :].all()  # query block 9 (tokens 150..159) keeps everything
    diag = torch.arange(nb)
    for offset in (-1, 0, 1):
        rows = diag[(diag + offset >= 0) & (diag + offset < nb)]
        assert mask[..., rows, rows + offset].all()
    _, _, count = _mask(q, k, bs, threshold=0.99, min_blocks=2, max_blocks=4, local_blocks=-1)
    assert count.max() <= 4 and count.min() >= 2
    _, _, count = _mask(q, k, bs, threshold=1.0)
    assert (count == nb).all()
    q, k = torch.randn(2, 1, 2, 160, 32, generator=torch.Generator().manual_seed(0))  # spread-out masses
    per_head = _mask(q, k, bs, threshold=torch.tensor([0.2, 0.95]), local_blocks=-1)[2]
    assert per_head[:, 0].float().mean() < per_head[:, 1].float().mean()


def test_bad_arguments_raise():
    q, k = structured_qk(1, 2, 64, 16, 16)
    with pytest.raises(ValueError, match="threshold must be in"):
        select_blocks(q, k, block_size=16, threshold=1.5)
    with pytest.raises(ValueError, match="one value per head"):
        select_blocks(q, k, block_size=16, threshold=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="block_size"):
        select_blocks(q, k, block_size=0, threshold=0.5)
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        select_blocks(q[0], k, block_size=16, threshold=0.5)
    with pytest.raises(ValueError, match="scoring must be one of"):
        select_blocks(q, k, block_size=16, threshold=0.5, scoring="max")
    with pytest.raises(ValueError, match="stride must be a power of two dividing"):
        select_blocks(q, k, block_size=16, threshold=0.5, scoring="antidiagonal", stride=3)
    with pytest.raises(ValueError, match="key_sums must have shape"):
        select_blocks(q, k, block_size=16, threshold=0.5, key_sums=torch.zeros(1, 2, 3, 16))
    with pytest.raises(ValueError, match="query_sums must have shape"):
        select_blocks(q, k, block_size=16, threshold=0.5, query_sums=torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="key_sums must be on q's device"):
        select_blocks(q, k, block_size=16, threshold=0.5, key_sums=torch.zeros(1, 2, 4, 16, device="meta"))


def test_cut_configs_fit_the_row_length():
    """The autotuner times, per row length, one config per rows-per-program with the warps that row length needs."""
    configs = sel_module._select_blocks_fwd_autotuned.configs
    for nk_pad, expected in ((256, {1: 1, 2: 1, 4: 1}), (1024, {1: 1, 2: 2, 4: 4}), (4096, {1: 4, 2: 8, 4: 8})):
        kept = sel_module._keep_row_configs(configs, {}, NK_PAD=nk_pad)
        assert {c.kwargs["ROWS"]: c.num_warps for c in kept} == expected and len(kept) == len(expected)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, block_size, seq", [(64, 64, 4000), (128, 128, 9000)])
def test_gpu_selection_matches_reference(head_dim, block_size, seq):
    q, k = (t.cuda().bfloat16() for t in structured_qk(1, 4, seq, head_dim, block_size))
    index, count = select_blocks(q, k, block_size=block_size, threshold=0.8, local_blocks=0)
    ref_index, ref_count = sel_module.select_blocks_reference(
        q.cpu(),
        k.cpu(),
        torch.full((4,), 0.8),
        block_size=block_size,
        scale=1 / math.sqrt(head_dim),
        min_blocks=1,
        max_blocks=math.ceil(seq / block_size),
        width=index.shape[-1],
        local=0,
        force=(0, 0),
        dense=(0, 0),
    )
    nk = math.ceil(seq / block_size)
    mask = block_mask_from_index(index.cpu(), count.cpu(), nk)
    ref = block_mask_from_index(ref_index, ref_count, nk)
    assert (mask != ref).float().mean() < 1e-3  # only near-ties at the cut may differ (fp32 dot order)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
