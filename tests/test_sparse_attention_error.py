"""SparseAttentionConfig(measure_error=True): the per-layer relative error of the sparse attention output against
exact attention on the same inputs, on the tiny Wan pipeline (rotary embedding taken over by the hook) on CPU; and
the cached skipped blocks (approximation="cached"), whose selection steps it shows to be exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_pipelines import build_pipeline, call_kwargs

import diffusers_block as db
from diffusers_block.attention.functional import sparse_self_attention
from diffusers_block.attention.hooks import SparseAttentionHook
from diffusers_block.attention.summary import DENSE, REUSED, SELECTED

# 32 tokens per frame pair: blocks of 8, nothing too short to be sparse; step 0 dense, masks refreshed every 2 steps.
COMMON = dict(dense_steps=1, refresh_interval=2, block_size=8, min_tokens=0)


def generate(pipe):
    with torch.no_grad():
        return pipe(**call_kwargs("wan"))[0]


def run(pipe, **kwargs):
    pipe.enable_sparse_attention(db.SparseAttentionConfig(**COMMON, **kwargs))
    try:
        return generate(pipe), pipe.sparse_attention_summary()
    finally:
        pipe.disable_sparse_attention()


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline("wan")


def test_all_blocks_kept_measures_zero_on_sparse_steps_only(pipe):
    _, summary = run(pipe, threshold=1.0, measure_error=True)
    error, mode = summary.attention_error, summary.mode
    assert error.shape == mode.shape == (2, 6, 3)  # branch, step, layer
    sparse = (mode == SELECTED) | (mode == REUSED)
    assert sparse[:, 1:].all() and (mode[:, 0] == DENSE).all()
    assert np.isnan(error[:, 0]).all()  # dense step: not measured
    assert not np.isnan(error[:, 1:]).any()
    assert error[:, 1:].max() < 1e-5  # every block kept: the sparse path is exact attention (rotary included)
    per_layer = summary.error_per_layer()
    assert per_layer.shape == (3,) and not np.isnan(per_layer).any() and per_layer.max() < 1e-5


def test_low_threshold_error_matches_an_independent_computation(pipe, monkeypatch):
    """Capture one layer's SDPA calls (q, k, v, scale and the rotary tables the hook took from the processor) and
    the sparse outputs it returned; recompute exact attention in float64 with a complex-number rotation."""
    captured = {}
    attend = SparseAttentionHook.attend

    def spy(hook, call):
        frame = dict(hook._call)
        out = attend(hook, call)
        if hook.layer == 1 and out is not None:
            captured[(frame["branch"], frame["step"])] = (call, frame["rotary"], out)
        return out

    monkeypatch.setattr(SparseAttentionHook, "attend", spy)
    _, summary = run(pipe, threshold=0.3, local_blocks=-1, measure_error=True)
    assert len(captured) == 10  # 2 branches x 5 sparse steps
    error = summary.attention_error
    assert np.nanmin(error) > 1e-3  # dropped blocks change every layer's output
    for (branch, step), (call, rotary, out) in captured.items():
        q, k, v = (call[name].double() for name in ("query", "key", "value"))
        assert rotary is not None and call["attn_mask"] is None
        seq, head_dim = q.shape[-2:]
        cos, sin = (t.reshape(seq, head_dim).double() for t in rotary)
        turn = torch.complex(cos[:, 0::2], sin[:, 1::2])
        q, k = (
            torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * turn).flatten(-2)
            for x in (q, k)
        )
        scale = call["scale"] if call["scale"] is not None else head_dim**-0.5
        dense = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
        expected = float((out.double() - dense).norm() / dense.norm())
        measured = error[summary.branches.index(branch), step, 1]
        assert measured == pytest.approx(expected, rel=1e-4, abs=1e-6), (branch, step)
    assert summary.error_per_layer()[1] == pytest.approx(np.nanmean(error[:, :, 1]))


def test_off_records_nothing_and_changes_nothing(pipe):
    off, summary_off = run(pipe, threshold=0.5)
    on, summary_on = run(pipe, threshold=0.5, measure_error=True)
    assert torch.equal(on, off)  # the generation stays sparse: the dense reference is never returned
    assert np.isnan(summary_off.attention_error).all() and np.isnan(summary_off.error_per_layer()).all()
    assert summary_off.attention_error.shape == summary_off.mode.shape
    np.testing.assert_array_equal(summary_on.density, summary_off.density)
    assert (summary_on.error_per_layer() > 0).all()


def test_two_transformers_merge_their_errors():
    """Wan 2.2: the steps are split between two transformers; each measured entry sits in its own columns."""
    pipe = build_pipeline("wan22")
    _, summary = run(pipe, threshold=0.5, measure_error=True)
    sparse = (summary.mode == SELECTED) | (summary.mode == REUSED)
    assert summary.attention_error.shape == summary.mode.shape
    assert sparse.any() and np.array_equal(~np.isnan(summary.attention_error), sparse)
    assert (summary.attention_error[sparse] > 0).all()


def test_cached_skipped_blocks_are_exact_when_selected(pipe):
    """approximation="cached" in a pipeline: a selection step attends to the lists and to their complement (exact
    attention, a dense call's work in the summary); a reuse step computes the listed blocks only."""
    _, summary = run(pipe, threshold=0.3, local_blocks=-1, approximation="cached", measure_error=True)
    selected, reused = summary.mode == SELECTED, summary.mode == REUSED
    assert selected.any() and reused.any()
    assert summary.attention_error[selected].max() < 1e-5
    assert (summary.attention_error[reused] > 1e-3).all()  # the skipped part is a step old
    assert (summary.density[selected] == 1.0).all() and (summary.density[reused] < 1.0).all()


def test_cached_skipped_part_follows_its_selection_step():
    """Reused on the inputs it was selected on, the cached part gives exact attention again; on moved queries its
    error is a fraction of dropping the same blocks (the skipped blocks' share and output change slowly)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 200, 16, generator=gen) for _ in range(3))
    common = dict(thresholds=torch.full((3,), 0.5), scale=None, text=0, text_first=False, grid=(2, 10, 10))
    cached = db.SparseAttentionConfig(
        threshold=0.5, block_size=32, min_tokens=0, tile=(1, 4, 4), approximation="cached"
    )
    out, selection = sparse_self_attention(q, k, v, config=cached, **common)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, dense)
    assert float(selection.density().mean()) < 0.75 and selection.skipped is not None
    again, reused = sparse_self_attention(q, k, v, config=cached, selection=selection, **common)
    assert reused is selection
    torch.testing.assert_close(again, dense)
    moved = q + 0.1 * torch.randn(q.shape, generator=gen)
    dense = F.scaled_dot_product_attention(moved, k, v)
    approximated = sparse_self_attention(moved, k, v, config=cached, selection=selection, **common)[0]
    dropped_config = dataclasses.replace(cached, approximation=None)
    dropped = sparse_self_attention(moved, k, v, config=dropped_config, selection=selection, **common)[0]
    assert float((approximated - dense).norm()) < 0.2 * float((dropped - dense).norm())


def test_config_measure_error_must_be_a_bool():
    with pytest.raises(ValueError, match="SparseAttentionConfig.measure_error"):
        db.SparseAttentionConfig(measure_error=1)
