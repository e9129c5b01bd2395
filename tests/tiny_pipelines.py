"""Tiny random-weight stock diffusers pipelines that run end to end on CPU, for tests.

``build_pipeline(name)`` wraps ``tiny_models``' transformers (same widths and seeded re-init) in the stock
pipeline class with its usual scheduler, without tokenizers or text encoders (every component the constructor
requires but we do not need is passed as None); ``call_kwargs(name)`` gives the kwargs of ``pipe(**kwargs)`` with
precomputed prompt embeddings, so ``pipe(**call_kwargs(name))[0]`` is the output. Every pipeline but DiT returns
latents (``output_type="latent"``, no VAE); DiT always decodes, so it gets a 1-block AutoencoderKL (scale factor 1)
and returns a (B, 3, 8, 8) tensor in [0, 1]. Checked against diffusers 0.42.1 (6 steps, CFG on):

====== =================== ====================================== ========================== =====================
name   pipeline            scheduler                              transformer calls/step CFG cache_context
====== =================== ====================================== ========================== =====================
dit    DiTPipeline         DDIMScheduler (DiT-XL-2-256 config)    1, batched [cond, uncond]  no (not a CacheMixin)
pixart PixArtSigmaPipeline DPMSolverMultistepScheduler (default)  1, batched [uncond, cond]  no (not a CacheMixin)
sd3    StableDiffusion3    FlowMatchEuler (shift 3)               1, batched [uncond, cond]  no (not a CacheMixin)
flux   FluxPipeline        FlowMatchEuler (dynamic shift)         2: cond, uncond (true CFG) "cond" / "uncond"
wan    WanPipeline         UniPC (flow, flow_shift 3)             2: cond, uncond            "cond" / "uncond" [1]
wan22  WanPipeline         UniPC (flow, flow_shift 3)             2, both by one transformer "cond" / "uncond" [1]
====== =================== ====================================== ========================== =====================

Without CFG every pipeline makes 1 call per step. [1] Wan also passes step_index, sigma and num_inference_steps.
wan22 has ``transformer`` (seed) and ``transformer_2`` (seed + 1) and Wan 2.2's ``boundary_ratio=0.875``:
``transformer`` runs the steps with t >= 875, ``transformer_2`` the rest (6 steps: 2 + 4; 4: 2 + 2; 10: 4 + 6).
Flux CFG is ``true_cfg_scale`` (its ``guidance_scale`` is the distilled-guidance embedding, left at 3.5).
DiT and PixArt predict epsilon, so with random weights their x0 estimates (and final latents) grow to std ~300.

Sizes passed to ``call_kwargs`` are latent sizes, as in ``tiny_models.make_inputs`` (default 8x8, 2 latent frames);
they are turned into pixels (x8, Wan frames 4 * (f - 1) + 1). Flux/SD3/PixArt/Wan need even latent height/width;
DiT's size is fixed by ``transformer.config.sample_size`` (8). Prompt embeddings and DiT class labels depend only on
the sample index (sample i is the same whatever batch_size is); ``seed`` only seeds the generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
)
from tiny_models import _SPECS, make_inputs

from diffusers_block.random_weights import random_init_

PIPELINES: tuple[str, ...] = ("dit", "pixart", "sd3", "flux", "wan", "wan22")

VAE_SPATIAL, VAE_TEMPORAL = 8, 4  # the pipelines' defaults when there is no VAE (== the real VAEs' factors)
_PROMPT_SEED, _NEGATIVE_SEED = 0, 1
_EMBEDS = {  # tiny_models.make_inputs key -> pipeline kwarg (negatives get a "negative_" prefix)
    "encoder_hidden_states": "prompt_embeds",
    "encoder_attention_mask": "prompt_attention_mask",
    "pooled_projections": "pooled_prompt_embeds",
}


def _wan_unipc():  # Wan 2.1 / 2.2 T2V scheduler config
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _tiny_vae():  # 1 block: 3 <-> 4 channels at the same resolution
    return AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8)


@dataclass(frozen=True)
class _Recipe:
    pipeline: type
    family: str  # tiny_models family of the transformer(s)
    scheduler: Callable[[], object]
    overrides: dict = field(default_factory=dict)  # on top of tiny_models' transformer config
    vae: Callable[[], torch.nn.Module] | None = None
    boundary_ratio: float | None = None  # Wan 2.2: adds transformer_2
    cfg: tuple[str, float, float] = ("guidance_scale", 4.5, 1.0)  # kwarg, value with CFG, value without
    call: dict = field(default_factory=lambda: {"output_type": "latent"})  # fixed call kwargs
    video: bool = False


_RECIPES: dict[str, _Recipe] = {
    "dit": _Recipe(
        DiTPipeline,
        "dit",
        lambda: DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False),
        overrides=dict(out_channels=8),
        vae=_tiny_vae,
        call={"output_type": "pt"},  # learned sigma: 2C out
    ),
    "pixart": _Recipe(
        PixArtSigmaPipeline,
        "pixart",
        DPMSolverMultistepScheduler,
        overrides=dict(out_channels=8),
        # resolution bins need sample_size >= 32; negative_prompt defaults to "", which clashes with negative embeds
        call={"output_type": "latent", "use_resolution_binning": False, "negative_prompt": None},
    ),
    "sd3": _Recipe(StableDiffusion3Pipeline, "sd3", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
    "flux": _Recipe(
        FluxPipeline,
        "flux",
        lambda: FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        cfg=("true_cfg_scale", 4.0, 1.0),
    ),
    "wan": _Recipe(WanPipeline, "wan", _wan_unipc, cfg=("guidance_scale", 5.0, 1.0), video=True),
    "wan22": _Recipe(
        WanPipeline, "wan", _wan_unipc, boundary_ratio=0.875, cfg=("guidance_scale", 4.0, 1.0), video=True
    ),
}


def _transformer(recipe: _Recipe, seed: int) -> torch.nn.Module:
    """tiny_models.build_transformer with config overrides."""
    spec = _SPECS[recipe.family]
    torch.manual_seed(seed)
    model = spec.cls(**{**spec.config, **recipe.overrides})
    random_init_(model, seed, smooth_timesteps=False)
    return model.eval()


def build_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    recipe = _RECIPES[name]
    required = inspect.signature(recipe.pipeline.__init__).parameters.values()
    components = {p.name: None for p in required if p.name != "self" and p.default is inspect.Parameter.empty}
    components.update(transformer=_transformer(recipe, seed), scheduler=recipe.scheduler())
    if recipe.vae is not None:
        torch.manual_seed(seed)
        components["vae"] = recipe.vae().eval()
    if recipe.boundary_ratio is not None:
        components.update(transformer_2=_transformer(recipe, seed + 1), boundary_ratio=recipe.boundary_ratio)
    pipe = recipe.pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(
    name: str,
    *,
    steps: int = 6,
    batch_size: int = 1,
    seed: int = 0,
    guidance: bool = True,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
) -> dict:
    """kwargs for ``pipe(**kwargs)``; height/width/frames are latent sizes (see the module docstring)."""
    recipe = _RECIPES[name]
    cfg_kwarg, cfg_on, cfg_off = recipe.cfg
    kwargs = {
        "num_inference_steps": steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        cfg_kwarg: cfg_on if guidance else cfg_off,
        "return_dict": False,
        **recipe.call,
    }
    prompt = make_inputs(recipe.family, batch_size, _PROMPT_SEED)
    if "class_labels" in prompt:  # DiT: class-conditional, size fixed by the transformer config
        if (height or 8, width or 8) != (8, 8):
            raise ValueError(
                "DiTPipeline's latent size is transformer.config.sample_size (8); it takes no height/width"
            )
        return {**kwargs, "class_labels": prompt["class_labels"].tolist()}
    negative = make_inputs(recipe.family, batch_size, _NEGATIVE_SEED)
    for key, kwarg in _EMBEDS.items():
        if key in prompt:
            kwargs[kwarg] = prompt[key]
            if guidance:
                kwargs["negative_" + kwarg] = negative[key]
    kwargs.update(height=(height or 8) * VAE_SPATIAL, width=(width or 8) * VAE_SPATIAL)
    if recipe.video:
        kwargs["num_frames"] = ((frames or 2) - 1) * VAE_TEMPORAL + 1
    return kwargs
