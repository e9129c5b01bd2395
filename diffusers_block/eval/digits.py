"""Generating digits with the shipped image model from fixed seeds, and scoring them with the shipped classifier."""

from __future__ import annotations

import torch

from ..zoo.label_encoder import LabelEncoder


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
    return classifier.accuracy(images01 * 2 - 1, labels)


def main(argv=None) -> dict:
    """python -m diffusers_block.eval.digits [--model DIR] [--per-class N] [--steps 50]: accuracy of generations."""
    import argparse
    import json

    from ..zoo import DIGITS_IMAGE, load_digits_image_pipeline
    from .classifier import DigitClassifier

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=str(DIGITS_IMAGE))
    parser.add_argument("--classifier", default=str(DIGITS_IMAGE.parent / "digit-classifier"))
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    pipe, encoder = load_digits_image_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(args.classifier).to(args.device).eval()
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
