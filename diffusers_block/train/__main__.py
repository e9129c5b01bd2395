"""python -m diffusers_block.train digits-image --out models/digits-image [--steps N] [--vae-steps N]"""

import argparse
import time

import torch

from .digits_image import train_digits_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusers_block.train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("digits-image", help="autoencoder + class-conditioned SD3-architecture flow model")
    image.add_argument("--out", default="models/digits-image")
    image.add_argument("--vae-steps", type=int, default=4000)
    image.add_argument("--steps", type=int, default=20000)
    image.add_argument("--batch-size", type=int, default=256)
    image.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    out = train_digits_image(args.out, args.vae_steps, args.steps, args.batch_size, args.seed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"saved {out} after {time.time() - start:.0f} s on {device}")


if __name__ == "__main__":
    main()
