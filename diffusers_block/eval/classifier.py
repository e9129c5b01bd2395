"""A small CNN digit classifier, the judge of generated digit images and moving-digit videos.

:class:`DigitClassifier` is a diffusers ``ModelMixin, ConfigMixin``: it saves and loads with ``save_pretrained`` /
``from_pretrained`` (config.json + diffusion_pytorch_model.safetensors). It takes ``(B, 1, H, W)`` images in
[-1, 1] (ink +1, background -1) and returns logits ``(B, 10)``; any other H, W is first resized to 32x32
(bilinear, antialiased), so a 64x64 canvas is simply downsampled. :meth:`DigitClassifier.predict` also takes
videos ``(B, T, 1, H, W)`` and classifies each frame.

It is trained on the "train" split of :mod:`diffusers_block.data.digits` with random rotation, scale (down to
about a third of the canvas, so a 14 px digit in a 32 px video frame counts), translation, contrast and noise,
so it also reads generated digits and whole moving-digit frames. Train and save the shipped model with::

    python -m diffusers_block.eval.classifier --out models/digit-classifier

which also writes the measured accuracies to ``<out>/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

DEFAULT_EPOCHS = 60
DEFAULT_SEED = 0


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU()
    )


class DigitClassifier(ModelMixin, ConfigMixin):
    """Conv net: a stem at full resolution, then one stride-2 conv and one conv per width, global pooling, linear."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, ...] = (32, 64, 128),
        sample_size: int = 32,
        dropout: float = 0.1,
    ):
        super().__init__()
        layers = [_conv(in_channels, widths[0] // 2)]
        cin = widths[0] // 2
        for width in widths:
            layers += [_conv(cin, width, stride=2), _conv(width, width)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pooled_features(images)))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The globally pooled features the head reads, ``(B, widths[-1])``: the space of the digit FID."""
        size = self.config.sample_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.features(images).mean(dim=(2, 3))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Pooled features of images ``(B, C, H, W)`` or of every frame of videos ``(B, T, C, H, W)``, float32 on CPU."""
        flat = images.reshape(-1, *images.shape[-3:]).to(self.device, self.dtype)
        return torch.cat([self.pooled_features(chunk).float().cpu() for chunk in flat.split(batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted digits: ``(B,)`` for images ``(B, C, H, W)``, ``(B, T)`` per frame for videos ``(B, T, C, H, W)``."""
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:]).to(self.device, self.dtype)
        preds = [self(chunk).argmax(-1) for chunk in flat.split(batch_size)]
        return torch.cat(preds).view(lead).cpu()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images (or frames; ``labels`` broadcast over the frames) classified correctly."""
        preds = self.predict(images)
        return (preds == labels.view(labels.shape + (1,) * (preds.ndim - labels.ndim))).float().mean().item()


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-15 deg), scale, translation (keeping the digit inside), contrast and noise, in [-1, 1].

    Half the batch stays near full size (scale 0.8..1.1); the other half shrinks to 0.35..0.8 of the canvas and
    goes anywhere on it, like a digit in a moving-digit frame.
    """
    n = images.shape[0]

    def uniform(lo, hi, shape=(n,)):
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    small = torch.rand(n, generator=generator) < 0.5
    scale = torch.where(small, uniform(0.35, 0.8), uniform(0.8, 1.1))
    aspect = uniform(0.9, 1.1)
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    angle = uniform(-math.pi / 12, math.pi / 12)
    room = (1 - scale).clamp_min(0.05)
    tx, ty = uniform(-1, 1) * room, uniform(-1, 1) * room
    # affine_grid maps output coords to input coords: in = S^-1 R^-1 (out - t).
    cos, sin = angle.cos(), angle.sin()
    a = torch.stack([torch.stack([cos / sx, sin / sx], -1), torch.stack([-sin / sy, cos / sy], -1)], -2)
    theta = torch.cat([a, -(a @ torch.stack([tx, ty], -1)[..., None])], -1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    ink = F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = ink * uniform(0.7, 1.0).view(-1, 1, 1, 1)
    noisy = torch.rand(n, generator=generator) < 0.5
    sigma = torch.where(noisy, uniform(0.0, 0.1), torch.zeros(n)).view(-1, 1, 1, 1)
    ink = ink + sigma * torch.randn(ink.shape, generator=generator)
    return (ink.clamp(0, 1) * 2 - 1).contiguous()


def train_classifier(
    output_dir: str | None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = 128,
    lr: float = 3e-3,
    log: bool = True,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on the "train" split (CPU is enough) and ``save_pretrained`` it if asked."""
    from diffusers_block.data import load_digit_images

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images("train", size=32)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for idx in order.split(batch_size):
            x, y = augment(images[idx], generator), labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            loss_sum += loss.item() * len(y)
        if log:
            print(
                f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, train acc (augmented) {correct / total:.4f}"
            )
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def evaluate_classifier(model: DigitClassifier, n_clips: int = 200, seed: int = 0) -> dict:
    """Accuracy on the real test split and per-frame accuracy on single-digit moving-digit test clips."""
    from diffusers_block.data import load_digit_images, make_moving_digits

    model.eval()
    images, labels = load_digit_images("test", size=32)
    result = {"test_split_accuracy": round(model.accuracy(images, labels), 4), "test_split_images": len(labels)}
    for size in (32, 64):
        clips, info = make_moving_digits(n_clips, "test", frames=16, size=size, digits_per_clip=1, seed=seed)
        result[f"moving_digits_{size}px_frame_accuracy"] = round(model.accuracy(clips, info["digits"][:, 0]), 4)
    result["moving_digits_clips"] = {
        "n_clips": n_clips,
        "frames": 16,
        "digits_per_clip": 1,
        "split": "test",
        "seed": seed,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (diffusers layout)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    metrics = evaluate_classifier(model)
    metrics.update(
        command=f"python -m diffusers_block.eval.classifier --out {args.out} --epochs {args.epochs} --seed {args.seed}",
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(seconds, 1),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
    )
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    json.dump(metrics, sys.stdout, indent=2)
    print()
    return metrics


if __name__ == "__main__":
    main()
