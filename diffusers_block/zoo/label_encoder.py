"""Class labels as "prompts": learned token (and pooled) embeddings per label, for text-conditioned pipelines.

The digit models are conditioned through a stock pipeline's ``prompt_embeds`` (and SD3's ``pooled_prompt_embeds``),
so the pipeline stays stock and no tokenizer or text encoder has to be trained. Label ``num_classes`` is the null
label (the "empty prompt" of classifier-free guidance).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def check_labels(labels, num_classes: int, name: str) -> torch.Tensor:
    """``labels`` as a flat long tensor, or a ValueError naming the field and its range."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"{name} must be in [0, {num_classes - 1}], got {bad.tolist()}")
    return labels


class LabelEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_classes: int = 10, num_tokens: int = 4, dim: int = 192, pooled_dim: int = 192):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim) * 0.02)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]

    def check_labels(self, labels) -> torch.Tensor:
        return check_labels(labels, self.config.num_classes, "labels").to(self.tokens.device)

    @torch.no_grad()
    def prompt_kwargs(self, labels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for a StableDiffusion3Pipeline call: one sample per label, null label as negative."""
        labels = self.check_labels(labels)
        tokens, pooled = self(labels)
        null_tokens, null_pooled = self(torch.full_like(labels, self.null_label))
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        return {
            "prompt_embeds": cast(tokens),
            "pooled_prompt_embeds": cast(pooled),
            "negative_prompt_embeds": cast(null_tokens),
            "negative_pooled_prompt_embeds": cast(null_pooled),
        }


class ClipLabelEncoder(ModelMixin, ConfigMixin):
    """Digit and motion labels of a moving-digit clip as ``prompt_embeds`` for a WanPipeline.

    Each field has its own table of ``tokens_per_field`` learned tokens, so the model can compose any digit with any
    motion; index ``num_digits`` / ``num_motions`` is that field's null label. Classifier-free guidance drops both
    fields together (the negative prompt is both null labels).
    """

    @register_to_config
    def __init__(self, num_digits: int = 10, num_motions: int = 8, tokens_per_field: int = 2, dim: int = 64):
        super().__init__()
        self.digit_tokens = nn.Parameter(torch.randn(num_digits + 1, tokens_per_field, dim) * 0.02)
        self.motion_tokens = nn.Parameter(torch.randn(num_motions + 1, tokens_per_field, dim) * 0.02)

    def forward(self, digits: torch.Tensor, motions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.digit_tokens[digits], self.motion_tokens[motions]], dim=1)

    def null_labels(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.digit_tokens.device
        return (
            torch.full((n,), self.config.num_digits, device=device),
            torch.full((n,), self.config.num_motions, device=device),
        )

    @torch.no_grad()
    def prompt_kwargs(self, digits, motions, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments for a WanPipeline call: one clip per (digit, motion) pair, null labels as negative."""
        digits = check_labels(digits, self.config.num_digits, "digits").to(self.digit_tokens.device)
        motions = check_labels(motions, self.config.num_motions, "motions").to(self.digit_tokens.device)
        if len(digits) != len(motions):
            raise ValueError(f"one motion per digit: got {len(digits)} digits and {len(motions)} motions")
        tokens, null_tokens = self(digits, motions), self(*self.null_labels(len(digits)))
        if dtype is not None:
            tokens, null_tokens = tokens.to(dtype), null_tokens.to(dtype)
        return {"prompt_embeds": tokens, "negative_prompt_embeds": null_tokens}
