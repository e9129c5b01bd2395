"""Tiny recipes of the text-to-image (and image-editing) transformers; sizes follow diffusers' own model tests."""

from __future__ import annotations

import diffusers as d
import torch

from .registry import CLASS_CONDITIONAL, CROSS_ATTENTION, DOUBLE_SINGLE, JOINT, SINGLE_SEQUENCE, recipe
from .tiny import from_tiny_models, text, timestep, tiny


def image(modality_style: str, cls_name: str | None = None):
    """``@image(style)`` on a function named like the class registers it as an image recipe."""

    def register(fn):
        return recipe(cls_name or fn.__name__, modality_style, "image")(fn)

    return register


def _flux_ids(h: int, w: int, text_len: int, axes: int = 3) -> dict:
    """Flux-style position ids: (0, row, col) per packed image token, zeros for text."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.zeros(h * w, axes)
    img[:, 1], img[:, 2] = rows.reshape(-1), cols.reshape(-1)
    return {"img_ids": img, "txt_ids": torch.zeros(text_len, axes)}


@image(CLASS_CONDITIONAL)
def DiTTransformer2DModel():
    return from_tiny_models("dit")


@image(CROSS_ATTENTION)
def PixArtTransformer2DModel():
    return from_tiny_models("pixart")


@image(JOINT)
def SD3Transformer2DModel():
    return from_tiny_models("sd3")


@image(DOUBLE_SINGLE)
def FluxTransformer2DModel():
    return from_tiny_models("flux")


@image(DOUBLE_SINGLE)
def AuraFlowTransformer2DModel():
    model = tiny(
        d.AuraFlowTransformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return model, {"hidden_states": torch.randn(1, 4, 16, 16), "encoder_hidden_states": text(), "timestep": timestep()}


def _flux_like(cls, **config):
    """Flux descendants (Chroma, Bria, LongCat, Ovis): packed tokens (1, 16, 4) on a 4x4 grid, ids per token."""
    defaults = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2)
    model = tiny(cls, patch_size=1, in_channels=4, **{**defaults, "joint_attention_dim": 32, **config})
    kwargs = {"hidden_states": torch.randn(1, 16, 4), "encoder_hidden_states": text(), "timestep": timestep(0.5)}
    return model, {**kwargs, **_flux_ids(4, 4, 8)}


@image(DOUBLE_SINGLE)
def ChromaTransformer2DModel():
    return _flux_like(
        d.ChromaTransformer2DModel,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    )


@image(DOUBLE_SINGLE)
def BriaTransformer2DModel():
    model, kwargs = _flux_like(d.BriaTransformer2DModel, pooled_projection_dim=None, axes_dims_rope=[0, 8, 8])
    return model, kwargs


@image(DOUBLE_SINGLE)
def BriaFiboTransformer2DModel():
    model, kwargs = _flux_like(
        d.BriaFiboTransformer2DModel,
        joint_attention_dim=64,
        text_encoder_dim=32,
        pooled_projection_dim=None,
        axes_dims_rope=[0, 8, 8],
    )
    kwargs["encoder_hidden_states"] = text(8, 64)
    kwargs["text_encoder_layers"] = [text(8, 32) for _ in range(4)]
    return model, kwargs


@image(DOUBLE_SINGLE)
def LongCatImageTransformer2DModel():
    model, kwargs = _flux_like(d.LongCatImageTransformer2DModel, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return model, {**kwargs, "guidance": torch.full((1,), 3.5)}


@image(DOUBLE_SINGLE)
def OvisImageTransformer2DModel():
    return _flux_like(d.OvisImageTransformer2DModel, out_channels=4, axes_dims_rope=(4, 4, 8))


@image(DOUBLE_SINGLE)
def Flux2Transformer2DModel():
    model = tiny(
        d.Flux2Transformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).reshape(1, 16, 4)
    txt_ids = torch.stack([torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.arange(8)], -1).long()[None]
    return model, {
        "hidden_states": torch.randn(1, 16, 4),
        "encoder_hidden_states": text(),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "timestep": timestep(0.5),
        "guidance": timestep(3.5),
    }


@image(DOUBLE_SINGLE)
def Flux3Transformer2DModel():
    model = tiny(
        d.Flux3Transformer2DModel,
        in_channels=4,
        cond_in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).reshape(16, 4)
    txt_ids = torch.stack([torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.arange(8)], -1).long()
    return model, {
        "hidden_states": torch.randn(1, 16, 4),
        "encoder_hidden_states": text(),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "timestep": timestep(0.5),
    }


def _glm_like(cls, **config):
    model = tiny(
        cls,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        **config,
    )
    sizes = {name: torch.tensor([[8, 8]]) for name in ("original_size", "target_size")}
    kwargs = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": text(8, 8), "timestep": timestep()}
    return model, {**kwargs, **sizes, "crop_coords": torch.tensor([[0, 0]])}


@image(JOINT)
def CogView3PlusTransformer2DModel():
    return _glm_like(d.CogView3PlusTransformer2DModel, condition_dim=2, pos_embed_max_size=8, sample_size=8)


@image(JOINT)
def CogView4Transformer2DModel():
    return _glm_like(d.CogView4Transformer2DModel, condition_dim=4)


@image(JOINT)
def GlmImageTransformer2DModel():
    model = tiny(
        d.GlmImageTransformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=64,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": text(),
        "prior_token_id": torch.randint(0, 64, (1, 16)),
        "prior_token_drop": torch.zeros(1, dtype=torch.bool),
        "timestep": timestep(),
        "target_size": torch.tensor([[8.0, 8.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
    }


@image(JOINT)
def QwenImageTransformer2DModel():
    model = tiny(
        d.QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 16),
        "encoder_hidden_states": text(8, 16),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": timestep(0.5),
        "img_shapes": [[(1, 4, 4)]],
    }


@image(JOINT)
def NucleusMoEImageTransformer2DModel():
    model = tiny(
        d.NucleusMoEImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
        moe_enabled=False,
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 16),
        "encoder_hidden_states": text(8, 16),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": timestep(0.5),
        "img_shapes": [(1, 4, 4)],
    }


@image(CROSS_ATTENTION)
def SanaTransformer2DModel():
    model = tiny(
        d.SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": text(8, 8),
        "timestep": timestep(),
    }


@image(CROSS_ATTENTION)
def HunyuanDiT2DModel():
    model = tiny(
        d.HunyuanDiT2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=8,
        cross_attention_dim_t5=8,
        pooled_projection_dim=4,
        hidden_size=16,
        text_len=4,
        text_len_t5=4,
        activation_fn="gelu-approximate",
    )
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": text(4, 8),
        "text_embedding_mask": torch.ones(1, 4),
        "encoder_hidden_states_t5": text(4, 8),
        "text_embedding_mask_t5": torch.ones(1, 4),
        "timestep": timestep(),
        "image_meta_size": torch.tensor([[8.0, 8.0, 8.0, 8.0, 0.0, 0.0]]),
        "style": torch.zeros(1, dtype=torch.long),
        "image_rotary_emb": rope,
    }


@image(SINGLE_SEQUENCE)
def Lumina2Transformer2DModel():
    model = tiny(
        d.Lumina2Transformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=2,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128),
        cap_feat_dim=32,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": text(),
        "timestep": timestep(0.5),
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool),
    }


@image(CROSS_ATTENTION)
def LuminaNextDiT2DModel():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = tiny(
        d.LuminaNextDiT2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        learn_sigma=False,
        cross_attention_dim=32,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "encoder_hidden_states": text(),
        "timestep": timestep(0.5),
        "encoder_mask": torch.ones(1, 8),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(8, 384, 384, linear_factor=1.0, ntk_factor=1.0),
        "cross_attention_kwargs": {},
    }


def _z_image_like(cls, **config):
    """Z-Image and Bria-Fibo-2 blocks take ``x`` (a list of per-sample latents in, a list out)."""
    model = tiny(
        cls,
        in_channels=16,
        n_layers=2,
        n_refiner_layers=1,
        rope_theta=256.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
        **config,
    )
    return model


@image(SINGLE_SEQUENCE)
def ZImageTransformer2DModel():
    model = _z_image_like(
        d.ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        dim=16,
        n_heads=1,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,
    )
    return model, {"x": [torch.randn(16, 1, 8, 8)], "cap_feats": [torch.randn(8, 16)], "t": timestep(0.5)}


@image(SINGLE_SEQUENCE)
def BriaFibo2Transformer2DModel():
    model = _z_image_like(
        d.BriaFibo2Transformer2DModel,
        patch_size=2,
        dim=16,
        n_heads=1,
        cap_feat_dim=16,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=4,
        max_num_gist_tokens=8,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=16,
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 8, 8),
        "timestep": timestep(0.5),
        "encoder_hidden_states": torch.randn(1, 2, 8, 16),  # (B, 1 + injected layers, text, features)
        "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool),
    }


@image(SINGLE_SEQUENCE)
def ErnieImageTransformer2DModel():
    model = tiny(
        d.ErnieImageTransformer2DModel,
        hidden_size=16,
        num_attention_heads=1,
        num_layers=2,
        ffn_hidden_size=16,
        in_channels=16,
        out_channels=16,
        patch_size=1,
        text_in_dim=16,
        rope_theta=256,
        rope_axes_dim=(8, 4, 4),
        qk_layernorm=True,
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 8, 8),
        "timestep": timestep(0.5),
        "text_bth": text(8, 16),
        "text_lens": torch.tensor([8]),
    }


@image(DOUBLE_SINGLE)
def HiDreamImageTransformer2DModel():
    model = tiny(
        d.HiDreamImageTransformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(16, 16),
        llama_layers=(0, 1),
        force_inference_output=True,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 16, 16),
        "encoder_hidden_states_t5": text(8, 8),
        "encoder_hidden_states_llama3": torch.randn(2, 1, 8, 4),
        "pooled_embeds": torch.randn(1, 8),
        "timesteps": timestep(500, torch.long),
    }


@image(SINGLE_SEQUENCE)
def OmniGenTransformer2DModel():
    model = tiny(
        d.OmniGenTransformer2DModel,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=32,
        num_layers=2,
        pad_token_id=0,
        vocab_size=1000,
        in_channels=4,
        time_step_dim=4,
        rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]},
    )
    length = 8 + 1 + 16  # text, time token, image tokens
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "timestep": timestep(0.5),
        "input_ids": torch.randint(1, 1000, (1, 8)),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(1, length, length),
        "position_ids": torch.arange(length)[None],
    }


@image(CROSS_ATTENTION)
def PRXTransformer2DModel():
    model = tiny(
        d.PRXTransformer2DModel,
        in_channels=16,
        patch_size=2,
        context_in_dim=32,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=2,
        axes_dim=[8, 8],
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 8, 8),
        "encoder_hidden_states": text(),
        "timestep": timestep(0.5),
    }


@image(DOUBLE_SINGLE)
def HunyuanImageTransformer2DModel():
    model = tiny(
        d.HunyuanImageTransformer2DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=16,
        rope_axes_dim=(4, 4),
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8),
        "timestep": timestep(),
        "encoder_hidden_states": text(8, 16),
        "encoder_attention_mask": torch.ones(1, 8),
    }


@image(SINGLE_SEQUENCE)
def Krea2Transformer2DModel():
    model = tiny(
        d.Krea2Transformer2DModel,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        timestep_embed_dim=8,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=1,
        text_intermediate_size=16,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2),
        rope_theta=1000.0,
    )
    text_len, grid = 8, 4
    positions = torch.zeros(text_len + grid * grid, 3)  # text at 0, image tokens at (0, row, col)
    positions[text_len:, 1] = torch.arange(grid).repeat_interleave(grid)
    positions[text_len:, 2] = torch.arange(grid).repeat(grid)
    return model, {
        "hidden_states": torch.randn(1, grid * grid, 16),
        "encoder_hidden_states": torch.randn(1, text_len, 3, 16),  # (B, text, encoder layers, features)
        "timestep": timestep(0.5),
        "position_ids": positions,
        "encoder_attention_mask": torch.ones(1, text_len, dtype=torch.bool),
    }


@image(SINGLE_SEQUENCE)
def Ideogram4Transformer2DModel():
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    model = tiny(
        d.Ideogram4Transformer2DModel,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=24,
        rope_theta=10000,
        mrope_section=(2, 1, 1),
    )
    text_len, grid = 8, 4  # one sequence: text tokens (zero latents), then image tokens (zero text features)
    hidden = torch.zeros(1, text_len + grid * grid, 16)
    hidden[:, text_len:] = torch.randn(1, grid * grid, 16)
    features = torch.zeros(1, text_len + grid * grid, 24)
    features[:, :text_len] = torch.randn(1, text_len, 24)
    positions = torch.zeros(1, text_len + grid * grid, 3, dtype=torch.long)
    positions[:, :text_len] = torch.arange(text_len)[:, None]
    positions[:, text_len:, 0] = IMAGE_POSITION_OFFSET
    positions[:, text_len:, 1] = torch.arange(grid).repeat_interleave(grid) + IMAGE_POSITION_OFFSET
    positions[:, text_len:, 2] = torch.arange(grid).repeat(grid) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, text_len + grid * grid), OUTPUT_IMAGE_INDICATOR)
    indicator[:, :text_len] = LLM_TOKEN_INDICATOR
    return model, {
        "hidden_states": hidden,
        "encoder_hidden_states": features,
        "timestep": timestep(0.5),
        "position_ids": positions,
        "segment_ids": torch.ones(1, text_len + grid * grid, dtype=torch.long),
        "indicator": indicator,
    }


@image(SINGLE_SEQUENCE)
def QwenImage21Transformer2DModel():
    model = tiny(
        d.QwenImage21Transformer2DModel,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    text_len, slots = 8, 4  # the encoder's sequence: 8 text tokens, then 4 image slots of 2x2 latent tokens each
    return model, {
        "hidden_states": torch.randn(1, 4 * slots, 16),
        "encoder_hidden_states": text(text_len, 16),
        "timestep": timestep(0.5),
        "img_shapes": [[(1, 4, 4)]],
        "img_mask": torch.arange(text_len + slots)[None] >= text_len,
    }
