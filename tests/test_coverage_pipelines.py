"""Stock diffusers pipelines of families the coverage harness added, end to end with tiny components.

tests/test_pipelines.py already runs PixArt (single stream, cross-attention), SD3 (joint two-stream) and Flux
(double + single blocks); these add one more pipeline per style among the families added for coverage: Sana
(cross-attention), AuraFlow (joint blocks, then single blocks) and Lumina 2 (one joint sequence, refiners first).
The transformers are the coverage recipes' (tests/coverage), so the pipelines run what the coverage table reports.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    AuraFlowPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Lumina2Pipeline,
    SanaPipeline,
)

import diffusers_block as db
from tests.coverage import RECIPES

STEPS = 4
PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=1)  # computes steps 0, 1, 3


def _embeds(length: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(1, length, dim, generator=torch.Generator().manual_seed(seed))


def _mask(length: int) -> torch.Tensor:
    return torch.ones(1, length, dtype=torch.long)


def _prompts(dim: int, size: int, **extra) -> dict:
    """Text of length 8 and width ``dim``, with its mask, for both CFG branches; an image of ``size`` pixels."""
    return {
        "prompt_embeds": _embeds(8, dim, 0),
        "prompt_attention_mask": _mask(8),
        "negative_prompt_embeds": _embeds(8, dim, 1),
        "negative_prompt_attention_mask": _mask(8),
        **extra,
        "height": size,
        "width": size,
    }


# pipeline class, transformer class, scheduler, prompt kwargs (text length 8, the recipe's text width), sizes
PIPELINES = {
    "sana": (
        SanaPipeline,
        "SanaTransformer2DModel",
        lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        # negative_prompt=None: its default "" clashes with negative embeddings
        lambda: _prompts(8, 64, use_resolution_binning=False, negative_prompt=None),
    ),
    "auraflow": (
        AuraFlowPipeline,
        "AuraFlowTransformer2DModel",
        FlowMatchEulerDiscreteScheduler,
        lambda: _prompts(32, 128),
    ),
    "lumina2": (
        Lumina2Pipeline,
        "Lumina2Transformer2DModel",
        FlowMatchEulerDiscreteScheduler,
        lambda: _prompts(32, 64),
    ),
}


def _build(name: str):
    pipeline_cls, transformer_cls, scheduler, _ = PIPELINES[name]
    required = inspect.signature(pipeline_cls.__init__).parameters.values()
    components = {p.name: None for p in required if p.name != "self" and p.default is inspect.Parameter.empty}
    components.update(transformer=RECIPES[transformer_cls].build()[0], scheduler=scheduler())
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name: str) -> torch.Tensor:
    kwargs = PIPELINES[name][3]()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            **kwargs,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            generator=generator,
            output_type="latent",
            return_dict=False,
        )[0]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_cache_exact_at_zero_reuse_saves_when_permissive_and_disable_restores(name):
    pipe = _build(name)
    reference = _generate(pipe, name)
    assert torch.isfinite(reference).all()

    pipe.enable_block_cache(db.StaticScheduleConfig(interval=1))
    assert torch.equal(_generate(pipe, name), reference)

    pipe.enable_block_cache(PERMISSIVE)
    cached = _generate(pipe, name)
    summary = pipe.block_cache_summary()
    assert summary.num_steps == STEPS
    assert summary.fraction_computed == pytest.approx(3 / 4)
    assert not torch.equal(cached, reference)

    pipe.disable_block_cache()
    assert torch.equal(_generate(pipe, name), reference)
