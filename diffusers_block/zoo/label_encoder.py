"""Class labels as "prompts": learned token and pooled embeddings per label, for text-conditioned pipelines.

The digit models are conditioned through a stock pipeline's ``prompt_embeds`` / ``pooled_prompt_embeds``, so the
pipeline stays stock and no tokenizer or text encoder has to be trained. Label ``num_classes`` is the null label
(the "empty prompt" of classifier-free guidance).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


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
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.config.num_classes)]
        if len(bad):
            raise ValueError(f"labels must be in [0, {self.config.num_classes - 1}], got {bad.tolist()}")
        return labels.to(self.tokens.device)

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
