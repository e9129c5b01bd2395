"""Shared pieces of the recipes: a seeded random-weight model from a config, and the families of tests/tiny_models."""

from __future__ import annotations

import torch

from diffusers_block.random_weights import random_init_

from .. import tiny_models


def tiny(cls: type, **config) -> torch.nn.Module:
    """``cls(**config)`` in eval mode with every weight re-drawn (diffusers zero-initialises gates and outputs, which
    would make blocks identities and hide a wrong cached value)."""
    model = cls(**config)
    random_init_(model, 0, smooth_timesteps=False)
    return model.eval()


def from_tiny_models(family: str) -> tuple[torch.nn.Module, dict]:
    """A family tests/tiny_models already builds, with its inputs at noise level 500."""
    return tiny_models.build_transformer(family), {
        **tiny_models.make_inputs(family),
        **tiny_models.timestep_for(family, 500.0, 1),
    }


def timestep(value: float = 500.0, dtype=torch.float32) -> torch.Tensor:
    return torch.full((1,), value, dtype=dtype)


def text(length: int = 8, dim: int = 32) -> torch.Tensor:
    return torch.randn(1, length, dim)
