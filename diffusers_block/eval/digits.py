"""Generating digits and moving-digit clips with the shipped models from fixed seeds, and scoring them."""

from __future__ import annotations

import torch

from ..data.digits import MOTIONS, motion_directions
from ..zoo.label_encoder import ClipLabelEncoder, LabelEncoder


def balanced_labels(per_class: int, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def generate_digits(
    pipe,
    encoder: LabelEncoder,
    labels: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 250,
) -> torch.Tensor:
    """Images (N, 1, 32, 32) in [0, 1]; batch b is seeded with ``seed + b``, so results do not depend on N."""
    images = []
    for b, chunk in enumerate(labels.split(batch_size)):
        generator = torch.Generator(pipe.device).manual_seed(seed + b)
        out = pipe(
            **encoder.prompt_kwargs(chunk, dtype=pipe.transformer.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


def class_accuracy(classifier, images01: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images, or of all frames of clips, that the classifier reads as their label."""
    return classifier.accuracy(images01 * 2 - 1, labels)


def balanced_clip_labels(per_pair: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (digit, motion) pair ``per_pair`` times: digits and motions, each (10 * len(MOTIONS) * per_pair,)."""
    digits = torch.arange(10).repeat_interleave(len(MOTIONS))
    motions = torch.arange(len(MOTIONS)).repeat(10)
    return digits.repeat(per_pair), motions.repeat(per_pair)


@torch.no_grad()
def generate_clips(
    pipe,
    encoder: ClipLabelEncoder,
    digits: torch.Tensor,
    motions: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 80,
    frames: int = 17,
    size: int = 32,
) -> torch.Tensor:
    """Clips (N, T, 1, H, W) in [0, 1] from a moving-digits WanPipeline; batch b is seeded with ``seed + b``."""
    clips = []
    for b, (d, m) in enumerate(zip(digits.split(batch_size), motions.split(batch_size))):
        generator = torch.Generator(pipe.device).manual_seed(seed + b)
        out = pipe(
            **encoder.prompt_kwargs(d, m, dtype=pipe.transformer.dtype),
            num_frames=frames,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
        )
        clips.append(out.frames.float().mean(dim=2, keepdim=True).cpu())  # (B, T, C, H, W); grey copied to RGB
    return torch.cat(clips)


def estimate_motion(clips01: torch.Tensor, ink: float = 0.5) -> torch.Tensor:
    """The motion class of each clip (N, T, 1, H, W) in [0, 1] from its ink centroid: which axes move, and which way.

    An axis moves when the centroid travels on average more than half a pixel per frame along it; its direction is
    the sign of the first frame-to-frame step longer than half a pixel. Clips with a frame without ink get -1.
    """
    weights = (clips01[:, :, 0] - ink).clamp_min(0)  # (N, T, H, W)
    total = weights.sum(dim=(-2, -1))
    rows = torch.arange(weights.shape[-2], dtype=weights.dtype)
    cols = torch.arange(weights.shape[-1], dtype=weights.dtype)
    centroid = torch.stack(
        [(weights.sum(-1) * rows).sum(-1), (weights.sum(-2) * cols).sum(-1)], dim=-1
    ) / total.clamp_min(1e-6).unsqueeze(-1)  # (N, T, 2) as (y, x)
    steps = centroid.diff(dim=1)  # (N, T - 1, 2)
    moving = steps.abs().mean(dim=1) > 0.5
    # The first clear step (more than half a pixel): a digit whose path folds at a wall stands still for one step.
    clear = steps.abs() > 0.5
    first = steps.gather(1, clear.float().argmax(dim=1, keepdim=True)).squeeze(1)  # (N, 2)
    direction = torch.where(moving, first.sign(), torch.zeros_like(first)).long()  # moving: a clear step exists
    table = motion_directions()  # (classes, 2) of -1/0/1
    match = (direction[:, None, :] == table[None]).all(-1)  # (N, classes)
    found = match.any(-1) & (total > 0).all(-1)
    return torch.where(found, match.float().argmax(-1), torch.full_like(found, -1, dtype=torch.long))


def motion_accuracy(clips01: torch.Tensor, motions: torch.Tensor) -> float:
    """Fraction of clips whose estimated motion (:func:`estimate_motion`) is their motion label."""
    return (estimate_motion(clips01) == motions.cpu()).float().mean().item()


def motion_axes_accuracy(clips01: torch.Tensor, motions: torch.Tensor) -> float:
    """Fraction of clips moving along the axes their label asks for (horizontal, vertical or both), whatever the sign.

    This separates "moves the right way along the right line" from "moves along the right line": a model learns the
    second long before the first.
    """
    table = motion_directions() != 0  # (classes, 2): which axes move
    estimated = estimate_motion(clips01)
    agree = (table[estimated.clamp_min(0)] == table[motions.cpu()]).all(-1) & (estimated >= 0)
    return agree.float().mean().item()


def main(argv=None) -> dict:
    """python -m diffusers_block.eval.digits [--model DIR] [--per-class N] [--steps 50]: accuracy of generations."""
    import argparse
    import json

    from ..zoo import load_digits_image_pipeline, model_path
    from .classifier import DigitClassifier

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="pipeline folder (default: the shipped digits-image)")
    parser.add_argument("--classifier", help="classifier folder (default: the shipped one)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    pipe, encoder = load_digits_image_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier", args.classifier)).to(args.device).eval()
    labels = balanced_labels(args.per_class)
    images = generate_digits(pipe, encoder, labels, args.steps, args.guidance)
    result = {
        "accuracy": class_accuracy(classifier, images, labels),
        "samples": len(labels),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "device": args.device,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
