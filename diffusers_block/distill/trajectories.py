"""The teacher's guided flow solved with many small Euler steps: what the students learn to cover in a few.

The students have classifier-free guidance folded in, so the flow they follow is the teacher's guided one,
``v = v_uncond + g (v_cond - v_uncond)``, evaluated with both branches in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def transformer_velocity(transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, conditioning: dict):
    """The transformer's velocity at ``x`` for per-sample ``sigma`` (B,) in [0, 1] (timestep = 1000 sigma)."""
    return transformer(hidden_states=x, timestep=sigma * 1000, return_dict=False, **conditioning)[0]


class GuidedVelocity:
    """``v(x, sigma)`` of the teacher with CFG at ``guidance_scale`` for fixed conditional / unconditional inputs."""

    def __init__(self, transformer: nn.Module, cond: dict, uncond: dict | None, guidance_scale: float) -> None:
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.guided = uncond is not None and guidance_scale != 1.0
        self.inputs = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if self.guided else cond

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``sigma``: one level for the whole batch, or one per sample (B,)."""
        sigmas = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(len(x))
        sigmas = torch.cat([sigmas, sigmas]) if self.guided else sigmas
        v = transformer_velocity(self.transformer, torch.cat([x, x]) if self.guided else x, sigmas, self.inputs)
        if not self.guided:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def solve(
    velocity, noise: torch.Tensor, sigmas: Sequence[float], keep: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler from ``noise`` over ``sigmas`` (descending, ending at 0).

    Returns the states at the grid points ``keep`` (all by default), stacked (len(keep), B, ...) in float32, and,
    when every point is kept, the velocities at the first M points (M, B, ...) (for :func:`schedule.euler_defects`).
    """
    keep = list(range(len(sigmas))) if keep is None else list(keep)
    record_velocities = len(keep) == len(sigmas)
    x = noise
    states, velocities = [], []
    if 0 in keep:
        states.append(x.float())
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x, sigma)
        if record_velocities:
            velocities.append(v.float())
        x = x + (sigma_next - sigma) * v
        if i + 1 in keep:
            states.append(x.float())
    return torch.stack(states), (torch.stack(velocities) if record_velocities else None)
