"""Block-sparse attention on the shipped moving-digits video model: dense, skipped blocks dropped, and skipped blocks
cached, on the same seeds; prints the work and the fidelity of each, and draws one layer's block mask.

    python examples/sparse_attention_video.py                  # CPU, a few minutes
    python examples/sparse_attention_video.py --device cuda --clips 16

"Cached" is the fidelity setting: each mask selection also computes the skipped blocks once (a dense call) and the
steps that reuse the masks reuse that part; selections are packed into the early steps, where attention moves most.
The model is 576 tokens long, so blocks are 32 tokens (the library's defaults are for tens of thousands of tokens).
"""

import argparse

import torch

import diffusers_block
from diffusers_block.eval.classifier import DigitClassifier
from diffusers_block.eval.digits import balanced_clip_labels, class_accuracy, generate_clips
from diffusers_block.eval.metrics import psnr
from diffusers_block.zoo import load_digits_video_pipeline, model_path

SMALL_MODEL = dict(block_size=32, min_tokens=0, dense_steps=2)
SETTINGS = {
    "dropped": diffusers_block.SparseAttentionConfig(threshold=0.5, refresh_interval=2, **SMALL_MODEL),
    "cached": diffusers_block.SparseAttentionConfig(
        threshold=0.05, approximation="cached", refresh_schedule=((0.0, 2), (0.2, 12)), **SMALL_MODEL
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4, help="clips, one per (digit, motion) pair in turn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mask", default="sparse_attention_mask.png", help="where to draw a block mask")
    args = parser.parse_args()

    pipe, encoder = load_digits_video_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier")).to(args.device).eval()
    digits, motions = (labels[: args.clips] for labels in balanced_clip_labels(1))

    def generate() -> torch.Tensor:
        return generate_clips(pipe, encoder, digits, motions, args.steps, guidance_scale=5.0)

    dense = generate()
    print(f"{'attention':10s} {'blocks computed':>15s} {'PSNR dB':>8s} {'accuracy':>9s}")
    print(f"{'dense':10s} {1.0:15.1%} {'-':>8s} {class_accuracy(classifier, dense, digits):9.1%}")
    for name, config in SETTINGS.items():
        pipe.enable_sparse_attention(config)
        clips = generate()
        summary = pipe.sparse_attention_summary()
        pipe.disable_sparse_attention()
        fidelity = psnr(clips, dense, data_range=1.0, reduction="mean").item()
        accuracy = class_accuracy(classifier, clips, digits)
        print(f"{name:10s} {summary.overall_density:15.1%} {fidelity:8.2f} {accuracy:9.1%}")
    summary.plot_mask(args.mask, layer=0, head=0)
    print(f"block mask of layer 0, head 0 (last selection): {args.mask}")


if __name__ == "__main__":
    main()
