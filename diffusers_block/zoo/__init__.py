"""The small trained models that ship in this repository (``models/``), loaded offline with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from .label_encoder import LabelEncoder

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DIGITS_IMAGE = MODELS_DIR / "digits-image"


def load_digits_image_pipeline(path: str | Path = DIGITS_IMAGE, device: str = "cpu", dtype: torch.dtype | None = None):
    """The class-conditioned digits StableDiffusion3Pipeline and its label encoder.

    Generate with ``pipe(**encoder.prompt_kwargs([3, 7]), num_inference_steps=50, guidance_scale=3.0)``.
    """
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No trained digits image pipeline at {path}; train one with "
            f"`python -m diffusers_block.train digits-image --out {path}`"
        )
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    absent = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **absent).to(device)
    encoder = LabelEncoder.from_pretrained(path / "label_encoder", dtype=dtype).to(device)
    return pipe, encoder


__all__ = ["DIGITS_IMAGE", "LabelEncoder", "load_digits_image_pipeline"]
