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
from torch.overrides import TorchFunctionMode

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
        self.calls: list[dict] = []  # calls that ran sparse
        self.every: list[dict] = []  # every intercepted call, also those left to the original SDPA
        original = SparseAttentionHook.attend

        def attend(hook, call):
            frame = hook._call
            index = frame["calls"] if frame is not None else None
            image = frame["image"] if frame is not None else None
            out = original(hook, call)
            self.every.append(dict(hook=hook, call=call, image=image, sparse=out is not None))
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
        text_block = image // BS if text else mask.shape[-1]  # the block holding the first text token
        if text:
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
    attached.text_tokens = None  # as at the start of a forward
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
    with pytest.raises(ValueError, match="text_refused explains a text=None"):
        models.BlockListSpec("blocks", (models.HIDDEN,), text="first", text_refused="why")


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


# ------------------------------------------------------------------------------------------------------------------
# Every adapter-table family with joint attention, on its coverage recipe: the table's placement is where the text is
# ------------------------------------------------------------------------------------------------------------------
def _joint_classes() -> list[str]:
    """Coverage recipes of the classes whose adapter entry places text first or last in some block list."""
    from tests.coverage import RECIPES

    joint = {
        cls
        for spec in models.FAMILIES.values()
        if any(lst.text in (models.TEXT_FIRST, models.TEXT_LAST) for lst in spec.block_lists)
        for cls in spec.transformer_classes
    }
    return sorted(joint & set(RECIPES))


class _SdpaInputs(TorchFunctionMode):
    """Records the (query, key) of the SDPA calls made while ``module`` runs; all calls run unchanged."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active = False
        self._handles = [
            module.register_forward_pre_hook(lambda *_: setattr(self, "active", True)),
            module.register_forward_hook(lambda *_: setattr(self, "active", False)),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.active:
            bound = dict(zip(("query", "key"), args), **kwargs)
            self.calls.append((bound["query"], bound["key"]))
        return func(*args, **kwargs)


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Token positions (dim -2 of a (B, H, S, D) tensor) where ``a`` and ``b`` differ."""
    return (a != b).flatten(0, 1).any(-1).any(0).nonzero().flatten().tolist()


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _text_rows_by_perturbation(ref: models.BlockRef, args: tuple, kwargs: dict, carried: torch.Tensor | None):
    """Ground truth, independent of the table: the query and key rows of the block's self-attention SDPA call that
    change when only its text input changes. The text input is the block's text argument; for a block that gets
    the streams already concatenated, the rows of its hidden_states that hold ``carried`` (the text stream the
    previous joint block returned), found by content."""
    attention = getattr(ref.module, ref.spec.sub_blocks[models.SELF_ATTN])
    encoder_index = models.argument_index(ref.module, ref.spec.encoder_arg)
    text = models.get_argument(args, kwargs, ref.spec.encoder_arg, encoder_index)
    if isinstance(text, torch.Tensor):
        name, index, perturbed = ref.spec.encoder_arg, encoder_index, text + torch.randn_like(text)
    else:
        name = ref.spec.hidden_arg
        index = models.argument_index(ref.module, name)
        hidden = models.get_argument(args, kwargs, name, index)
        length = carried.shape[1]
        # Equal in at least half the channels (Bria-Fibo swaps the other half for a text-encoder layer per block).
        at = [
            start
            for start in (0, hidden.shape[1] - length)
            if (hidden[:, start : start + length] == carried).float().mean() >= 0.5
        ]
        assert at, f"{ref.name}: the previous joint block's text is at neither end of the concatenated sequence"
        perturbed = hidden.clone()
        perturbed[:, at[0] : at[0] + length] += torch.randn_like(carried)
    if name in kwargs or index is None or index >= len(args):
        perturbed_args, perturbed_kwargs = args, {**kwargs, name: perturbed}
    else:
        perturbed_args, perturbed_kwargs = (*args[:index], perturbed, *args[index + 1 :]), kwargs
    calls = []
    for call_args, call_kwargs in ((args, kwargs), (perturbed_args, perturbed_kwargs)):
        spy = _SdpaInputs(attention)
        try:
            with torch.no_grad(), spy:
                ref.module(*call_args, **call_kwargs)
        finally:
            spy.remove()
        if not spy.calls:
            return None  # no SDPA in this self-attention (Sana's linear attention)
        calls.append(spy.calls[0])
    (q0, k0), (q1, k1) = calls
    return _changed_rows(q0, q1), _changed_rows(k0, k1), tuple(q0.shape), tuple(k0.shape)


@pytest.mark.parametrize("cls_name", _joint_classes())
def test_table_text_placement_matches_the_model(cls_name, monkeypatch):
    """For every class whose adapter entry says text "first" or "last": (1) in the first block of each such list,
    the rows of the self-attention's query and key that depend on the text input are exactly where the table and
    the hook's text length put the text; (2) at a very sparse setting every call that runs sparse keeps text
    queries equal to dense attention, keeps every text key block in every image query's list and is attention over
    exactly the listed blocks (calls the kernels cannot express, e.g. query and key lengths that differ, stay
    dense); disabling restores the original output."""
    from tests.coverage import RECIPES

    model, kwargs = RECIPES[cls_name].build()
    kwargs = {**kwargs, **(_OPTIONAL_INPUTS[cls_name](kwargs) if cls_name in _OPTIONAL_INPUTS else {})}
    adapter = models.resolve_adapter(model)
    firsts, lasts = {}, {}
    for ref in adapter.blocks:
        firsts.setdefault(ref.spec.attr, ref)
        lasts[ref.spec.attr] = ref
    joint = [ref for ref in firsts.values() if ref.spec.text in ("first", "last")]
    inputs, outputs, handles = {}, {}, []
    for ref in joint:
        handles.append(
            ref.module.register_forward_pre_hook(
                lambda m, a, k, name=ref.name: inputs.setdefault(name, (a, dict(k))), with_kwargs=True
            )
        )
    for ref in lasts.values():
        if models.ENCODER in ref.spec.returns:
            handles.append(
                ref.module.register_forward_hook(lambda m, a, out, ref=ref: outputs.setdefault(ref.spec.attr, out))
            )
    with torch.no_grad():
        reference = _first_tensor(model(**kwargs))
    for handle in handles:
        handle.remove()
    truth = {}
    for ref in joint:
        previous = [attr for attr in outputs if list(firsts).index(attr) < list(firsts).index(ref.spec.attr)]
        carried = None
        if previous:
            last = lasts[previous[-1]]
            carried = outputs[previous[-1]][last.spec.returns.index(models.ENCODER)]
        truth[f"{ref.name}.{ref.spec.sub_blocks[models.SELF_ATTN]}"] = (ref.spec.text,) + _text_rows_by_perturbation(
            ref, *inputs[ref.name], carried
        )

    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**kwargs)
    checked = set()
    for record in spy.every:
        name = record["hook"].name
        if name not in truth:
            continue
        placement, q_rows, k_rows, q_shape, k_shape = truth[name]
        query, key = record["call"]["query"], record["call"]["key"]
        assert (tuple(query.shape), tuple(key.shape)) == (q_shape, k_shape), name
        text = key.shape[2] - record["image"]
        assert text > 0, f"{name}: the hook found no text tokens"
        assert k_rows == text_positions(key.shape[2], text, placement == "first").tolist(), (name, placement, k_rows)
        if query.shape == key.shape:
            assert q_rows == k_rows, (name, q_rows)
            mask = record["call"]["attn_mask"]
            per_query_mask = isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] > 1
            assert record["sparse"] or per_query_mask, f"{name}: a joint self-attention stayed dense without cause"
        else:
            assert q_rows == [] and not record["sparse"]  # image queries only: the original SDPA
        checked.add(name)
    assert checked == set(truth), f"no sparse-attention call checked for {set(truth) - checked}"
    cuts = [_check_call(record, VERY_SPARSE)[1] for record in spy.calls]
    assert all(r["image"] == r["call"]["key"].shape[2] for r in spy.calls if r["hook"].text == "separate")
    if any(record["image"] >= 2 * BS for record in spy.calls):
        assert any(cuts), "the config must really drop image blocks"
    db.disable_sparse_attention(model)
    with torch.no_grad():
        assert torch.equal(_first_tensor(model(**kwargs)), reference)


def _separate_classes() -> list[str]:
    """Coverage recipes of the classes whose every block list's self-attention is image-only (or text-only)."""
    from tests.coverage import RECIPES

    separate = {
        cls
        for spec in models.FAMILIES.values()
        if spec.block_lists and all(lst.text in (models.TEXT_SEPARATE, models.TEXT_ONLY) for lst in spec.block_lists)
        for cls in spec.transformer_classes
    }
    return sorted(separate & set(RECIPES))


# AnyFlow-FAR's causal processor runs on the flex backend only: refused (test_flex_only_processor_is_refused).
FLEX_ONLY = "AnyFlowFARTransformer3DModel"


@pytest.mark.parametrize("cls_name", [cls for cls in _separate_classes() if cls != FLEX_ONLY])
def test_table_image_only_self_attention_matches_the_model(cls_name, monkeypatch):
    """For every class whose adapter entry says its self-attentions see no text ("separate"): changing the first
    block's second stream (text, or LTX-2's audio) changes no row of its self-attention's query or key, and at a
    very sparse setting every hooked call attends over exactly its hidden_states' tokens (the hook raises
    otherwise) and the sparse ones are attention over exactly the listed blocks."""
    from tests.coverage import RECIPES

    model, kwargs = RECIPES[cls_name].build()
    adapter = models.resolve_adapter(model)
    first = adapter.blocks[0]
    captured = {}
    handle = first.module.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("call", (a, dict(k))), with_kwargs=True
    )
    with torch.no_grad():
        reference = _first_tensor(model(**kwargs))
    handle.remove()
    args, call_kwargs = captured["call"]
    encoder = models.get_argument(
        args, call_kwargs, first.spec.encoder_arg, models.argument_index(first.module, first.spec.encoder_arg)
    )
    if isinstance(encoder, torch.Tensor) and models.SELF_ATTN in first.spec.sub_blocks:
        rows = _text_rows_by_perturbation(first, args, call_kwargs, None)
        if rows is None:  # no SDPA call (linear attention): the self-attention's output must not see the text
            index = models.argument_index(first.module, first.spec.encoder_arg)
            attention = getattr(first.module, first.spec.sub_blocks[models.SELF_ATTN])
            if first.spec.encoder_arg in call_kwargs or index is None or index >= len(args):
                perturbed = (args, {**call_kwargs, first.spec.encoder_arg: encoder + torch.randn_like(encoder)})
            else:
                perturbed = ((*args[:index], encoder + torch.randn_like(encoder), *args[index + 1 :]), call_kwargs)
            outs = [_module_output(first.module, attention, *call) for call in ((args, call_kwargs), perturbed)]
            assert torch.equal(*outs), f"{first.name}: its self-attention depends on the text"
        else:
            assert rows[:2] == ([], []), f"{first.name}: its self-attention depends on the text {rows}"
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**kwargs)
    assert all(record["image"] == record["call"]["key"].shape[2] for record in spy.every)
    for record in spy.calls:
        assert _check_call(record, VERY_SPARSE)[0] == 0
    db.disable_sparse_attention(model)
    with torch.no_grad():
        assert torch.equal(_first_tensor(model(**kwargs)), reference)


def _module_output(block: torch.nn.Module, module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``module`` (inside ``block``) returns the first time it runs when ``block`` is called."""
    outputs = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(_first_tensor(out)))
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        handle.remove()
    return outputs[0]


_TEXT_INPUTS = ("encoder_hidden_states", "cap_feats")  # the transformer's prompt argument (Z-Image: cap_feats)
_LATENT_INPUTS = ("hidden_states", "x", "image_cond_hidden_states")  # the image streams (Flux 3: reference image too)


def _flux3_reference_image(kwargs: dict) -> dict:
    ids = kwargs["img_ids"].clone()
    ids[:, 0] = 1  # the reference image's frame index
    return {"image_cond_hidden_states": torch.randn_like(kwargs["hidden_states"]), "image_cond_ids": ids}


# Inputs that make the recipe run its optional lists too.
_OPTIONAL_INPUTS = {"Flux3Transformer2DModel": _flux3_reference_image}


def _perturb(value):
    return (
        value + torch.randn_like(value) if isinstance(value, torch.Tensor) else [v + torch.randn_like(v) for v in value]
    )


def _refiner_classes() -> list[str]:
    """Coverage recipes of the classes with a text-only list (refiners of one stream before the streams meet; a
    model built without its optional text refiner, e.g. Bria-Fibo-2, still has its image refiners checked)."""
    from tests.coverage import RECIPES

    classes = {
        cls
        for spec in models.FAMILIES.values()
        if any(lst.text == models.TEXT_ONLY for lst in spec.block_lists)
        for cls in spec.transformer_classes
    }
    return sorted(classes & set(RECIPES))


@pytest.mark.parametrize("cls_name", _refiner_classes())
def test_table_refiner_streams_match_the_model(cls_name):
    """For every class with a ``"only"`` list (a text refiner), from the transformer's own inputs: the self-attention
    output of the first block of each ``"only"`` list changes with the prompt and never with the latents, and that of
    each ``"separate"`` list beside it (the image refiners: their blocks get no text argument to perturb) the
    reverse. This checks the placement of lists that take one stream alone, whatever argument carries it."""
    from tests.coverage import RECIPES

    model, kwargs = RECIPES[cls_name].build()
    kwargs = {**kwargs, **(_OPTIONAL_INPUTS[cls_name](kwargs) if cls_name in _OPTIONAL_INPUTS else {})}
    adapter = models.resolve_adapter(model)
    firsts = {}
    for ref in adapter.blocks:
        firsts.setdefault(ref.spec.attr, ref)
    lists = [ref for ref in firsts.values() if ref.spec.text in (models.TEXT_ONLY, models.TEXT_SEPARATE)]
    assert lists
    (text_arg,) = [name for name in _TEXT_INPUTS if name in kwargs]
    latent_args = [name for name in _LATENT_INPUTS if name in kwargs]
    torch.manual_seed(0)
    runs = {
        "base": kwargs,
        "text": {**kwargs, text_arg: _perturb(kwargs[text_arg])},
        "latent": {**kwargs, **{name: _perturb(kwargs[name]) for name in latent_args}},
    }
    for ref in lists:
        attention = getattr(ref.module, ref.spec.sub_blocks[models.SELF_ATTN])
        out = {name: _module_output(model, attention, (), run) for name, run in runs.items()}
        sees, blind = ("text", "latent") if ref.spec.text == models.TEXT_ONLY else ("latent", "text")
        assert torch.equal(out["base"], out[blind]), (
            f"{ref.name} ({ref.spec.text}): its self-attention sees the {blind}"
        )
        assert not torch.equal(out["base"], out[sees]), f"{ref.name} ({ref.spec.text}): it does not see the {sees}"


def test_text_only_list_is_left_dense(monkeypatch):
    """A text-only block list (``text="only"``: Lumina 2's context refiner) gets no sparse-attention hook and
    gives dense attention's output; the image-only noise refiner beside it runs sparse. (Lumina 2 as a whole is
    refused for its joint ``layers``; the entry is cut to its two refiners here.)"""
    from tests.coverage import RECIPES

    spec = models.FAMILIES["lumina2"]
    refiners = dataclasses.replace(spec, block_lists=tuple(lst for lst in spec.block_lists if lst.attr != "layers"))
    assert [lst.text for lst in refiners.block_lists] == ["separate", "only"]
    monkeypatch.setitem(models.FAMILIES, "lumina2", refiners)
    model, kwargs = RECIPES["Lumina2Transformer2DModel"].build()
    outputs = {}

    def keep(name):
        return lambda module, args, out: outputs.setdefault(name, []).append(out)

    handle = model.context_refiner[-1].register_forward_hook(keep("context"))
    with torch.no_grad():
        model(**kwargs)
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    hooked = {record["hook"].name.split(".")[0] for record in spy.every}
    assert hooked == {"noise_refiner"} and spy.calls, hooked
    for block in model.context_refiner:
        assert getattr(getattr(block.attn, "_diffusers_hook", None), "hooks", {}).get(SPARSE_ATTENTION_HOOK) is None
    torch.testing.assert_close(outputs["context"][1], outputs["context"][0], rtol=0, atol=0)
    db.disable_sparse_attention(model)


def test_concatenated_block_without_a_text_length_raises():
    """A block that gets text and image already concatenated (Chroma's single blocks) learns the text length from
    the joint blocks before it in the same forward; called alone, with none before it, it raises a clear error
    instead of treating the text as image tokens."""
    from tests.coverage import RECIPES

    model, kwargs = RECIPES["ChromaTransformer2DModel"].build()
    captured = {}
    block = model.single_transformer_blocks[0]
    handle = block.register_forward_pre_hook(
        lambda m, a, k: captured.setdefault("call", (a, dict(k))), with_kwargs=True
    )
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    db.enable_sparse_attention(model, VERY_SPARSE)
    model._diffusers_block_sparse_attention.parts["transformer"].text_tokens = None  # as at the start of a forward
    args, call_kwargs = captured["call"]
    with pytest.raises(db.UnsupportedModelError, match=r"single_transformer_blocks.0.attn.*no block of this forward"):
        with torch.no_grad():
            block(*args, **call_kwargs)
    db.disable_sparse_attention(model)


def _refused_classes() -> list[str]:
    """Coverage recipes of the classes with a list whose placement is refused with a reason (``text_refused``)."""
    from tests.coverage import RECIPES

    refused = {
        cls
        for spec in models.FAMILIES.values()
        if any(lst.text_refused for lst in spec.block_lists)
        for cls in spec.transformer_classes
    }
    return sorted(refused & set(RECIPES))


@pytest.mark.parametrize("cls_name", _refused_classes())
def test_joint_sequence_without_a_fixed_text_place_is_refused_with_why(cls_name):
    from tests.coverage import RECIPES

    model, _ = RECIPES[cls_name].build()
    with pytest.raises(db.UnsupportedModelError) as error:
        db.enable_sparse_attention(model, VERY_SPARSE)
    message = str(error.value)
    ref = next(ref for ref in models.resolve_adapter(model).blocks if ref.spec.text_refused)
    assert ref.spec.text is None and ref.spec.text_refused in message
    for part in (cls_name, f"`{ref.name}`", "no fixed place", "block caching"):
        assert part in message, (part, message)
    assert _no_hooks(model)


def test_concatenated_blocks_keep_their_text_length_under_block_caching(monkeypatch):
    """With block caching reusing whole steps, Chroma's single blocks (streams concatenated by the transformer)
    still get the text length of the joint blocks before them: every sparse call keeps its text exact."""
    from tests.coverage import RECIPES
    from tests.coverage.outcome import PERMISSIVE, _steps

    model, kwargs = RECIPES["ChromaTransformer2DModel"].build()
    db.enable_block_cache(model, PERMISSIVE)
    spy = _Spy(monkeypatch)
    db.enable_sparse_attention(model, VERY_SPARSE)
    _steps(model, kwargs, 4)
    single = [record for record in spy.every if record["hook"].name.startswith("single_transformer_blocks")]
    assert single and all(record["call"]["key"].shape[2] - record["image"] == 8 for record in single)
    for record in spy.calls:
        assert _check_call(record, VERY_SPARSE)[0] == 8  # the recipe's 8 text tokens
    db.disable_sparse_attention(model)
    db.disable_block_cache(model)


def test_flex_only_processor_is_refused():
    """A processor that runs on the flex backend only (AnyFlow-FAR's causal one) cannot be served by hooks that
    receive native SDPA calls: enable_sparse_attention says so before hooking anything; block caching still works."""
    from tests.coverage import RECIPES

    model, kwargs = RECIPES[FLEX_ONLY].build()
    with pytest.raises(models.UnsupportedModelError, match="only runs on the 'flex'"):
        db.enable_sparse_attention(model, db.SparseAttentionConfig(min_tokens=0, block_size=8, dense_steps=0))
    assert not any(
        hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(SPARSE_ATTENTION_HOOK) for m in model.modules()
    )
