"""Sparse attention through stock diffusers pipelines and bare transformers of every family (CPU: the kernels'
PyTorch references run), plus the config, the token layout and the summary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, TEXT_LEN, build_transformer, make_inputs, timestep_for
from tiny_pipelines import PIPELINES, build_pipeline, call_kwargs

import diffusers_block as db
from diffusers_block.attention import token_grid, token_permutation
from diffusers_block.attention.hooks import SPARSE_ATTENTION_HOOK
from diffusers_block.attention.summary import DENSE, REUSED, SELECTED
from diffusers_block.models import FAMILIES as ADAPTERS

# Tiny models have 32-128 tokens: blocks of 8 tokens, nothing too short to be sparse.
ALL_KEPT = db.SparseAttentionConfig(threshold=1.0, dense_steps=0, block_size=8, min_tokens=0)
SPARSE = db.SparseAttentionConfig(threshold=0.5, dense_steps=1, refresh_interval=2, block_size=8, min_tokens=0)


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipe(**call_kwargs(name, **kwargs))[0]


def forward(model, family, batch_size=2):
    inputs = make_inputs(family, batch_size=batch_size, frames=3)
    inputs.update(timestep_for(family, 500.0, batch_size))
    with torch.no_grad():
        return model(**inputs)[0]


# ------------------------------------------------------------------------------------------------------------------
# Pipelines (pipe.enable_sparse_attention and friends)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_all_kept_sparse_disable(name):
    pipe = build_pipeline(name)
    reference = generate(pipe, name)

    pipe.enable_sparse_attention(ALL_KEPT)
    all_kept = generate(pipe, name)
    torch.testing.assert_close(all_kept, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    summary = pipe.sparse_attention_summary()
    assert summary.sparse_density == 1.0 and (summary.mode == 1).any()

    pipe.enable_sparse_attention(SPARSE)
    sparse = generate(pipe, name)
    assert not torch.equal(sparse, reference)
    assert float((sparse - reference).norm() / reference.norm()) < 0.5
    summary = pipe.sparse_attention_summary()
    assert summary.num_steps == 6
    # step 0 dense; masks selected at steps 1, 3, 5 and reused at 2, 4 (refresh_interval=2)
    ran = summary.mode[0, :, 0]
    assert ran.tolist() == [0, 1, 2, 1, 2, 1] or name == "wan22"  # wan22 splits the steps between transformers
    assert 0.0 < summary.sparse_density < 1.0
    assert summary.overall_density > summary.sparse_density

    pipe.disable_sparse_attention()
    assert torch.equal(generate(pipe, name), reference)
    assert not hasattr(pipe, "_diffusers_block_sparse_attention")
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook(SPARSE_ATTENTION_HOOK) is None


@pytest.mark.parametrize("name", ["sd3", "wan"])
@pytest.mark.parametrize("first", ["cache", "sparse"])
def test_composes_with_block_cache_in_either_order(name, first):
    cache = db.StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=1)
    pipe = build_pipeline(name)
    reference = generate(pipe, name)
    pipe.enable_block_cache(cache)
    cached_only = generate(pipe, name)
    pipe.disable_block_cache()
    pipe.enable_sparse_attention(SPARSE)
    sparse_only = generate(pipe, name)
    pipe.disable_sparse_attention()

    steps = [lambda: pipe.enable_block_cache(cache), lambda: pipe.enable_sparse_attention(SPARSE)]
    for enable in steps if first == "cache" else steps[::-1]:
        enable()
    both = generate(pipe, name)
    assert pipe.block_cache_summary().fraction_computed == pytest.approx(4 / 6)
    sparse_summary = pipe.sparse_attention_summary()
    assert sparse_summary.num_steps == 6 and 0.0 < sparse_summary.sparse_density < 1.0
    assert not torch.equal(both, cached_only) and not torch.equal(both, sparse_only)
    # Each feature comes off on its own, in either order, and the other keeps working.
    pipe.disable_block_cache()
    assert torch.equal(generate(pipe, name), sparse_only)
    assert pipe.sparse_attention_summary().num_steps == 6  # still counts steps after the cache's tracker left
    pipe.enable_block_cache(cache)
    pipe.disable_sparse_attention()
    assert torch.equal(generate(pipe, name), cached_only)
    pipe.disable_block_cache()
    assert torch.equal(generate(pipe, name), reference)


def test_refresh_schedule_follows_the_pipeline_steps():
    """The pipeline's step count places the schedule's stages: a selection every step in the first half, then every
    third step."""
    pipe = build_pipeline("wan")
    pipe.enable_sparse_attention(dataclasses.replace(SPARSE, refresh_schedule=((0.0, 1), (0.5, 3))))
    generate(pipe, "wan")
    mode = pipe.sparse_attention_summary().mode[0, :, 0]  # branch cond, layer 0, over the 6 steps
    assert mode.tolist() == [DENSE, SELECTED, SELECTED, REUSED, REUSED, SELECTED]


def test_summary_density_and_mask_picture(tmp_path):
    pipe = build_pipeline("wan")
    pipe.enable_sparse_attention(SPARSE)
    generate(pipe, "wan")
    summary = pipe.sparse_attention_summary()
    assert summary.branches == ["cond", "uncond"]
    assert summary.layer_names == [f"blocks.{i}.attn1" for i in range(3)]
    assert summary.density.shape == (2, 6, 3, 2)  # branch, step, layer, head
    assert np.all(summary.density[:, 0] == 1.0)  # dense step
    per_layer = summary.density_per_layer()
    assert per_layer.shape == (3,) and np.all((per_layer > 0) & (per_layer < 1))
    assert summary.density_per_step()[0] == 1.0
    mask = summary.block_mask("blocks.0.attn1", head=1)
    assert mask.dtype == bool and mask.shape == (4, 4)  # 2 frames x 4 x 4 tokens = 32 tokens = 4 blocks of 8
    assert mask[np.arange(4), np.arange(4)].all()  # own block always kept
    summary.plot(tmp_path / "density.png")
    summary.plot_mask(tmp_path / "mask.png", layer=0)
    assert (tmp_path / "density.png").stat().st_size > 0 and (tmp_path / "mask.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------------------------
# Bare transformers of every family (SDPA processors and dispatcher processors)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_family_all_kept_equals_dense_and_sparse_differs(family):
    model = build_transformer(family)
    reference = forward(model, family)
    db.enable_sparse_attention(model, ALL_KEPT)
    torch.testing.assert_close(forward(model, family), reference, rtol=1e-4, atol=1e-4)
    summary = db.sparse_attention_summary(model)
    assert (summary.mode == 1).all(), summary.mode  # every self-attention call went through the sparse path
    db.enable_sparse_attention(
        model, db.SparseAttentionConfig(threshold=0.3, dense_steps=0, block_size=8, min_tokens=0, local_blocks=-1)
    )
    sparse = forward(model, family)
    assert not torch.allclose(sparse, reference, atol=1e-3)
    assert db.sparse_attention_summary(model).sparse_density < 1.0
    db.disable_sparse_attention(model)
    assert torch.equal(forward(model, family), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_cached_skipped_blocks_are_exact_on_the_selection_call(family):
    """approximation="cached" on every family (text tokens, padded prompts, rotary, both processor routes): the call
    that selects the lists also attends to their complement, so it returns exact attention; a later call on the same
    inputs reuses the lists and the cached part and is exact again."""
    model = build_transformer(family)
    reference = forward(model, family)
    config = db.SparseAttentionConfig(
        threshold=0.3, dense_steps=0, block_size=8, min_tokens=0, local_blocks=-1, approximation="cached"
    )
    db.enable_sparse_attention(model, config)
    torch.testing.assert_close(forward(model, family), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(forward(model, family), reference, rtol=1e-4, atol=1e-4)
    summary = db.sparse_attention_summary(model)
    assert (summary.mode[:, 0] == SELECTED).all() and (summary.mode[:, 1] == REUSED).all()
    assert (summary.density[:, 0] == 1.0).all() and (summary.density[:, 1] < 0.8).all()  # blocks really skipped
    db.disable_sparse_attention(model)


# Families tests/tiny_models builds (the others' placements: test_sparse_text.test_table_text_placement_matches_the_model).
JOINT = sorted(name for name in FAMILIES if ADAPTERS[name].block_lists[0].text in ("first", "last"))


@pytest.mark.parametrize("family", JOINT)
def test_joint_attention_keeps_text(family):
    """Joint families: the text tokens are found in the sequence (the right count), every query block keeps the text
    key blocks, and text queries keep everything, even at a tiny threshold."""
    model = build_transformer(family)
    db.enable_sparse_attention(
        model,
        db.SparseAttentionConfig(
            threshold=0.01, dense_steps=0, block_size=8, min_tokens=0, local_blocks=-1, reorder=False
        ),
    )
    forward(model, family, batch_size=1)
    attached = model._diffusers_block_sparse_attention.parts["transformer"]
    valid_text = TEXT_LEN - 2 if family in ("mochi", "hunyuanvideo") else TEXT_LEN  # tiny prompts pad 2 tokens
    for layer, selection in attached.last_selection.items():
        seq = selection.shape[0][2]
        keys = selection.shape[1]
        image = seq - (TEXT_LEN if family != "mochi" else valid_text)
        assert keys - image == valid_text, (attached.layer_names[layer], seq, keys)
        mask = db.kernels.block_mask_from_index(selection.index, selection.count, selection.num_kv_blocks)
        assert mask[..., image // 8 :].all()  # text key blocks (text is last in the attended order)
        assert mask[..., -1, :].all()  # the last query block holds text queries: dense
        assert not mask[..., : image // 8 - 1, : image // 8 - 1].all()  # image blocks are sparse
    db.disable_sparse_attention(model)


def test_dispatcher_backend_is_switched_to_native_for_the_call():
    """A processor set to another dispatcher backend still goes through the sparse path, and keeps its setting."""
    model = build_transformer("wan")
    processor = model.blocks[0].attn1.processor
    processor._attention_backend = "_native_math"
    db.enable_sparse_attention(model, ALL_KEPT)
    forward(model, "wan")
    assert (db.sparse_attention_summary(model).mode[..., 0] == 1).all()
    assert processor._attention_backend == "_native_math"
    db.disable_sparse_attention(model)


def test_masks_other_than_key_padding_run_dense():
    model = build_transformer("wan")
    db.enable_sparse_attention(model, ALL_KEPT)
    hook = model.blocks[0].attn1._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK)
    q = torch.randn(1, 2, 32, 24)
    hook._call = {"step": 0, "branch": 0, "image": 32, "mode": "select", "calls": 0}
    causal = torch.ones(32, 32, dtype=torch.bool).tril()[None, None]
    assert (
        hook.attend(
            {
                "query": q,
                "key": q,
                "value": q,
                "attn_mask": causal,
                "dropout_p": 0.0,
                "is_causal": False,
                "scale": None,
                "enable_gqa": False,
            }
        )
        is None
    )
    out = hook.attend(
        {
            "query": q,
            "key": q,
            "value": q,
            "attn_mask": None,
            "dropout_p": 0.0,
            "is_causal": False,
            "scale": None,
            "enable_gqa": False,
        }
    )
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), rtol=1e-5, atol=1e-5)
    db.disable_sparse_attention(model)


def test_key_padding_mask_with_per_sample_lengths():
    """HunyuanVideo-style text padding (valid keys a prefix, lengths differing per sample): each sample attends to
    its own valid keys, as SDPA with the boolean mask does."""
    model = build_transformer("hunyuanvideo")
    db.enable_sparse_attention(model, ALL_KEPT)
    hook = model.transformer_blocks[0].attn._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 32, 24, generator=gen) for _ in range(3))
    lengths = torch.tensor([30, 27])
    mask = (torch.arange(32)[None, :] < lengths[:, None])[:, None, None, :]
    hook.controller.on_forward((), {})  # a fresh forward: no cached key lengths
    hook._call = {"step": 0, "branch": 0, "image": 24, "mode": "select", "calls": 0}
    out = hook.attend(
        {
            "query": q,
            "key": k,
            "value": v,
            "attn_mask": mask,
            "dropout_p": 0.0,
            "is_causal": False,
            "scale": None,
            "enable_gqa": False,
        }
    )
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-5)
    assert {key[2] for key in hook.selections} == {0, 1}  # one selection per sample
    db.disable_sparse_attention(model)


# ------------------------------------------------------------------------------------------------------------------
# Config, layout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.2), "threshold"),
        (dict(head_thresholds=(0.5, 2.0)), "head_thresholds"),
        (dict(dense_steps=-1), "dense_steps"),
        (dict(refresh_interval=0), "refresh_interval"),
        (dict(block_size=96), "block_size"),
        (dict(min_blocks=3, max_blocks=2), "max_blocks"),
        (dict(approximation="second"), "approximation"),
        (dict(tile=(2, 8)), "tile"),
        (dict(local_blocks=-2), "local_blocks"),
        (dict(refresh_schedule=((0.1, 2),)), "refresh_schedule"),  # must start at 0.0
        (dict(refresh_schedule=((0.0, 2), (0.5, 0))), "refresh_schedule"),
        (dict(refresh_schedule=((0.0, 2), (0.5, 4), (0.5, 8))), "refresh_schedule"),
        (dict(refresh_schedule=((0.0, 2), (1.0, 4))), "refresh_schedule"),
        (dict(refresh_schedule=4), "refresh_schedule"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"SparseAttentionConfig.{field}"):
        db.SparseAttentionConfig(**kwargs)


def test_config_step_modes_and_head_thresholds():
    config = db.SparseAttentionConfig(dense_steps=2, refresh_interval=3)
    modes, last = [], None
    for step in range(8):
        mode = config.step_mode(step, last)
        last = step if mode == "select" else last
        modes.append(mode)
    assert modes == ["dense", "dense", "select", "reuse", "reuse", "select", "reuse", "reuse"]
    schedule = db.SparseAttentionConfig(dense_steps=2, refresh_schedule=[(0, 2), (0.5, 4)])
    assert schedule.refresh_schedule == ((0.0, 2), (0.5, 4))
    selected, last = [], None
    for step in range(20):
        if schedule.step_mode(step, last, num_steps=20) == "select":
            selected.append(last := step)
    assert selected == [2, 4, 6, 8, 12, 16]  # every 2nd step in the first half, every 4th after
    assert schedule.interval_at(15) == 2  # step count unknown: the first interval
    assert db.SparseAttentionConfig(head_thresholds=(0.5, 0.9)).thresholds(2) == (0.5, 0.9)
    with pytest.raises(ValueError, match="one threshold per head"):
        db.SparseAttentionConfig(head_thresholds=(0.5, 0.9)).thresholds(3)


def test_tile_permutation_is_local_and_invertible():
    grid, tile = (3, 6, 10), (2, 4, 4)
    perm, inverse = token_permutation(grid, tile, 180, 5, text_first=True, device=torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(185))
    x = torch.arange(185)
    assert torch.equal(x[perm][inverse], x)
    assert perm[-5:].tolist() == [0, 1, 2, 3, 4]  # text (first in the sequence) goes last
    f, r, c = np.unravel_index((perm[:32] - 5).numpy(), grid)  # the first 32 image tokens: one full 2x4x4 tile
    assert set(f) == {0, 1} and set(r) == {0, 1, 2, 3} and set(c) == {0, 1, 2, 3}
    perm, _ = token_permutation(None, tile, 10, 3, text_first=False, device=torch.device("cpu"))
    assert perm.tolist() == list(range(13))


def test_token_grid_per_family():
    for family, expected in (
        ("wan", (3, 4, 4)),
        ("cogvideox", (3, 4, 4)),
        ("ltx", (3, 8, 8)),
        ("dit", (1, 4, 4)),
        ("hunyuanvideo", (3, 4, 4)),
        ("mochi", (3, 4, 4)),
    ):
        model = build_transformer(family)
        inputs = make_inputs(family, frames=3)
        assert token_grid(family, model.config, (), inputs) == expected, family
    assert token_grid("flux", build_transformer("flux").config, (), make_inputs("flux")) is None
