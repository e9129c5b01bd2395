"""Observation and action normalisation, saved with the policy so that a loaded policy sees what it was trained on.

Diffusion Policy's low-dim normaliser: each dimension is mapped linearly from its [min, max] over the training
data to [-1, 1]. A dimension that never varies in the data (e.g. Meta-World's padding of the second object slot)
is only centred, so it neither divides by zero nor blows up a small change at test time.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

CONSTANT_RANGE = 1e-4  # a dimension whose range is below this is treated as constant


def _limits(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) with normalised = data * scale + offset mapping [min, max] to [-1, 1]."""
    flat = data.reshape(-1, data.shape[-1]).double()
    low, high = flat.min(0).values, flat.max(0).values
    span = high - low
    constant = span < CONSTANT_RANGE
    scale = torch.where(constant, torch.ones_like(span), 2 / span.clamp_min(CONSTANT_RANGE))
    offset = torch.where(constant, -low, -1 - low * scale)
    return scale.float(), offset.float()


class PolicyNormalizer(ModelMixin, ConfigMixin):
    """Per-dimension affine maps of observations and actions to [-1, 1] (buffers, saved as safetensors)."""

    @register_to_config
    def __init__(self, obs_dim: int = 39, action_dim: int = 4) -> None:
        super().__init__()
        self.register_buffer("obs_scale", torch.ones(obs_dim))
        self.register_buffer("obs_offset", torch.zeros(obs_dim))
        self.register_buffer("action_scale", torch.ones(action_dim))
        self.register_buffer("action_offset", torch.zeros(action_dim))

    @classmethod
    def fit(cls, observations: torch.Tensor, actions: torch.Tensor) -> PolicyNormalizer:
        """From training data: observations (..., obs_dim), actions (..., action_dim)."""
        normalizer = cls(obs_dim=observations.shape[-1], action_dim=actions.shape[-1])
        for name, data in (("obs", observations), ("action", actions)):
            scale, offset = _limits(torch.as_tensor(data))
            getattr(normalizer, f"{name}_scale").copy_(scale)
            getattr(normalizer, f"{name}_offset").copy_(offset)
        return normalizer

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return obs * self.obs_scale + self.obs_offset

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return action * self.action_scale + self.action_offset

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return (action - self.action_offset) / self.action_scale
