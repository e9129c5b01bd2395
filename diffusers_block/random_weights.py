"""Random weights that behave enough like trained ones for tests, examples and speed benchmarks.

diffusers initialises norms to 1 and biases to 0, and some models zero their gates, so a freshly built model can
have identity blocks; and a random timestep MLP responds to t so erratically that every block's residual changes by
~50% at every step, where a trained one changes by a few percent. Neither is a fair ground for caching.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int, smooth_timesteps: bool = True) -> None:
    """Matrices and tables ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1), biases ~ N(0, 0.02); drawn on the
    parameters' device, so the same seed gives the same model on the same kind of device."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.numel() == 0:  # e.g. a table sized by an optional feature that is off (BriaFibo2's unused slots)
            continue
        if param.ndim >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
        elif name.endswith("weight"):
            param.normal_(1.0, 0.1, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules() if smooth_timesteps else ():
        if isinstance(module, TimestepEmbedding):
            _smooth_in_time_(module.linear_1.weight)


def _smooth_in_time_(weight: torch.Tensor) -> None:
    """Keep only the sinusoidal timestep features that turn less than half a cycle over t in [0, 1000].

    A trained timestep MLP responds smoothly to t. A random one does not: features of frequency up to 1 rad per
    timestep unit decorrelate from one step to the next, so every block's modulation, and residual, changes by
    ~50% at every step and no cache finds anything to reuse. ``weight`` is the first layer on the (sin, cos)
    features of frequencies 10000^(-i/half); kept columns are rescaled to keep the output variance."""
    half = weight.shape[1] // 2
    freqs = 10000.0 ** (-torch.arange(half, device=weight.device) / half)
    keep = (freqs * 1000 <= math.pi).float().repeat(2)
    weight.mul_((keep / keep.mean().sqrt()).to(weight.dtype))
