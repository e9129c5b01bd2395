"""Block caching in a stock diffusers pipeline: the same seed with and without the cache, side by side.

With the hub (real weights):
    python examples/quickstart.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --device cuda
Offline (a small Wan-architecture pipeline with random weights, initialised to change smoothly across steps as
trained weights do: it shows the mechanics and the speed-up, not pretty pictures):
    python examples/quickstart.py
"""

import argparse
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

import diffusers_block
from diffusers_block.random_weights import random_init_


def offline_pipeline() -> tuple[WanPipeline, dict]:
    """A 6-layer Wan transformer built from its config with seeded random weights, and random prompt embeddings."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=512,
        num_layers=6,
        rope_max_seq_len=256,
    )
    random_init_(transformer, seed=0)  # random weights that change smoothly across steps, as trained ones do
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    embeds = torch.randn(1, 16, 64)
    return pipe, {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": torch.zeros_like(embeds),
        "output_type": "latent",
        "height": 128,
        "width": 128,
        "num_frames": 9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local path of a Wan pipeline (default: offline random weights)")
    parser.add_argument("--prompt", default="a red fox running through snow")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--policy", choices=["bwcache", "static"], default="bwcache")
    parser.add_argument("--threshold", type=float, default=0.1, help="BWCache relative-change threshold")
    parser.add_argument("--interval", type=int, default=2, help="static schedule: compute every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heatmap", default="block_cache_heatmap.png")
    args = parser.parse_args()

    if args.model:
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
        call = {"prompt": args.prompt, "output_type": "latent"}
    else:
        pipe, call = offline_pipeline()
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    call["num_inference_steps"] = args.steps

    def generate():
        generator = torch.Generator(args.device).manual_seed(0)
        start = time.perf_counter()
        frames = pipe(**call, generator=generator).frames
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return frames, time.perf_counter() - start

    generate()  # warm-up
    reference, dense_s = generate()
    if args.policy == "bwcache":
        config = diffusers_block.BWCacheConfig(threshold=args.threshold)
    else:
        config = diffusers_block.StaticScheduleConfig(interval=args.interval, warmup_steps=3, cooldown_steps=2)
    pipe.enable_block_cache(config)
    cached, cached_s = generate()
    summary = pipe.block_cache_summary()
    pipe.disable_block_cache()

    error = float((cached.float() - reference.float()).norm() / reference.float().norm())
    print(f"uncached {dense_s:.2f} s | cached {cached_s:.2f} s | speed-up {dense_s / cached_s:.2f}x")
    print(summary)
    print(f"relative L2 of the output against the uncached one: {error:.4f}")
    print(f"heatmap: {summary.plot(args.heatmap)}")


if __name__ == "__main__":
    main()
