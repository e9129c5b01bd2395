"""The registry: one tiny recipe or one not-a-DiT entry per transformer class diffusers exports."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Architecture styles, as the README groups them.
CROSS_ATTENTION = "single-stream, cross-attention"  # image tokens attend to text through a separate attn2
JOINT = "joint two-stream"  # image and text streams, one joint attention per block
DOUBLE_SINGLE = "double + single blocks"  # joint two-stream blocks, then blocks on the concatenated sequence
SINGLE_SEQUENCE = "single-stream, joint sequence"  # text and image concatenated into one stream from the start
CLASS_CONDITIONAL = "single-stream, class-conditional"  # no text at all (DiT)


@dataclass(frozen=True)
class Recipe:
    """A tiny random-weight instance of ``cls_name`` and the kwargs of one valid forward call."""

    cls_name: str
    style: str
    modality: str
    build: Callable[[], tuple[torch.nn.Module, dict]]


RECIPES: dict[str, Recipe] = {}
NOT_A_DIT: dict[str, str] = {}


def recipe(cls_name: str, style: str, modality: str) -> Callable:
    """Register ``fn() -> (model, forward kwargs)`` as the recipe of ``cls_name``; it runs under a fixed seed."""

    def register(fn: Callable[[], tuple[torch.nn.Module, dict]]):
        if cls_name in RECIPES or cls_name in NOT_A_DIT:
            raise ValueError(f"{cls_name} is registered twice")

        def build() -> tuple[torch.nn.Module, dict]:
            torch.manual_seed(0)
            with torch.no_grad():
                return fn()

        RECIPES[cls_name] = Recipe(cls_name, style, modality, build)
        return fn

    return register


def not_a_dit(cls_name: str, why: str) -> None:
    """Record that ``cls_name`` is exported with the transformers but is no diffusion transformer to cache."""
    if cls_name in RECIPES or cls_name in NOT_A_DIT:
        raise ValueError(f"{cls_name} is registered twice")
    NOT_A_DIT[cls_name] = why


def transformer_classes() -> list[str]:
    """Every ModelMixin subclass exported by ``diffusers.models.transformers``, sorted by name."""
    import diffusers.models.transformers as transformers
    from diffusers import ModelMixin

    return sorted(
        name
        for name in dir(transformers)
        if not name.startswith("_")
        and inspect.isclass(getattr(transformers, name))
        and issubclass(getattr(transformers, name), ModelMixin)
    )


def missing_classes() -> list[str]:
    """Classes diffusers exports that have neither a recipe nor a not-a-DiT entry (new in a diffusers upgrade)."""
    return [name for name in transformer_classes() if name not in RECIPES and name not in NOT_A_DIT]
