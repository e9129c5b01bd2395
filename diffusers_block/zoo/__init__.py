"""The small trained models that ship in this repository (``models/``), loaded offline with ``from_pretrained``.

Where they are found (an explicit path, ``DIFFUSERS_BLOCK_MODELS``, the source checkout): :func:`.locate.model_path`.
Their stock pipelines import transformers (the ``models`` extra) and load with plain
``DiffusionPipeline.from_pretrained(folder)`` too (text slots: :class:`.no_text_encoder.NoTextEncoder`); the loaders
here add the label encoder, dtype defaults and quiet loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._extras import require
from .label_encoder import ClipLabelEncoder, LabelEncoder
from .locate import ENV_VAR, ModelNotFoundError, model_path
from .no_text_encoder import NoTextEncoder, expected_placeholders, null_components

_STOCK_PIPELINES = "the shipped digits models' stock pipelines (StableDiffusion3Pipeline, WanPipeline)"


def load_digits_image_pipeline(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """The class-conditioned digits StableDiffusion3Pipeline and its label encoder.

    Generate with ``pipe(**encoder.prompt_kwargs([3, 7]), num_inference_steps=50, guidance_scale=3.0)``.
    ``path``: the pipeline folder (default: found by :func:`.locate.model_path`).
    """
    require("models", "transformers", _STOCK_PIPELINES)
    from diffusers import StableDiffusion3Pipeline

    path = model_path("digits-image", path)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    with expected_placeholders():
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **null_components(path)).to(device)
    encoder = LabelEncoder.from_pretrained(path / "label_encoder", dtype=dtype).to(device)
    return pipe, encoder


def load_digits_video_pipeline(
    path: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    train_command: str | None = None,
):
    """A moving-digits WanPipeline (17 frames, 32x32 for the shipped one) and its :class:`ClipLabelEncoder`.

    Generate with ``pipe(**encoder.prompt_kwargs(digits=[3], motions=[0]), num_frames=17, height=32, width=32,
    num_inference_steps=50, guidance_scale=3.0, output_type="pt")``; motions index ``data.digits.MOTIONS``.
    The autoencoder stays in float32 whatever ``dtype`` the transformer runs in (it is tiny, and WanPipeline
    decodes in the autoencoder's own dtype). A pipeline folder without ``vae/`` (e.g. one trained with ``--canvas 64
    --digit-size 14 --vae models/digits-video``) gets the shipped model's autoencoder: it is convolutional, and the
    digits have the same size on any canvas. ``train_command``: what the error for a missing folder should suggest
    (default: the shipped recipe).
    """
    require("models", "transformers", _STOCK_PIPELINES)
    from diffusers import AutoencoderKLWan, WanPipeline

    path = model_path("digits-video", path, train_command)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    shipped_vae = (
        {} if (path / "vae").is_dir() else {"vae": AutoencoderKLWan.from_pretrained(model_path("digits-video") / "vae")}
    )
    with expected_placeholders():
        pipe = WanPipeline.from_pretrained(path, dtype=dtype, **null_components(path), **shipped_vae).to(device)
    pipe.vae.to(torch.float32)
    encoder = ClipLabelEncoder.from_pretrained(path / "label_encoder", dtype=dtype).to(device)
    return pipe, encoder


__all__ = [
    "ENV_VAR",
    "ClipLabelEncoder",
    "LabelEncoder",
    "ModelNotFoundError",
    "NoTextEncoder",
    "load_digits_image_pipeline",
    "load_digits_video_pipeline",
    "model_path",
]
