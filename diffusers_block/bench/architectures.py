"""Real-size diffusers transformers with random weights, and the inputs of one generation, for benchmarks.

Speed depends on the layer count, width and token count, not on trained weights, so benchmarks build the real
configurations with random weights instead of downloading checkpoints. The weights are redrawn from a seeded
fan-in normal init (the same rule as tests/tiny_models.py): diffusers 0.42.1 zero-initialises no Wan or Flux
weight (only norm gains = 1 and biases = 0), but PyTorch's default init shrinks every projection by ~1/sqrt(3)
and draws from the global RNG in construction order; a variance-preserving init gives each block a residual of
the size of its input, as in a trained model, so a reused block's error shows in the final latents.

``tiny-*`` entries are the same families at toy size, for tests on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from ..random_weights import random_init_


@dataclass(frozen=True)
class Architecture:
    cls: type
    config: dict  # constructor kwargs of ``cls``
    latent_shape: tuple[int, ...]  # one sample, as the transformer takes it (Flux: packed 2x2 patches)
    text_tokens: int  # prompt embedding length (T5 max_sequence_length of the pipeline)
    steps: int  # default sampling steps of the official pipeline
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler shift (Flux-dev's dynamic shift at 4096 tokens is ~3.2)
    timestep_scale: float = 1.0  # the transformer takes scheduler timestep * this (Flux: t / 1000)
    guidance: float | None = None  # guidance-distilled models (Flux-dev) take the scale as an input
    image_ids: tuple[int, int] | None = None  # Flux: (rows, cols) of the packed latent grid, for img_ids

    @property
    def text_dim(self) -> int:
        return self.config.get("text_dim") or self.config["joint_attention_dim"]

    @property
    def pooled_dim(self) -> int | None:
        return self.config.get("pooled_projection_dim")


_WAN_2_1 = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
_FLUX = dict(guidance_embeds=True)

ARCHITECTURES: dict[str, Architecture] = {
    # 480x832 px, 81 frames -> VAE latents (16, 21, 60, 104) -> 21 x 30 x 52 = 32,760 tokens.
    "wan2.1-1.3b": Architecture(
        WanTransformer3DModel,
        dict(_WAN_2_1, num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096),
        latent_shape=(16, 21, 60, 104),
        text_tokens=512,
        steps=50,
    ),
    # 1024x1024 px -> VAE latents (16, 128, 128) -> packed 2x2 patches (4096, 64).
    "flux-dev": Architecture(
        FluxTransformer2DModel,
        dict(
            _FLUX,
            num_layers=19,
            num_single_layers=38,
            num_attention_heads=24,
            attention_head_dim=128,
            in_channels=64,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            axes_dims_rope=(16, 56, 56),
        ),
        latent_shape=(4096, 64),
        text_tokens=512,
        steps=28,
        timestep_scale=1e-3,
        guidance=3.5,
        image_ids=(64, 64),
    ),
    "tiny-wan": Architecture(
        WanTransformer3DModel,
        dict(
            _WAN_2_1,
            num_layers=3,
            num_attention_heads=2,
            attention_head_dim=32,
            ffn_dim=128,
            text_dim=64,
            freq_dim=32,
            in_channels=4,
            out_channels=4,
        ),
        latent_shape=(4, 3, 8, 8),
        text_tokens=8,
        steps=10,
    ),
    "tiny-flux": Architecture(
        FluxTransformer2DModel,
        dict(
            _FLUX,
            num_layers=2,
            num_single_layers=1,
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=16,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            axes_dims_rope=(8, 12, 12),
        ),
        latent_shape=(64, 16),
        text_tokens=8,
        steps=10,
        timestep_scale=1e-3,
        guidance=3.5,
        image_ids=(8, 8),
    ),
}


def build(arch: Architecture, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The model in eval mode, allocated on ``device`` in ``dtype`` from the start: a 12B model built in fp32 on
    the CPU would take minutes and 48 GB. Modules diffusers keeps in fp32 when loading (``_keep_in_fp32_modules``,
    e.g. Wan's time embedder and modulation tables) stay fp32, as after ``from_pretrained(torch_dtype=...)``."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = arch.cls(**arch.config)
    finally:
        torch.set_default_dtype(default_dtype)
    keep = set(arch.cls._keep_in_fp32_modules or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    for name, param in model.named_parameters():
        if keep.intersection(name.split(".")):
            param.data = param.data.float()
    random_init_(model, seed)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_tokens(arch: Architecture) -> int:
    """Image/video tokens the transformer attends over (text tokens not included)."""
    if arch.image_ids is not None:
        return arch.latent_shape[0]
    patch = arch.config["patch_size"]
    return (arch.latent_shape[1] // patch[0]) * (arch.latent_shape[2] // patch[1]) * (arch.latent_shape[3] // patch[2])


def noise(arch: Architecture, device: torch.device, seed: int) -> torch.Tensor:
    """Initial latents of one generation (batch 1), fp32 as pipelines keep them between steps."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn((1, *arch.latent_shape), generator=generator, device=device)


def conditioning(arch: Architecture, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Forward kwargs of one prompt (one CFG branch), except hidden_states and timestep: random embeddings of
    the text encoders' shapes, plus Flux's position ids and guidance scale."""
    generator = torch.Generator(device).manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=generator, device=device).to(dtype)  # noqa: E731
    kwargs = {"encoder_hidden_states": randn(1, arch.text_tokens, arch.text_dim)}
    if arch.pooled_dim is not None:
        kwargs["pooled_projections"] = randn(1, arch.pooled_dim)
    if arch.guidance is not None:
        kwargs["guidance"] = torch.full((1,), arch.guidance, device=device)
    if arch.image_ids is not None:  # as FluxPipeline._prepare_latent_image_ids: (0, row, col) per patch
        rows, cols = torch.meshgrid(*(torch.arange(n, device=device) for n in arch.image_ids), indexing="ij")
        kwargs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).to(dtype)
        kwargs["txt_ids"] = torch.zeros(arch.text_tokens, 3, device=device, dtype=dtype)
    return kwargs
