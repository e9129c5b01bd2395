"""Tiny random-weight diffusers transformers and deterministic forward inputs, for tests.

``build_transformer(family)`` builds a fp32, eval-mode model (2 heads x 24 = width 48; 3 blocks, or 2 double +
2 single) whose weights are all re-drawn from a seeded fan-in normal init: diffusers zero-initialises adaLN-zero
gates, ``proj_out`` and some tables, so a fresh model would have identity blocks and constant outputs.
``make_inputs(family)`` gives the forward kwargs of one denoising step except the timestep, which
``timestep_for(family, t)`` adds. Checked against diffusers 0.42.1 by running forwards with block hooks:

============ ========================= ================================== ================== =======================
family       block list attr(s)        block class                        block returns      submodules of a block
============ ========================= ================================== ================== =======================
dit          transformer_blocks        BasicTransformerBlock              hidden             attn1, ff (attn2 None)
pixart       transformer_blocks        BasicTransformerBlock              hidden             attn1, attn2, ff
sd3          transformer_blocks        JointTransformerBlock              (enc, hidden) [1]  attn, ff, ff_context
flux         transformer_blocks        FluxTransformerBlock               (enc, hidden)      attn, ff, ff_context
flux         single_transformer_blocks FluxSingleTransformerBlock         (enc, hidden) [2]  attn, proj_mlp, proj_out
cogvideox    transformer_blocks        CogVideoXBlock                     (hidden, enc)      attn1, ff
wan          blocks                    WanTransformerBlock                hidden             attn1, attn2, ffn
hunyuanvideo transformer_blocks        HunyuanVideoTransformerBlock       (hidden, enc)      attn, ff, ff_context
hunyuanvideo single_transformer_blocks HunyuanVideoSingleTransformerBlock (hidden, enc) [2]  attn, proj_mlp, proj_out
ltx          transformer_blocks        LTXVideoTransformerBlock           hidden             attn1, attn2, ff
mochi        transformer_blocks        MochiTransformerBlock              (hidden, enc) [3]  attn1, ff, ff_context
allegro      transformer_blocks        AllegroTransformerBlock            hidden             attn1, attn2, ff
============ ========================= ================================== ================== =======================

Joint-attention blocks (sd3, flux, hunyuanvideo double, mochi) attend over text+image tokens in one ``attn``/``attn1``
that also owns the context projections (``add_q_proj``...); a separate cross-attention exists only as ``attn2``
(pixart, wan, ltx, allegro). [1] The last SD3 block is ``context_pre_only``: it returns ``(None, hidden)`` and its
``ff_context`` is None (SD3 ``attn2`` is None unless ``dual_attention_layers``). [2] Single blocks take and return
both streams but concatenate them (text first) internally, so the text stream changes too. [3] The last Mochi
block is ``context_pre_only``: it returns the text stream unchanged and its ``ff_context`` is None.
Basic/JointTransformerBlock support feed-forward chunking (``_chunk_size``, SD3 ``enable_forward_chunking``);
SD3's forward also takes ``skip_layers``.

Layouts (the output has the shape of ``hidden_states`` for every family): dit/pixart/sd3 (B, C, H, W), DiT needs
H == W; cogvideox (B, F, C, H, W); wan/hunyuanvideo/mochi/allegro (B, C, F, H, W); flux packs 2x2 patches,
(B, H/2*W/2, 4C) plus ``img_ids``/``txt_ids``; ltx takes tokens (B, F*H*W, C) plus ``num_frames``/``height``/
``width``. Real DiT/PixArt predict 2C channels (learned sigma); here out = in channels. Text masks pad the last
2 of 8 tokens, and every masked family ignores those tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from diffusers import (
    AllegroTransformer3DModel,
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

from diffusers_block.random_weights import random_init_

FAMILIES: tuple[str, ...] = (
    "dit",
    "pixart",
    "sd3",
    "flux",
    "cogvideox",
    "wan",
    "hunyuanvideo",
    "ltx",
    "mochi",
    "allegro",
)

HEADS, HEAD_DIM = 2, 24
WIDTH = HEADS * HEAD_DIM  # 48
TEXT_LEN, TEXT_DIM, POOLED_DIM = 8, 32, 16
_ATTN = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
_AXES = (8, 8, 8)  # RoPE split of HEAD_DIM over (frame, row, col)


# --- extra forward kwargs; each maker gets a context `c` with b, f, h, w and rand(*per_sample_shape) ---
def _text_mask(c):  # tokenizer-style padding: the last 2 prompt tokens are padding
    return (torch.arange(TEXT_LEN) < TEXT_LEN - 2).long().expand(c.b, -1).clone()


def _flux_img_ids(c):  # (row, col) position of each packed 2x2 patch, channel 0 unused
    rows, cols = torch.meshgrid(torch.arange(c.h // 2), torch.arange(c.w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def _allegro_rope(c):  # same as AllegroPipeline._prepare_rotary_positional_embeddings (patch size 2)
    grid = (c.h // 2, c.w // 2)
    *freqs, gt, gh, gw = get_3d_rotary_pos_embed_allegro(HEAD_DIM, ((0, 0), grid), grid, c.f, (2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).T.reshape(3, 1, -1)
    return tuple(freqs), tuple(pos)


def _const(value):
    return lambda c: torch.full((c.b,), value)


_POOLED = {"pooled_projections": lambda c: c.rand(POOLED_DIM)}
_MASK = {"encoder_attention_mask": _text_mask}


@dataclass(frozen=True)
class _Spec:
    cls: type
    config: dict
    layout: str  # per-sample hidden_states layout: letters of "CFHW", or "packed2x2" (flux) / "tokens" (ltx)
    timestep: str = "float"  # "long" | "float" | "unit" (t / 1000) | "reversed" (1000 - t)
    extras: dict[str, Callable] = field(default_factory=dict)
    channels: int = 4  # latent channels (before flux's 2x2 packing)
    text: bool = True  # takes encoder_hidden_states (DiT is class-conditional)


_SPECS: dict[str, _Spec] = {
    "dit": _Spec(
        DiTTransformer2DModel,
        dict(**_ATTN, num_layers=3, in_channels=4, out_channels=4, sample_size=8),
        "CHW",
        "long",
        {"class_labels": lambda c: torch.arange(c.b) * 7 % 1000},
        text=False,
    ),
    "pixart": _Spec(
        PixArtTransformer2DModel,
        dict(
            **_ATTN,
            num_layers=3,
            in_channels=4,
            out_channels=4,
            sample_size=8,
            cross_attention_dim=WIDTH,
            caption_channels=TEXT_DIM,
        ),
        "CHW",
        "long",
        {**_MASK, "added_cond_kwargs": lambda c: {"resolution": None, "aspect_ratio": None}},
    ),
    "sd3": _Spec(
        SD3Transformer2DModel,
        dict(
            **_ATTN,
            num_layers=3,
            in_channels=4,
            out_channels=4,
            sample_size=8,
            pos_embed_max_size=32,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=WIDTH,
            pooled_projection_dim=POOLED_DIM,
        ),
        "CHW",
        "float",
        _POOLED,
    ),
    "flux": _Spec(
        FluxTransformer2DModel,
        dict(
            **_ATTN,
            num_layers=2,
            num_single_layers=2,
            in_channels=16,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True,
            axes_dims_rope=_AXES,
        ),
        "packed2x2",
        "unit",
        {**_POOLED, "guidance": _const(3.5), "img_ids": _flux_img_ids, "txt_ids": lambda c: torch.zeros(TEXT_LEN, 3)},
    ),
    "cogvideox": _Spec(  # CogVideoX-2b style: sincos positions, text length must equal max_text_seq_length
        CogVideoXTransformer3DModel,
        dict(
            **_ATTN,
            num_layers=3,
            in_channels=4,
            out_channels=4,
            time_embed_dim=32,
            text_embed_dim=TEXT_DIM,
            sample_height=8,
            sample_width=8,
            sample_frames=5,
            max_text_seq_length=TEXT_LEN,
        ),
        "FCHW",
        "long",
    ),
    "wan": _Spec(
        WanTransformer3DModel,
        dict(**_ATTN, num_layers=3, in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=96),
        "CFHW",
        "float",
    ),
    "hunyuanvideo": _Spec(
        HunyuanVideoTransformer3DModel,
        dict(
            **_ATTN,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            in_channels=4,
            out_channels=4,
            text_embed_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            rope_axes_dim=_AXES,
        ),
        "CFHW",
        "float",
        {**_POOLED, **_MASK, "guidance": _const(6000.0)},  # pipeline passes scale * 1000
    ),
    "ltx": _Spec(
        LTXVideoTransformer3DModel,
        dict(
            **_ATTN, num_layers=3, in_channels=8, out_channels=8, cross_attention_dim=WIDTH, caption_channels=TEXT_DIM
        ),
        "tokens",
        "float",
        {
            **_MASK,
            "num_frames": lambda c: c.f,
            "height": lambda c: c.h,
            "width": lambda c: c.w,
            "rope_interpolation_scale": lambda c: (8 / 25, 32, 32),
        },  # (vae_t / frame_rate, vae_s, vae_s)
        channels=8,
    ),
    "mochi": _Spec(  # Mochi's model timestep is reversed (the pipeline reports 1000 - t as current timestep)
        MochiTransformer3DModel,
        dict(
            **_ATTN,
            num_layers=3,
            in_channels=4,
            pooled_projection_dim=TEXT_DIM,
            text_embed_dim=TEXT_DIM,
            time_embed_dim=32,
        ),
        "CFHW",
        "reversed",
        _MASK,
    ),
    "allegro": _Spec(
        AllegroTransformer3DModel,
        dict(
            **_ATTN,
            num_layers=3,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=WIDTH,
            caption_channels=TEXT_DIM,
            sample_height=8,
            sample_width=8,
            sample_frames=2,
        ),
        "CFHW",
        "float",
        {**_MASK, "image_rotary_emb": _allegro_rope},
    ),
}


@torch.no_grad()
def build_transformer(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """``config`` overrides entries of the family's tiny config (e.g. SD3.5's ``dual_attention_layers``)."""
    spec = _SPECS[family]
    torch.manual_seed(seed)
    model = spec.cls(**{**spec.config, **config})
    random_init_(model, seed, smooth_timesteps=False)
    return model.eval()  # built in fp32 (the default dtype)


def build_unet() -> torch.nn.Module:
    """A tiny UNet2DModel: the model family the block cache and sparse attention refuse (no transformer blocks)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def _sampler(batch_size: int, seed: int) -> Callable[..., torch.Tensor]:
    """rand(*shape) -> (batch_size, *shape); sample i is the same whatever batch_size is."""
    calls = itertools.count()

    def rand(*shape: int) -> torch.Tensor:
        key = next(calls)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + key * 1_009 + i) for i in range(batch_size)]
        return torch.stack([torch.randn(shape, generator=g) for g in gens])

    return rand


def _latent_shape(spec: _Spec, f: int, h: int, w: int) -> tuple[int, ...]:
    if spec.layout == "packed2x2":
        return ((h // 2) * (w // 2), 4 * spec.channels)
    if spec.layout == "tokens":
        return (f * h * w, spec.channels)
    return tuple(dict(C=spec.channels, F=f, H=h, W=w)[d] for d in spec.layout)


def make_inputs(
    family: str,
    batch_size: int = 1,
    seed: int = 0,
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Forward kwargs except the timestep. Sizes are latent sizes (default 8x8, 2 frames; image models ignore
    ``frames``); flux needs even height/width."""
    spec = _SPECS[family]
    c = SimpleNamespace(b=batch_size, f=frames or 2, h=height or 8, w=width or 8, rand=_sampler(batch_size, seed))
    inputs = {"hidden_states": c.rand(*_latent_shape(spec, c.f, c.h, c.w))}
    if spec.text:
        inputs["encoder_hidden_states"] = c.rand(TEXT_LEN, TEXT_DIM)
    inputs.update({name: make(c) for name, make in spec.extras.items()})
    inputs["return_dict"] = False
    return inputs


def timestep_for(family: str, t: float, batch_size: int) -> dict:
    """Timestep kwarg for noise level t in [0, 1000] (1000 = pure noise), in the family's own convention."""
    kind = _SPECS[family].timestep
    value = {"unit": t / 1000, "reversed": 1000 - t}.get(kind, t)
    if kind == "long":
        return {"timestep": torch.full((batch_size,), round(value), dtype=torch.long)}
    return {"timestep": torch.full((batch_size,), float(value))}
