"""Tiny recipes of the text-to-video (and video-editing) transformers; sizes follow diffusers' own model tests."""

from __future__ import annotations

import diffusers as d
import torch

from .registry import CROSS_ATTENTION, DOUBLE_SINGLE, JOINT, SINGLE_SEQUENCE, recipe
from .tiny import from_tiny_models, text, timestep, tiny


def video(style: str):
    """``@video(style)`` on a function named like the class registers it as a video recipe."""

    def register(fn):
        return recipe(fn.__name__, style, "video")(fn)

    return register


@video(JOINT)
def CogVideoXTransformer3DModel():
    return from_tiny_models("cogvideox")


@video(CROSS_ATTENTION)
def WanTransformer3DModel():
    return from_tiny_models("wan")


@video(DOUBLE_SINGLE)
def HunyuanVideoTransformer3DModel():
    return from_tiny_models("hunyuanvideo")


@video(CROSS_ATTENTION)
def LTXVideoTransformer3DModel():
    return from_tiny_models("ltx")


@video(JOINT)
def MochiTransformer3DModel():
    return from_tiny_models("mochi")


@video(CROSS_ATTENTION)
def AllegroTransformer3DModel():
    return from_tiny_models("allegro")


_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _wan_inputs(channels: int = 4, frames: int = 2, size: int = 8) -> dict:
    return {
        "hidden_states": torch.randn(1, channels, frames, size, size),
        "encoder_hidden_states": text(12, 16),
        "timestep": timestep(),
    }


@video(CROSS_ATTENTION)
def SkyReelsV2Transformer3DModel():
    return tiny(d.SkyReelsV2Transformer3DModel, **_WAN), _wan_inputs()


@video(CROSS_ATTENTION)
def ChronoEditTransformer3DModel():
    model = tiny(d.ChronoEditTransformer3DModel, **_WAN, rope_temporal_skip_len=8)
    return model, {**_wan_inputs(), "encoder_hidden_states_image": None}


@video(CROSS_ATTENTION)
def WanVACETransformer3DModel():
    model = tiny(d.WanVACETransformer3DModel, **{**_WAN, "num_layers": 4}, vace_layers=[0, 2], vace_in_channels=12)
    return model, {**_wan_inputs(), "control_hidden_states": torch.randn(1, 12, 2, 8, 8)}


@video(CROSS_ATTENTION)
def WanAnimateTransformer3DModel():
    model = tiny(
        d.WanAnimateTransformer3DModel,
        **{**_WAN, "in_channels": 12},
        latent_channels=4,
        image_dim=16,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    return model, {
        **_wan_inputs(channels=12, frames=21, size=8),
        "encoder_hidden_states_image": text(12, 16),
        "pose_hidden_states": torch.randn(1, 4, 20, 8, 8),
        "face_pixel_values": torch.randn(1, 3, 77, 16, 16),
    }


@video(CROSS_ATTENTION)
def HeliosTransformer3DModel():
    model = tiny(
        d.HeliosTransformer3DModel,
        **{k: v for k, v in _WAN.items() if k != "rope_max_seq_len"},
        rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True,
        guidance_cross_attn=True,
        zero_history_timestep=True,
        is_amplify_history=False,
    )
    return model, {
        **_wan_inputs(),
        "indices_hidden_states": torch.ones(1, 2),
        "indices_latents_history_short": torch.ones(1, 1),
        "indices_latents_history_mid": torch.ones(1, 1),
        "indices_latents_history_long": torch.ones(1, 4),
        "latents_history_short": torch.randn(1, 4, 1, 8, 8),
        "latents_history_mid": torch.randn(1, 4, 1, 8, 8),
        "latents_history_long": torch.randn(1, 4, 4, 8, 8),
    }


def _anyflow(cls, frames: int, **extra):
    config = {k: v for k, v in _WAN.items() if k != "qk_norm"}
    model = tiny(cls, **config, gate_value=0.25, deltatime_type="r", **extra)
    return model, {
        "hidden_states": torch.randn(1, frames, 4, 8, 8),
        "timestep": torch.full((1, frames), 500.0),
        "r_timestep": torch.full((1, frames), 250.0),
        "encoder_hidden_states": text(12, 16),
    }


@video(CROSS_ATTENTION)
def AnyFlowTransformer3DModel():
    return _anyflow(d.AnyFlowTransformer3DModel, 2)


@video(CROSS_ATTENTION)
def AnyFlowFARTransformer3DModel():
    model, kwargs = _anyflow(d.AnyFlowFARTransformer3DModel, 4, compressed_patch_size=(1, 4, 4), full_chunk_limit=3)
    return model, {**kwargs, "chunk_partition": [2, 2]}


@video(JOINT)
def ConsisIDTransformer3DModel():
    model = tiny(
        d.ConsisIDTransformer3DModel,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
        cross_attn_interval=1,
        is_kps=False,
        is_train_face=True,
        cross_attn_dim_head=1,
        cross_attn_num_heads=1,
        LFE_id_dim=2,
        LFE_vit_dim=2,
        LFE_depth=5,
        LFE_dim_head=8,
        LFE_num_heads=2,
        LFE_num_id_token=1,
        LFE_num_querie=1,
        LFE_output_dim=10,
        LFE_ff_mult=1,
        LFE_num_scale=1,
    )
    return model, {
        "hidden_states": torch.randn(1, 1, 4, 8, 8),
        "encoder_hidden_states": text(8, 8),
        "timestep": timestep(),
        "id_vit_hidden": [torch.ones(1, 2, 2)],
        "id_cond": torch.ones(1, 2),
    }


@video(JOINT)
def EasyAnimateTransformer3DModel():
    model = tiny(
        d.EasyAnimateTransformer3DModel,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        mmdit_layers=2,
        num_layers=2,
        out_channels=4,
        patch_size=2,
        sample_height=60,
        sample_width=90,
        text_embed_dim=16,
        time_embed_dim=8,
        time_position_encoding_type="3d_rope",
        timestep_activation_fn="silu",
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "timestep": timestep(),
        "encoder_hidden_states": text(8, 16),
    }


@video(DOUBLE_SINGLE)
def HunyuanVideoFramepackTransformer3DModel():
    model = tiny(
        d.HunyuanVideoFramepackTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=16,
        has_clean_x_embedder=True,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 3, 4, 4),
        "timestep": timestep(),
        "encoder_hidden_states": text(12, 16),
        "pooled_projections": torch.randn(1, 8),
        "encoder_attention_mask": torch.ones(1, 12),
        "guidance": timestep(6000.0),
        "image_embeds": text(12, 16),
        "indices_latents": torch.ones(3),
        "latents_clean": torch.randn(1, 4, 2, 4, 4),
        "indices_latents_clean": torch.ones(2),
        "latents_history_2x": torch.randn(1, 4, 2, 4, 4),
        "indices_latents_history_2x": torch.ones(2),
        "latents_history_4x": torch.randn(1, 4, 8, 4, 4),
        "indices_latents_history_4x": torch.ones(8),
    }


@video(DOUBLE_SINGLE)
def MotifVideoTransformer3DModel():
    model = tiny(
        d.MotifVideoTransformer3DModel,
        in_channels=33,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_single_layers=2,
        num_decoder_layers=0,
        patch_size=1,
        patch_size_t=1,
        qk_norm="rms_norm",
        norm_type="layer_norm",
        text_embed_dim=32,
        image_embed_dim=4,
        rope_theta=256.0,
        rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=False,
        enable_text_cross_attention_single=False,
    )
    return model, {
        "hidden_states": torch.randn(1, 33, 3, 8, 8),
        "encoder_hidden_states": text(),
        "timestep": timestep(),
    }


@video(CROSS_ATTENTION)
def SanaVideoTransformer3DModel():
    model = tiny(
        d.SanaVideoTransformer3DModel,
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=12,
        cross_attention_dim=24,
        caption_channels=16,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=8,
        patch_size=(1, 2, 2),
        norm_elementwise_affine=False,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model, {
        "hidden_states": torch.randn(1, 16, 2, 8, 8),
        "encoder_hidden_states": text(12, 16),
        "timestep": timestep(),
    }


@video(CROSS_ATTENTION)
def LatteTransformer3DModel():
    model = tiny(
        d.LatteTransformer3DModel,
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        caption_channels=8,
        in_channels=4,
        cross_attention_dim=8,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 1, 8, 8),
        "encoder_hidden_states": text(8, 8),
        "timestep": timestep(500, torch.long),
        "enable_temporal_attentions": True,
    }


@video(JOINT)
def HunyuanVideo15Transformer3DModel():
    model = tiny(
        d.HunyuanVideo15Transformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 1, 8, 8),
        "timestep": timestep(),
        "encoder_hidden_states": text(6, 16),
        "encoder_hidden_states_2": text(4, 8),
        "encoder_attention_mask": torch.ones(1, 6),
        "encoder_attention_mask_2": torch.ones(1, 4),
        "image_embeds": torch.zeros(1, 3, 12),
    }


def _joy_image(cls):
    return tiny(
        cls,
        patch_size=[1, 2, 2],
        in_channels=16,
        hidden_size=32,
        num_attention_heads=2,
        text_dim=16,
        num_layers=2,
        rope_dim_list=[4, 6, 6],
        theta=256,
    )


@video(JOINT)
def JoyImageEditTransformer3DModel():
    model = _joy_image(d.JoyImageEditTransformer3DModel)
    return model, {
        "hidden_states": torch.randn(1, 16, 1, 4, 4),
        "encoder_hidden_states": text(12, 16),
        "timestep": timestep(),
    }


@video(JOINT)
def JoyImageEditPlusTransformer3DModel():
    model = _joy_image(d.JoyImageEditPlusTransformer3DModel)
    return model, {
        "hidden_states": torch.randn(1, 2, 16, 1, 2, 2),
        "encoder_hidden_states": text(12, 16),
        "timestep": timestep(),
        "shape_list": [[(1, 1, 1), (1, 1, 1)]],
    }


@video(SINGLE_SEQUENCE)
def MiniMaxH3Transformer3DModel():
    model = tiny(
        d.MiniMaxH3Transformer3DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=2,
        ffn_dim=32,
        in_channels=4,
        audio_in_channels=6,
        patch_size=(1, 2, 2),
        text_dim=8,
        freq_dim=8,
        time_embed_hidden_dim=24,
        time_embed_dim=16,
        rope_freq_dim=2,
    )
    text_len, audio_len, video_len = 4, 6, 8  # one packed sequence: text rows, audio rows, video rows
    length = text_len + audio_len + video_len
    tags = torch.tensor([1] * text_len + [2] * audio_len + [0] * video_len)  # 0 video, 1 text, 2 audio
    positions = torch.zeros(length, 3)
    positions[:, 0] = torch.arange(length)
    positions[text_len + audio_len :, 1] = torch.arange(video_len) % 4
    positions[text_len + audio_len :, 2] = torch.arange(video_len) % 2
    return model, {
        "hidden_states": torch.randn(1, video_len, 16),
        "audio_hidden_states": torch.randn(1, audio_len, 6),
        "encoder_hidden_states": text(text_len, 8),
        "timestep": torch.tensor([0.7, 0.3]),  # video and audio noise levels
        "timestep_indices": (tags == 2).long(),
        "token_tags": tags,
        "position_ids": positions,
        "video_indices": torch.arange(text_len + audio_len, length),
        "audio_indices": torch.arange(text_len, text_len + audio_len),
        "text_indices": torch.arange(text_len),
    }


@video(CROSS_ATTENTION)
def CosmosTransformer3DModel():
    model = tiny(
        d.CosmosTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # the padding mask is resized with torchvision, not a dependency here
        extra_pos_embed_type="learnable",
    )
    return model, {
        "hidden_states": torch.randn(1, 4, 1, 8, 8),
        "timestep": timestep(),
        "encoder_hidden_states": text(12, 16),
        "attention_mask": torch.ones(1, 12),
        "fps": 30,
    }


@video(CROSS_ATTENTION)
def LTX2VideoTransformer3DModel():
    model = tiny(
        d.LTX2VideoTransformer3DModel,
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
        rope_double_precision=False,
    )
    return model, {
        "hidden_states": torch.randn(1, 2 * 8 * 8, 4),
        "audio_hidden_states": torch.randn(1, 9, 4),
        "encoder_hidden_states": text(16, 16),
        "audio_encoder_hidden_states": text(16, 16),
        "timestep": timestep(),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": 2,
        "height": 8,
        "width": 8,
        "audio_num_frames": 9,
        "fps": 25.0,
    }


@video(CROSS_ATTENTION)
def Kandinsky5Transformer3DModel():
    model = tiny(
        d.Kandinsky5Transformer3DModel,
        in_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    return model, {
        "hidden_states": torch.randn(1, 2, 8, 8, 4),  # (B, F, H, W, C)
        "encoder_hidden_states": text(8, 16),
        "pooled_projections": torch.randn(1, 8),
        "timestep": timestep(),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(8),
    }


@video(CROSS_ATTENTION)
def Kandinsky6Transformer3DModel():
    model = tiny(
        d.Kandinsky6Transformer3DModel,
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        model_dim=32,
        ff_dim=64,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        visual_cond=False,
        in_audio_dim=4,
        out_audio_dim=4,
    )
    return model, {
        "hidden_states": torch.randn(1, 2, 8, 8, 4),  # (B, F, H, W, C)
        "encoder_hidden_states": text(8, 16),
        "pooled_projections": torch.randn(1, 8),
        "timestep": timestep(),
        "audio_hidden_states": torch.randn(1, 6, 4),
    }


@video(SINGLE_SEQUENCE)
def Kandinsky6SRTransformer3DModel():
    model = tiny(
        d.Kandinsky6SRTransformer3DModel,
        in_visual_dim=4,
        out_visual_dim=4,
        time_dim=16,
        model_dim=32,
        ff_dim=64,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    # (B, T, H, W, 2C + 1): the noisy latent, the low-resolution anchor latent and the anchor mask
    return model, {"hidden_states": torch.randn(1, 2, 8, 8, 9), "timestep": timestep()}


@video(CROSS_ATTENTION)
def SanaWMLTX2RefinerTransformer3DModel():
    model = tiny(
        d.SanaWMLTX2RefinerTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        caption_channels=16,
    )
    rope = model.build_rotary_emb_for_absolute_positions(1, [0, 1], 4, 4, torch.device("cpu"), fps=25.0)
    return model, {
        "hidden_states": torch.randn(1, 2 * 4 * 4, 4),
        "encoder_hidden_states": text(8, 16),
        "timestep": torch.full((1, 2 * 4 * 4), 500.0),  # per video token
        "video_rotary_emb": rope,
    }


@video(CROSS_ATTENTION)
def SanaWMTransformer3DModel():
    model = tiny(
        d.SanaWMTransformer3DModel,
        in_channels=4,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        linear_head_dim=16,
        chunk_plucker_channels=8,
        chunk_plucker_post_attn_blocks=2,
        caption_channels=16,
        image_size=64,
    )
    return model, {  # text only, no camera conditions
        "hidden_states": torch.randn(1, 4, 2, 8, 8),
        "timestep": torch.full((1, 1, 2), 500.0),  # (B, 1, frames)
        "encoder_hidden_states": torch.randn(1, 1, 8, 16),
        "encoder_attention_mask": torch.ones(1, 8),
    }


# Refused by the adapter table, with its reason: only the model is built (the refusal comes before any call).


@video(CROSS_ATTENTION)
def WanAnimate2Transformer3DModel():
    model = tiny(
        d.WanAnimate2Transformer3DModel,
        patch_size=(1, 2, 2),
        text_len=16,
        in_dim=36,
        dim=32,
        ffn_dim=64,
        freq_dim=32,
        text_dim=16,
        out_dim=16,
        num_heads=2,
        num_layers=2,
        cross_attn_norm=True,
        use_img_emb=False,
    )
    return model, {}
