"""python -m diffusers_block.train {digits-image,digits-video,policy,distill} --out DIR [--steps N] ..."""

import argparse
import time

import torch

from .digits_image import train_digits_image
from .digits_video import train_digits_video


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
    video = commands.add_parser("digits-video", help="Wan autoencoder + digit/motion-conditioned Wan flow model")
    video.add_argument("--out", default="models/digits-video")
    video.add_argument("--clips", type=int, default=20000, help="training clips, generated from the train split")
    video.add_argument("--vae-steps", type=int, default=3000)
    video.add_argument("--steps", type=int, default=20000)
    video.add_argument("--vae-batch-size", type=int, default=64)
    video.add_argument("--flow-batch-size", type=int, default=256)
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--vae-minutes", type=float, help="wall-clock budget of the autoencoder stage")
    video.add_argument("--max-minutes", type=float, help="wall-clock budget of the transformer stage")
    video.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    video.add_argument("--canvas", type=int, default=32, help="clip height and width (px)")
    video.add_argument("--digit-size", type=int, help="digit height and width (px; default 7/16 of the canvas)")
    video.add_argument("--width", type=int, default=256, help="transformer width (heads of 64)")
    video.add_argument("--layers", type=int, default=8, help="transformer blocks")
    stage = video.add_mutually_exclusive_group()
    stage.add_argument("--vae-only", action="store_true", help="train and save only the autoencoder (to OUT/vae)")
    stage.add_argument("--vae", help="reuse this trained autoencoder (what --vae-only saved) and skip stage 1")
    policy = commands.add_parser("policy", help="multi-task transformer diffusion policy on Meta-World demos")
    policy.add_argument("--data", default=".policy-data/metaworld-demos.npz", help="from ...policy.collect")
    policy.add_argument("--out", default="models/policy-metaworld")
    policy.add_argument("--steps", type=int, default=50000)
    policy.add_argument("--batch-size", type=int, default=512)
    policy.add_argument("--lr", type=float, default=2e-4)
    policy.add_argument("--prediction-type", choices=["epsilon", "flow"], default="epsilon")
    policy.add_argument("--seed", type=int, default=0)
    policy.add_argument("--max-minutes", type=float, help="wall-clock budget")
    from . import distill

    distill.add_arguments(commands.add_parser("distill", help="segment students of a flow-matching digits pipeline"))
    args = parser.parse_args(argv)
    start = time.time()
    if args.command == "distill":
        out = distill.run(args)
    elif args.command == "policy":
        from .policy import train_policy_cli

        out = train_policy_cli(args)
    elif args.command == "digits-image":
        out = train_digits_image(
            args.out, args.vae_steps, args.steps, args.batch_size, args.flow_batch_size, args.seed, args.max_minutes
        )
    else:
        out = train_digits_video(
            args.out,
            args.vae_steps,
            args.steps,
            args.clips,
            args.vae_batch_size,
            args.flow_batch_size,
            args.seed,
            args.vae_minutes,
            args.max_minutes,
            args.compile,
            vae_from=args.vae,
            vae_only=args.vae_only,
            canvas=args.canvas,
            digit_size=args.digit_size,
            width=args.width,
            layers=args.layers,
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"saved {out} after {time.time() - start:.0f} s on {device}")


if __name__ == "__main__":
    main()
