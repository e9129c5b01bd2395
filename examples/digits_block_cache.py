"""Block caching on the trained digits model that ships in this repo: uncached vs cached, same seeds, side by side.

    python examples/digits_block_cache.py                      # BWCache, threshold 0.1
    python examples/digits_block_cache.py --policy static --interval 3

Writes a picture (top rows uncached, bottom rows cached) and the steps x blocks heatmap, and prints the speed-up,
the fraction of block evaluations saved, PSNR / SSIM against the uncached images and the digit classifier's
accuracy on both.
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

import diffusers_block
from diffusers_block.eval.classifier import DigitClassifier
from diffusers_block.eval.digits import class_accuracy, generate_digits
from diffusers_block.eval.metrics import psnr, ssim
from diffusers_block.zoo import load_digits_image_pipeline, model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default="0123456789", help="which digits to draw, one image each per row")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--policy", choices=["bwcache", "static"], default="bwcache")
    parser.add_argument("--threshold", type=float, default=0.1, help="BWCache relative-change threshold")
    parser.add_argument("--interval", type=int, default=3, help="static schedule: compute every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="digits_block_cache.png")
    args = parser.parse_args()

    pipe, encoder = load_digits_image_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier")).to(args.device).eval()
    labels = torch.tensor([int(d) for d in args.digits]).repeat(args.rows)

    def generate():
        start = time.perf_counter()
        images = generate_digits(pipe, encoder, labels, args.steps, args.guidance)
        return images, time.perf_counter() - start

    generate()  # warm-up
    reference, dense_s = generate()
    if args.policy == "bwcache":
        config = diffusers_block.BWCacheConfig(threshold=args.threshold)
    else:
        config = diffusers_block.StaticScheduleConfig(interval=args.interval, warmup_steps=5, cooldown_steps=2)
    pipe.enable_block_cache(config)
    cached, cached_s = generate()
    summary = pipe.block_cache_summary()
    pipe.disable_block_cache()

    print(f"uncached {dense_s:.2f} s | cached {cached_s:.2f} s | speed-up {dense_s / cached_s:.2f}x")
    print(summary)
    print(f"PSNR {psnr(cached, reference, 1.0, 'mean'):.2f} dB | SSIM {ssim(cached, reference, 1.0, 'mean'):.4f}")
    print(
        f"classifier accuracy: uncached {class_accuracy(classifier, reference, labels):.0%}, "
        f"cached {class_accuracy(classifier, cached, labels):.0%}"
    )
    columns = len(args.digits)
    grid = torch.cat([reference, cached]).view(2 * args.rows, columns, 32, 32).permute(0, 2, 1, 3)
    pixels = (grid.reshape(2 * args.rows * 32, columns * 32).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((columns * 96, 2 * args.rows * 96), Image.NEAREST).save(args.out)
    print(f"images: {args.out} (top: uncached, bottom: cached) | heatmap: {summary.plot('digits_cache_heatmap.png')}")


if __name__ == "__main__":
    main()
