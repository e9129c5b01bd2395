"""Text tokens under sparse attention: joint-attention families keep their text exact, unknown ones are refused.

Every intercepted SDPA call of a tiny random-weight model is checked against plain PyTorch
(:mod:`attention_reference`) at a very sparse setting (threshold 0.05, one key block per query block): text queries
get dense attention's output, image queries attend to exactly the blocks their lists name, and those lists hold
every text key block. Runs on CPU through the kernels' PyTorch references.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from attention_reference import attended_order, block_masked_attention, text_positions
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from tiny_models import TEXT_LEN, build_transformer, make_inputs, timestep_for

import diffusers_block as db
from diffusers_block import models
from diffusers_block.attention import token_permutation
from diffusers_block.attention.apply import TextLength
from diffusers_block.attention.hooks import SPARSE_ATTENTION_HOOK, SparseAttentionHook
from diffusers_block.kernels import block_mask_from_index

BS = 8
VERY_SPARSE = db.SparseAttentionConfig(
    threshold=0.05,
    dense_steps=0,
    block_size=BS,
    min_tokens=0,
    min_blocks=1,
    max_blocks=1,
    local_blocks=-1,
    tile=(1, 2, 2),
    fuse_rotary=False,  # the reference gets q and k as the processor rotated them
)
SHORT_TEXT = 5  # flux and sd3 prompts are cut to 5 tokens: the text does not start on a block boundary


def _inputs(family: str) -> dict:
    """Two samples; flux/sd3 with a 5-token prompt, hunyuanvideo with per-sample text padding (2 and 4 tokens)."""
    size = dict(height=16, width=16) if family in ("flux", "sd3") else dict(frames=3)
    inputs = make_inputs(family, batch_size=2, **size)
    inputs.update(timestep_for(family, 500.0, 2))
    if family in ("flux", "sd3"):
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :SHORT_TEXT]
    if family == "flux":
        inputs["txt_ids"] = inputs["txt_ids"][:SHORT_TEXT]
    if family == "hunyuanvideo":
        inputs["encoder_attention_mask"][1, TEXT_LEN - 4 :] = 0
    return inputs


def _text_hooks(block: torch.nn.Module) -> list:
    return [h for h in block._forward_pre_hooks.values() if isinstance(h, TextLength)]


class _Spy:
    """Records each intercepted SDPA call: its hook, inputs, the image-token count, output and selections."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = SparseAttentionHook.attend

        def attend(hook, call):
            frame = hook._call
            index = frame["calls"] if frame is not None else None
            out = original(hook, call)
            selections = {
                sample: sel for (branch, i, sample), sel in hook.selections.items() if i == index and branch == 0
            }
            if out is not None and frame is not None:
                grid = hook.controller.grid
                self.calls.append(
                    dict(hook=hook, call=call, image=frame["image"], out=out, selections=selections, grid=grid)
                )
            return out

        monkeypatch.setattr(SparseAttentionHook, "attend", attend)


def _check_call(record: dict, config: db.SparseAttentionConfig) -> tuple[int, bool]:
    """Assert one sparse call against plain PyTorch; returns (text tokens, whether some image key block was cut)."""
    hook, call, out = record["hook"], record["call"], record["out"]
    q, k, v = call["query"], call["key"], call["value"]
    batch, _, seq, _ = q.shape
    image = record["image"]
    text = seq - image
    text_first = hook.text == "first"
    # Text queries: exactly dense attention (all keys; padding keys masked as SDPA masks them).
    if text:
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=call["attn_mask"], scale=call["scale"])
        rows = text_positions(seq, text, text_first)
        torch.testing.assert_close(out[:, :, rows], dense[:, :, rows], rtol=1e-5, atol=1e-5)
    # The attended order: image tokens (tile order for video), then the text in its own order.
    order = attended_order(seq, text, text_first)
    if config.reorder and record["grid"] is not None:
        perm, _ = token_permutation(record["grid"], config.tile, image, text, text_first=text_first, device=q.device)
        assert torch.equal(perm[image:], order[image:]), "text tokens must not be reordered"
        assert torch.equal(perm[:image].sort().values, order[:image].sort().values)
        order = perm
    cut = False
    for sample, selection in record["selections"].items():
        key_length = selection.shape[1]
        mask = block_mask_from_index(selection.index, selection.count, selection.num_kv_blocks)
        text_block = image // BS if text else mask.shape[-1]
        assert mask[..., text_block:].all(), f"{hook.name}: an image query lost a text key block"
        assert mask[..., text_block:, :].all(), f"{hook.name}: a text query block is not dense"
        cut = cut or not mask[..., :text_block, :text_block].all()
        samples = slice(None) if sample == "all" else slice(sample, sample + 1)
        expected = block_masked_attention(
            q[samples],
            k[samples],
            v[samples],
            mask,
            block_size=BS,
            order=order,
            key_length=key_length if key_length < seq else None,
            scale=call["scale"],
        )
        torch.testing.assert_close(out[samples].double(), expected, rtol=1e-5, atol=1e-5)
    return text, cut


# family: (text placement of the main self-attention, text tokens each joint call must find per sample)
JOINT = {
    "flux": ("first", [SHORT_TEXT]),  # double + single blocks (the single ones concatenate the streams themselves)
    "sd3": ("last", [SHORT_TEXT]),
    "hunyuanvideo": ("last", [TEXT_LEN]),  # double + single blocks, padded prompts (key-padding mask)
    "cogvideox": ("first", [TEXT_LEN]),  # video: image tokens in tile order
    "mochi": ("last", [TEXT_LEN - 2]),  # attends per sample over the valid text tokens only
}


@pytest.mark.parametrize("family", sorted(JOINT))
def test_joint_text_stays_exact_at_high_sparsity(family, monkeypatch):
    placement, texts = JOINT[family]
    spec = models.FAMILIES[family]
    assert spec.block_lists[0].text == placement
    model = build_transformer(family)
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**_inputs(family))
    joint = [r for r in spy.calls if r["hook"].text != "separate"]
    assert {r["hook"].name for r in joint} == {
        ref.name + "." + attr
        for ref in models.resolve_adapter(model).blocks
        for role, attr in ref.spec.sub_blocks.items()
        if role == models.SELF_ATTN
    }, "every joint self-attention ran sparse"
    cuts = []
    for record in spy.calls:
        text, cut = _check_call(record, VERY_SPARSE)
        cuts.append(cut)
        if record["hook"].text != "separate":
            assert text in texts, (record["hook"].name, text)
    assert any(cuts), "the config must really drop image blocks"
    db.disable_sparse_attention(model)


def test_sd35_second_attention_is_image_only(monkeypatch):
    """SD3.5's dual-attention blocks: ``attn`` is joint (text last), ``attn2`` attends over the image tokens only."""
    model = build_transformer("sd3", dual_attention_layers=(0, 1))
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**_inputs("sd3"))
    texts = {record["hook"].name: _check_call(record, VERY_SPARSE)[0] for record in spy.calls}
    assert texts["transformer_blocks.0.attn"] == SHORT_TEXT and texts["transformer_blocks.0.attn2"] == 0
    assert texts["transformer_blocks.1.attn2"] == 0
    db.disable_sparse_attention(model)


@pytest.mark.parametrize("family", ["wan", "pixart"])
def test_cross_attention_models_have_no_text_in_self_attention(family, monkeypatch):
    """Text reaches these models by cross-attention (never hooked): self-attention is image-only, nothing forced."""
    assert all(spec.text == "separate" for spec in models.FAMILIES[family].block_lists)
    model = build_transformer(family)
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**_inputs(family))
    assert spy.calls and all(record["image"] == record["call"]["query"].shape[2] for record in spy.calls)
    assert any(_check_call(record, VERY_SPARSE) == (0, True) for record in spy.calls)
    for ref in models.resolve_adapter(model).blocks:  # no text-length hook on blocks without joint attention
        assert not _text_hooks(ref.module)
    db.disable_sparse_attention(model)


def test_single_stream_block_finds_its_text_without_the_double_blocks(monkeypatch):
    """A Flux single block concatenates [text, image] and hands its attention one sequence: the text length comes
    from that block's own input, also when no double block ran before it in the forward (e.g. they were cached)."""
    model = build_transformer("flux")
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = model.single_transformer_blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**_inputs("flux"))
    handle.remove()
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    attached = model._diffusers_block_sparse_attention.parts["transformer"]
    attached.text_tokens = 0  # as at the start of a forward
    assert len(_text_hooks(model.single_transformer_blocks[0])) == 1
    args, kwargs = captured["call"]
    with torch.no_grad():
        model.single_transformer_blocks[0](*args, **kwargs)
    (record,) = spy.calls
    assert record["hook"].name == "single_transformer_blocks.0.attn"
    assert _check_call(record, VERY_SPARSE)[0] == SHORT_TEXT
    db.disable_sparse_attention(model)
    assert not _text_hooks(model.single_transformer_blocks[0])
    assert model.single_transformer_blocks[0].attn._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK) is None


def test_text_first_padding_mask_is_respected():
    """A key-padding mask with the text first (Chroma-style: [text, image], the prompt's tail padded): the padded
    text keys are ignored as SDPA ignores them, the rest of the text is kept and its queries stay dense."""
    model = build_transformer("flux")
    db.enable_sparse_attention(model, VERY_SPARSE)
    hook = model.transformer_blocks[0].attn._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK)
    gen = torch.Generator().manual_seed(0)
    text, image = 6, 40
    q, k, v = (torch.randn(2, 2, text + image, 24, generator=gen) for _ in range(3))
    valid_text = torch.tensor([6, 3])
    keep = torch.cat([torch.arange(text)[None, :] < valid_text[:, None], torch.ones(2, image, dtype=torch.bool)], 1)
    mask = keep[:, None, None, :]
    hook.controller.on_forward((), {})
    hook._call = {"step": 0, "branch": 0, "image": image, "mode": "select", "calls": 0}
    call = dict(query=q, key=k, value=v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    out = hook.attend(call)
    assert out is not None, "the mask must not force a dense fallback"
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[:, :, :text], dense[:, :, :text], rtol=1e-5, atol=1e-5)
    for sample in (0, 1):
        selection = hook.selections[(0, 0, sample)]
        assert selection.shape[1] == image + int(valid_text[sample])  # padded text keys cut off
        block_mask = block_mask_from_index(selection.index, selection.count, selection.num_kv_blocks)
        assert block_mask[..., image // BS :].all() and block_mask[..., image // BS :, :].all()
        expected = block_masked_attention(
            q[sample : sample + 1],
            k[sample : sample + 1],
            v[sample : sample + 1],
            block_mask,
            block_size=BS,
            order=attended_order(text + image, text, True),
            key_length=selection.shape[1],
        )
        torch.testing.assert_close(out[sample : sample + 1].double(), expected, rtol=1e-5, atol=1e-5)
    db.disable_sparse_attention(model)


# ------------------------------------------------------------------------------------------------------------------
# Refusals: text placement unknown
# ------------------------------------------------------------------------------------------------------------------
class TinyJointTransformer(torch.nn.Module):
    """Not in the adapter table, with two-stream blocks diffusers' registry knows (Flux's): the generic adapter."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(
            [FluxTransformerBlock(dim=48, num_attention_heads=2, attention_head_dim=24) for _ in range(2)]
        )


class TinyBasicTransformer(torch.nn.Module):
    """Not in the adapter table, one-stream BasicTransformerBlocks, with or without cross-attention."""

    def __init__(self, cross_attention: bool):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(
            [BasicTransformerBlock(48, 2, 24, cross_attention_dim=32 if cross_attention else None) for _ in range(2)]
        )

    def forward(self, hidden_states, encoder_hidden_states=None):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
        return hidden_states


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in model.modules())


@pytest.mark.parametrize(
    "model, why",
    [
        (TinyJointTransformer(), "two-stream"),
        (TinyBasicTransformer(cross_attention=False), "no cross-attention"),
    ],
    ids=["generic-two-stream", "generic-single-stream"],
)
def test_generic_joint_model_is_refused(model, why):
    with pytest.raises(db.UnsupportedModelError) as error:
        db.enable_sparse_attention(model, VERY_SPARSE)
    message = str(error.value)
    for part in (type(model).__name__, "text tokens", "unknown", why, "block caching", "text=", "FAMILIES"):
        assert part in message, (part, message)
    assert _no_hooks(model) and not hasattr(model, "_diffusers_block_sparse_attention")


def test_generic_model_with_cross_attention_runs_sparse():
    model = TinyBasicTransformer(cross_attention=True).eval()
    gen = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 64, 48, generator=gen), torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        reference = model(hidden, text)
        db.enable_sparse_attention(model, VERY_SPARSE)
        sparse = model(hidden, text)
    assert db.sparse_attention_summary(model).sparse_density < 1.0 and not torch.allclose(sparse, reference)
    db.disable_sparse_attention(model)
    with torch.no_grad():
        assert torch.equal(model(hidden, text), reference)


def test_table_entry_without_text_placement_is_refused(monkeypatch):
    spec = models.FAMILIES["sd3"]
    unknown = dataclasses.replace(spec, block_lists=(dataclasses.replace(spec.block_lists[0], text=None),))
    monkeypatch.setitem(models.FAMILIES, "sd3", unknown)
    model = build_transformer("sd3")
    with pytest.raises(db.UnsupportedModelError, match=r"SD3Transformer2DModel.*adapter entry 'sd3'.*text is None"):
        db.enable_sparse_attention(model, VERY_SPARSE)
    assert _no_hooks(model)


def test_block_list_spec_rejects_an_unknown_placement():
    with pytest.raises(ValueError, match="text must be one of"):
        models.BlockListSpec("blocks", (models.HIDDEN,), text="middle")


def test_image_only_attention_that_gets_more_tokens_raises():
    """A self-attention declared image-only whose SDPA sees more tokens than its hidden_states has text inside:
    a clear error instead of treating the text as image tokens."""
    model = build_transformer("wan")
    db.enable_sparse_attention(model, VERY_SPARSE)
    hook = model.blocks[0].attn1._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK)
    q = torch.randn(1, 2, 40, 24)
    hook._call = {"step": 0, "branch": 0, "image": 32, "mode": "select", "calls": 0}
    call = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    with pytest.raises(db.UnsupportedModelError, match=r"WanTransformer3DModel.*blocks.0.attn1.*40 tokens.*32"):
        hook.attend(call)
    db.disable_sparse_attention(model)


def test_text_query_blocks_ignore_max_blocks():
    """The selection rule itself (CPU reference): text query blocks keep every key block even with max_blocks=1,
    image query blocks keep the text blocks even past the cap."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 100, 16, generator=gen) for _ in range(2))
    index, count = db.kernels.select_blocks(
        q,
        k,
        block_size=16,
        threshold=0.05,
        max_blocks=1,
        local_blocks=-1,
        forced_keys=(85, 100),
        dense_queries=(85, 100),
    )
    nk = math.ceil(100 / 16)
    mask = block_mask_from_index(index, count, nk)
    assert mask[..., 5:, :].all()  # query blocks 5, 6 hold text queries (85..99)
    assert mask[..., 5:].all()  # key blocks 5, 6 hold the text keys
    assert (count[..., :5] == 2).all()  # image rows: the two text blocks (forced), nothing else (max_blocks=1)


# Families whose model concatenates [text, image] before a list of one-stream blocks (no text argument there): the
# text length comes from the last block of the forward that got text. (AuraFlow prepends 8 register tokens.)
CONCATENATED_BEFORE = {"AuraFlowTransformer2DModel": 16, "ChromaTransformer2DModel": 8}


@pytest.mark.parametrize("cls_name", sorted(CONCATENATED_BEFORE))
def test_lists_after_the_concatenation_find_the_text(cls_name, monkeypatch):
    from tests.coverage import RECIPES

    model, kwargs = RECIPES[cls_name].build()
    config = dataclasses.replace(VERY_SPARSE, block_size=4)
    monkeypatch.setattr(sys.modules[__name__], "BS", 4)
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, config)
    with torch.no_grad():
        model(**kwargs)
    single = [r for r in spy.calls if r["hook"].name.startswith("single_transformer_blocks")]
    assert single and all(r["hook"].text == "first" for r in single)
    assert {_check_call(r, config)[0] for r in spy.calls} == {CONCATENATED_BEFORE[cls_name]}
    db.disable_sparse_attention(model)
