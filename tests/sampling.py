"""A hand-written denoising loop over a bare tiny transformer, as a user without a pipeline would write it."""

from __future__ import annotations

import torch
from tiny_models import make_inputs, timestep_for

from diffusers_block import cache_context


def sample(
    model,
    family: str,
    *,
    steps: int = 8,
    batch_size: int = 1,
    seed: int = 0,
    branches=("cond",),
    context: bool = True,
    **shape,
) -> torch.Tensor:
    """Euler steps on ``hidden_states`` with one transformer call per branch per step; returns the final latents.

    ``model`` may be a list with one model per branch.

    Each branch gets its own conditioning (seed + branch index), like cond / uncond in classifier-free guidance;
    with ``context`` the calls are wrapped in diffusers' ``cache_context(name, step_index=..., ...)``.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model] * len(branches)
    inputs = [make_inputs(family, batch_size, seed + i, **shape) for i in range(len(branches))]
    latents = inputs[0]["hidden_states"].clone()
    with torch.no_grad():
        for step in range(steps):
            t = 1000.0 * (1 - step / steps)
            predictions = []
            for model, name, kwargs in zip(models, branches, inputs):
                kwargs = {**kwargs, "hidden_states": latents, **timestep_for(family, t, batch_size)}
                if context:
                    with cache_context(model, name, step_index=step, num_inference_steps=steps):
                        predictions.append(model(**kwargs)[0])
                else:
                    predictions.append(model(**kwargs)[0])
            guided = predictions[0] if len(predictions) == 1 else 2 * predictions[0] - predictions[1]
            latents = latents - guided / steps
    return latents


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
