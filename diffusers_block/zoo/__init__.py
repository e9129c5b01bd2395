"""The small trained models that ship in this repository (``models/``), loaded offline with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from .label_encoder import ClipLabelEncoder, LabelEncoder

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DIGITS_IMAGE = MODELS_DIR / "digits-image"
DIGITS_VIDEO = MODELS_DIR / "digits-video"
DIGIT_CLASSIFIER = MODELS_DIR / "digit-classifier"


def load_digits_image_pipeline(path: str | Path = DIGITS_IMAGE, device: str = "cpu", dtype: torch.dtype | None = None):
    """The class-conditioned digits StableDiffusion3Pipeline and its label encoder.

    Generate with ``pipe(**encoder.prompt_kwargs([3, 7]), num_inference_steps=50, guidance_scale=3.0)``.
    """
    from diffusers import StableDiffusion3Pipeline

    path = _trained(path, "digits-image")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    absent = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **absent).to(device)
    encoder = LabelEncoder.from_pretrained(path / "label_encoder", dtype=dtype).to(device)
    return pipe, encoder


def load_digits_video_pipeline(
    path: str | Path = DIGITS_VIDEO,
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
    from diffusers import AutoencoderKLWan, WanPipeline

    path = _trained(path, "digits-video", train_command)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    shared = {} if (path / "vae").is_dir() else {"vae": AutoencoderKLWan.from_pretrained(DIGITS_VIDEO / "vae")}
    pipe = WanPipeline.from_pretrained(path, dtype=dtype, text_encoder=None, tokenizer=None, **shared).to(device)
    pipe.vae.to(torch.float32)
    encoder = ClipLabelEncoder.from_pretrained(path / "label_encoder", dtype=dtype).to(device)
    return pipe, encoder


def _trained(path: str | Path, recipe: str, train_command: str | None = None) -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        command = train_command or f"python -m diffusers_block.train {recipe} --out {path}"
        raise FileNotFoundError(f"No trained pipeline at {path}; train one with `{command}`")
    return path


__all__ = [
    "DIGITS_IMAGE",
    "DIGITS_VIDEO",
    "DIGIT_CLASSIFIER",
    "ClipLabelEncoder",
    "LabelEncoder",
    "load_digits_image_pipeline",
    "load_digits_video_pipeline",
]
