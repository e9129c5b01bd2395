"""One DDPM step as one fused kernel (Triton), from coefficients computed once per schedule.

diffusers' ``DDPMScheduler.step`` computes its coefficients from ``alphas_cumprod`` at every call and applies them
in about ten element-wise kernels (predicted x0, clip, two products, a sum, the noise draw, its scaling, a sum). For
a policy's tiny action tensor (horizon x action_dim per environment) each of those kernels is pure launch
overhead, a thousand launches over a 100-step chunk, inside a CUDA graph too. The step is affine in the current
sample ``x``, the model output ``e`` and the noise ``z``, with one clamp in between::

    x0   = clamp(p_i * x + q_i * e, -r, r)          predicted clean sample (p, q from the prediction type)
    prev = c0_i * x0 + c1_i * x + std_i * z         posterior mean (DDPM eq. 7) plus the fixed-small noise

so the per-step scalars are computed once in Python (:meth:`DDPMStepCoefficients.from_scheduler`) and one kernel
applies them. The noise of every step is drawn up front in one call (see ``DiffusionPolicyPipeline.chunk_noise``),
which keeps a chunk's random numbers the same whether it runs eagerly or replayed from a CUDA graph.

Only what the kernel reproduces exactly is fused: ``DDPMScheduler`` with ``variance_type`` "fixed_small" (Diffusion
Policy's) or "fixed_large", no dynamic thresholding, epsilon / sample / v prediction. Anything else returns ``None``
from :meth:`~DDPMStepCoefficients.from_scheduler` and the pipeline calls ``scheduler.step``.
On CPU without ``TRITON_INTERPRET=1`` the launcher runs :func:`ddpm_step_reference`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from ...kernels import runtime
from ...kernels.runtime import tl, triton

__all__ = ["DDPMStepCoefficients", "ddpm_step", "ddpm_step_reference"]

#: Elements per program: a chunk of 256 environments x 16 x 4 actions is 16 programs; one environment is one.
BLOCK = 1024
#: An element-wise op on a few KB: one warp group is plenty.
NUM_WARPS = 4
FUSED_VARIANCES = ("fixed_small", "fixed_large")


@dataclass(frozen=True)
class DDPMStepCoefficients:
    """Per-step scalars of a DDPM schedule (one entry per step ``i`` of ``timesteps``), see the module docstring.

    ``clip``: the x0 clip range, or None for no clipping. ``std[i]`` is 0 at the last step (no noise added)."""

    p: tuple[float, ...]
    q: tuple[float, ...]
    c0: tuple[float, ...]
    c1: tuple[float, ...]
    std: tuple[float, ...]
    clip: float | None

    @classmethod
    def from_scheduler(cls, scheduler, timesteps: Sequence[int]) -> DDPMStepCoefficients | None:
        """The coefficients ``scheduler.step`` would use at each of ``timesteps`` (after ``set_timesteps``), or None
        when the fused step does not reproduce this scheduler (another class or variance type, thresholding)."""
        config = scheduler.config
        if (
            type(scheduler) is not DDPMScheduler
            or config.variance_type not in FUSED_VARIANCES
            or config.thresholding
            or config.prediction_type not in ("epsilon", "sample", "v_prediction")
        ):
            return None
        # float32 as diffusers computes them (alphas_cumprod is float32), then Python floats for the kernel.
        alphas = scheduler.alphas_cumprod.float()
        timesteps = [int(t) for t in timesteps]
        p, q, c0, c1, std = [], [], [], [], []
        for i, t in enumerate(timesteps):
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            alpha_t = alphas[t]
            alpha_prev = alphas[prev_t] if prev_t >= 0 else torch.tensor(1.0)
            beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
            current_alpha = alpha_t / alpha_prev
            current_beta = 1 - current_alpha
            if config.prediction_type == "epsilon":  # (x - sqrt(beta_t) e) / sqrt(alpha_t)
                p.append(float(1 / alpha_t**0.5))
                q.append(float(-(beta_t**0.5) / alpha_t**0.5))
            elif config.prediction_type == "sample":
                p.append(0.0)
                q.append(1.0)
            else:  # v_prediction: sqrt(alpha_t) x - sqrt(beta_t) v
                p.append(float(alpha_t**0.5))
                q.append(float(-(beta_t**0.5)))
            c0.append(float(alpha_prev**0.5 * current_beta / beta_t))
            c1.append(float(current_alpha**0.5 * beta_prev / beta_t))
            if t > 0:
                variance = torch.clamp(beta_prev / beta_t * current_beta, min=1e-20)
                if config.variance_type == "fixed_large":
                    variance = current_beta
                std.append(float(variance**0.5))
            else:
                std.append(0.0)
        clip = float(config.clip_sample_range) if config.clip_sample else None
        return cls(tuple(p), tuple(q), tuple(c0), tuple(c1), tuple(std), clip)

    def __len__(self) -> int:
        return len(self.p)

    def noisy_steps(self) -> int:
        """How many steps add noise (all but a final t = 0 step): the rows of step noise a chunk needs."""
        return sum(s > 0 for s in self.std)


def ddpm_step_reference(
    model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None, coeffs: DDPMStepCoefficients, i: int
) -> torch.Tensor:
    """PyTorch reference of the fused step (several kernels); ``noise`` may be None on a step without noise."""
    x0 = coeffs.p[i] * sample + coeffs.q[i] * model_output
    if coeffs.clip is not None:
        x0 = x0.clamp(-coeffs.clip, coeffs.clip)
    prev = coeffs.c0[i] * x0 + coeffs.c1[i] * sample
    if coeffs.std[i] > 0:
        if noise is None:
            raise ValueError(f"step {i} adds noise (std {coeffs.std[i]:.3g}): pass its noise tensor")
        prev = prev + coeffs.std[i] * noise
    return prev


if triton is not None:

    @triton.jit
    def _ddpm_step_fwd(
        E, X, Z, Out, N, p, q, c0, c1, std, clip, CLIP: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = p * x + q * e
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
        prev = c0 * x0 + c1 * x
        if NOISE:
            prev += std * tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + offs, prev.to(Out.dtype.element_ty), mask=mask)


def ddpm_step(
    model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None, coeffs: DDPMStepCoefficients, i: int
) -> torch.Tensor:
    """``DDPMScheduler.step(model_output, timesteps[i], sample).prev_sample`` with the given ``noise``, one kernel.

    Args:
        model_output, sample: same shape and dtype (any layout; made contiguous).
        noise: the step's standard-normal noise (same shape), or None on a step that adds none (the last).
        coeffs: from :meth:`DDPMStepCoefficients.from_scheduler` for the schedule ``i`` indexes.
    """
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must match")
    if not 0 <= i < len(coeffs):
        raise ValueError(f"step {i} is outside the schedule's {len(coeffs)} steps")
    with_noise = coeffs.std[i] > 0
    if with_noise and (noise is None or noise.shape != sample.shape):
        raise ValueError(f"step {i} adds noise: pass a noise tensor of shape {tuple(sample.shape)}")
    if not runtime.use_triton(sample):
        return ddpm_step_reference(model_output, sample, noise, coeffs, i)
    x, e = sample.contiguous(), model_output.contiguous()
    z = noise.contiguous() if with_noise else x  # never read without NOISE
    out = torch.empty_like(x)
    n = x.numel()
    clip = coeffs.clip if coeffs.clip is not None else math.inf
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _ddpm_step_fwd[(triton.cdiv(n, BLOCK),)](
            e,
            x,
            z,
            out,
            n,
            coeffs.p[i],
            coeffs.q[i],
            coeffs.c0[i],
            coeffs.c1[i],
            coeffs.std[i],
            clip,
            CLIP=coeffs.clip is not None,
            NOISE=with_noise,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )
    return out
