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
    image.add_argument("--batch-size", type=int, default=256, help="autoencoder batch")
    image.add_argument("--flow-batch-size", type=int, default=1024, help="transformer batch")
    image.add_argument("--seed", type=int, default=0)
    image.add_argument("--max-minutes", type=float, help="wall-clock budget of the transformer stage")
    args = parser.parse_args(argv)
    start = time.time()
    out = train_digits_image(
        args.out, args.vae_steps, args.steps, args.batch_size, args.flow_batch_size, args.seed, args.max_minutes
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"saved {out} after {time.time() - start:.0f} s on {device}")


if __name__ == "__main__":
    main()
