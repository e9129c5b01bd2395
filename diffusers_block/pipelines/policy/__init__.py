"""Diffusion policies: a transformer denoiser, its pipeline, Meta-World data and the closed-loop rollout."""

from .model import PolicyTransformer
from .normalizer import PolicyNormalizer
from .pipeline import DiffusionPolicyPipeline, PolicyInputError, PolicyPipelineOutput

__all__ = [
    "DiffusionPolicyPipeline",
    "PolicyInputError",
    "PolicyNormalizer",
    "PolicyPipelineOutput",
    "PolicyTransformer",
]
