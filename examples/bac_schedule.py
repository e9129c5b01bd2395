"""Calibrate a BAC schedule once, save it as JSON, and sample with it (no decision at run time, compile-friendly).

python examples/bac_schedule.py --updates 22 --shared --out digits_bac_schedule.json
"""

import argparse

import torch

import diffusers_block
from diffusers_block.eval.digits import balanced_labels, generate_digits
from diffusers_block.eval.metrics import psnr
from diffusers_block.zoo import load_digits_image_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--updates", type=int, default=22, help="update steps per block")
    parser.add_argument("--shared", action="store_true", help="one schedule for all blocks")
    parser.add_argument("--out", default="digits_bac_schedule.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    pipe, encoder = load_digits_image_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)

    # Calibrate on some labels and seeds, evaluate on others.
    def calibration_run(pipe):
        return generate_digits(pipe, encoder, balanced_labels(1), args.steps, seed=100)

    schedule = diffusers_block.calibrate_schedule(pipe, calibration_run, args.updates, shared=args.shared)
    schedule.save(args.out)

    labels = balanced_labels(2)
    reference = generate_digits(pipe, encoder, labels, args.steps)
    pipe.enable_block_cache(diffusers_block.StaticScheduleConfig.load(args.out))
    cached = generate_digits(pipe, encoder, labels, args.steps)
    print(pipe.block_cache_summary())
    print(f"PSNR against the uncached images: {psnr(cached, reference, 1.0, 'mean'):.2f} dB; schedule in {args.out}")
    pipe.disable_block_cache()


if __name__ == "__main__":
    main()
