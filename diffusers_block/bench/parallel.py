"""Dense, cached, sparse and sparse + cached sampling under diffusers' context parallelism (Ulysses), per GPU count.

Launch one run per GPU count with torchrun; each rank builds the same random-weight Wan2.1-1.3B transformer, and for
more than one process diffusers shards its sequence with ``enable_parallelism(ContextParallelConfig(ulysses_degree=
N))``. Four runs per size, from the same noise and prompt, timed round-robin:

  dense          no hooks;
  cached         block caching (default: the library's default BWCache, whose decision all ranks share);
  sparse         adaptive block-sparse self-attention on each rank's heads;
  sparse+cached  both.

Rank 0 writes the JSON: ms/step medians, speedup over dense at the same GPU count, and, given the 1-process JSON
(``--baseline``), scaling efficiency t1 / (N tN) of each run and of the accelerated runs relative to dense's::

    torchrun --nproc-per-node 1 -m diffusers_block.bench parallel --sizes 480p,720p
    torchrun --nproc-per-node 4 -m diffusers_block.bench parallel --sizes 480p,720p --baseline <1-GPU json>

``--sizes tiny`` runs a toy Wan on CPU with gloo (the plumbing test).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import time
from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .. import (
    SparseAttentionConfig,
    StaticScheduleConfig,
    block_cache_summary,
    disable_block_cache,
    disable_sparse_attention,
    enable_block_cache,
    enable_sparse_attention,
    sparse_attention_summary,
)
from ..cache.apply import default_cache_config
from ..parallel import context_parallel, cpu_context_parallel
from . import report
from .architectures import ARCHITECTURES, build, conditioning, noise, num_parameters, num_tokens
from .cache import sample

#: Wan2.1-1.3B at 81 frames: latents (16, 21, H/8, W/8), 2x2 patches -> 32,760 tokens at 480p, 75,600 at 720p.
SIZES = {
    "480p": ("wan2.1-1.3b", (16, 21, 60, 104)),
    "720p": ("wan2.1-1.3b", (16, 21, 90, 160)),
    "tiny": ("tiny-wan", (4, 4, 16, 16)),  # 256 tokens: CPU, gloo
}
RUNS = ("dense", "cached", "sparse", "sparse+cached")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sizes(text: str) -> list[str]:
    sizes = [s for s in text.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise argparse.ArgumentTypeError(f"unknown size(s) {unknown}: choose from {', '.join(SIZES)}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_sizes, default=["480p", "720p"], help=f"comma-separated: {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per schedule (Wan: 50)")
    parser.add_argument("--repeats", type=int, default=2, help="timed schedules per run (median)")
    parser.add_argument("--warmup-steps", type=int, default=7, help="steps of the untimed warm-up schedule per run")
    parser.add_argument("--cache", choices=["bwcache", "static"], default="bwcache", help="block cache policy")
    parser.add_argument("--cache-interval", type=int, default=2, help="--cache static: compute every n-th step")
    parser.add_argument("--threshold", type=float, default=0.9, help="sparse: cumulative mass threshold")
    parser.add_argument("--density", type=float, default=0.125, help="sparse: max kept fraction of key blocks")
    parser.add_argument("--dense-steps", type=int, default=5, help="sparse: dense steps at the start")
    parser.add_argument("--refresh", type=int, default=5, help="sparse: select masks every n steps")
    parser.add_argument("--baseline", help="1-process JSON of this benchmark: adds scaling efficiency")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", default="parallel", help="result file stem (the GPU count is appended)")


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; joins the process group if there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return rank, world, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank starts and ends a schedule together: the slowest one sets the time


def _configs(args, tokens: int, cpu: bool):
    block_size = 16 if cpu else 128
    sparse = SparseAttentionConfig(
        threshold=args.threshold,
        block_size=block_size,
        max_blocks=max(1, round(args.density * math.ceil(tokens / block_size))),
        min_tokens=0,
        dense_steps=args.dense_steps,
        refresh_interval=args.refresh,
    )
    if args.cache == "static":
        cache = StaticScheduleConfig(interval=args.cache_interval, warmup_steps=args.dense_steps, cooldown_steps=1)
    else:
        cache = default_cache_config()
    return sparse, cache


def run_size(size: str, args, world: int, device: torch.device, dtype: torch.dtype) -> dict:
    name, latent_shape = SIZES[size]
    arch = dataclasses.replace(ARCHITECTURES[name], latent_shape=latent_shape)
    tokens = num_tokens(arch)
    heads = arch.config["num_attention_heads"]
    if world > 1 and (tokens % world or heads % world):
        raise SystemExit(f"{size}: {tokens} tokens and {heads} heads must both divide by {world} processes (Ulysses)")
    model = build(arch, device, dtype, args.seed)
    if world > 1:
        from diffusers import ContextParallelConfig

        with cpu_context_parallel():
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    sparse, cache = _configs(args, tokens, device.type == "cpu")
    latents = noise(arch, device, args.seed)
    prompts = {"cond": conditioning(arch, device, dtype, args.seed + 1)}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
    summaries: dict = {}

    @contextmanager
    def features(run: str):
        if "sparse" in run:
            enable_sparse_attention(model, sparse)
        if "cached" in run:
            enable_block_cache(model, cache)
        try:
            yield
        finally:
            if "cached" in run:
                summaries.setdefault(run, {})["fraction_computed"] = block_cache_summary(model).fraction_computed
                disable_block_cache(model)
            if "sparse" in run:
                summaries.setdefault(run, {})["sparse_density"] = sparse_attention_summary(model).sparse_density
                disable_sparse_attention(model)

    layout = context_parallel(model)
    print(
        f"\n{size}: {arch.cls.__name__} {num_parameters(model):,} parameters, {tokens} tokens, {args.steps} steps, "
        f"{world} process(es){f' (Ulysses {layout.ulysses_degree})' if layout else ''}, {report.device_name(device)}"
    )
    times = {run: [] for run in RUNS}
    final = {}
    with torch.inference_mode():
        for run in RUNS if args.warmup_steps else ():  # warm-up: kernels, autotuning, allocator, communicators
            with features(run):
                sample(model, arch, scheduler, latents, prompts, min(args.steps, args.warmup_steps))
        for repeat in range(args.repeats):
            for run in RUNS:
                with features(run):
                    _sync(device)
                    start = time.perf_counter()
                    final[run] = sample(model, arch, scheduler, latents, prompts, args.steps)
                    _sync(device)
                    times[run].append((time.perf_counter() - start) * 1e3)
                gc.collect()
            print(
                f"  round {repeat + 1}/{args.repeats} (ms): " + ", ".join(f"{r} {t[-1]:.0f}" for r, t in times.items())
            )
    reference = final["dense"].double()
    dense_ms = statistics.median(times["dense"])
    runs = {}
    for run in RUNS:
        ms = statistics.median(times[run])
        runs[run] = {
            "ms_per_step": ms / args.steps,
            "times_ms": times[run],
            "speedup_vs_dense": dense_ms / ms,
            "rel_l2_vs_dense": float((final[run].double() - reference).norm() / reference.norm()),
            **summaries.get(run, {}),
        }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "architecture": name,
        "latent_shape": latent_shape,
        "tokens": tokens,
        "steps": args.steps,
        "dtype": str(dtype),
        "sparse_config": dataclasses.asdict(sparse),
        "cache_config": {"type": type(cache).__name__, **dataclasses.asdict(cache)},
        "runs": runs,
    }


def add_scaling(payload: dict, baseline: dict) -> None:
    """Per size and run: efficiency = t1 / (N tN) against the baseline's 1-process time; and each accelerated run's
    efficiency relative to dense's (1.0: it scales as well as dense does)."""
    if baseline.get("processes") != 1:
        raise SystemExit(f"--baseline must be a 1-process run of this benchmark (it has {baseline.get('processes')})")
    n = payload["processes"]
    for size, result in payload["sizes"].items():
        base = baseline["sizes"].get(size)
        if base is None:
            continue
        for run, row in result["runs"].items():
            row["scaling_efficiency"] = base["runs"][run]["ms_per_step"] / (n * row["ms_per_step"])
        dense = result["runs"]["dense"]["scaling_efficiency"]
        for row in result["runs"].values():
            row["scaling_vs_dense"] = row["scaling_efficiency"] / dense


def run(args) -> dict:
    rank, world, device = _init_distributed()
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    baseline = json.loads(open(args.baseline).read()) if args.baseline else None
    payload = {
        "benchmark": "parallel",
        "command": "torchrun --nproc-per-node " + f"{world} -m diffusers_block.bench " + " ".join(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "environment": report.environment(device, args.allow_dirty),
        "processes": world,
        "parallelism": f"ContextParallelConfig(ulysses_degree={world})" if world > 1 else None,
        "sizes": {},
    }
    unit = "gpu" if device.type == "cuda" else "proc"
    path = report.result_path(args.out, f"{args.name}-{world}{unit}", device)
    for size in args.sizes:
        payload["sizes"][size] = run_size(size, args, world, device, dtype)
        if baseline is not None:
            add_scaling(payload, baseline)
        if rank == 0:
            report.print_table(
                [{"run": r, **row} for r, row in payload["sizes"][size]["runs"].items()],
                [
                    ("run", "run", str),
                    ("ms_per_step", "ms/step", "{:.1f}".format),
                    ("speedup_vs_dense", "vs dense", "{:.2f}x".format),
                    ("scaling_efficiency", "scaling eff.", "{:.1%}".format),
                    ("scaling_vs_dense", "eff. / dense eff.", "{:.2f}".format),
                    ("fraction_computed", "blocks computed", "{:.1%}".format),
                    ("sparse_density", "density", "{:.1%}".format),
                    ("rel_l2_vs_dense", "rel L2", "{:.3f}".format),
                ],
            )
            report.write_json(path, payload)  # after each size, so a later failure keeps the earlier results
    if rank == 0:
        print(f"\nwrote {path}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return payload
