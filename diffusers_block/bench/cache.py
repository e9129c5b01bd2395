"""Block caching on a full sampling schedule: wall-clock speedup, overhead, work saved and drift.

On one random-weight, real-size transformer (see architectures.py), from the same noise and prompt, it times
full flow-matching schedules for each run:

  dense        no hooks: the reference for time and for the final latents;
  static-all   StaticScheduleConfig(interval=1): hooks on, every block computed -> the cost of the hooks alone;
  bwcache-0    BWCacheConfig(threshold=0): every block computed and measured -> the cost of the indicator;
  static-40    a fixed warm-up / interval / cool-down schedule computing ~40% of block evaluations;
  bwcache-T    BWCacheConfig(threshold=T) for each of --thresholds.

One more schedule, with the block lists emptied, times what no cache can remove (embeddings, output head,
scheduler, Python), so the "ideal" speedup of a policy is Amdahl's 1 / (1 - share * (1 - fraction computed)),
where share is the dense time spent in blocks. The gap between ideal and measured is the cost of caching.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .. import (
    BWCacheConfig,
    CacheConfig,
    StaticScheduleConfig,
    block_cache_summary,
    disable_block_cache,
    enable_block_cache,
)
from ..models import resolve_adapter
from . import report
from .architectures import ARCHITECTURES, Architecture, build, conditioning, noise, num_parameters, num_tokens

POLICIES = ("static-all", "bwcache-0", "static-40", "bwcache")
CFG_SCALE = 5.0  # WanPipeline's default guidance_scale
OUTSIDE = "blocks-off"  # the extra run that times everything but the blocks
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        nargs="+",
        required=True,
        choices=list(ARCHITECTURES),
        help="one or more architectures, benchmarked one after the other",
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's, 50 Wan / 28 Flux)")
    parser.add_argument(
        "--policies",
        nargs="*",
        choices=POLICIES,
        default=list(POLICIES),
        help="cache runs besides dense (default: all)",
    )
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.1], help="BWCache thresholds")
    parser.add_argument("--cfg", action="store_true", help="classifier-free guidance: cond + uncond call per step")
    parser.add_argument("--repeats", type=int, default=3, help="timed schedules per run (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed dense schedules first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", help="result file stem (default: cache-<model>)")


def static_schedule(steps: int, target: float = 0.4) -> StaticScheduleConfig:
    """Warm-up and cool-down steps computed in full (~10% / ~4% of the schedule, at least one each), and the
    interval in between that brings the computed fraction closest to ``target``."""
    warmup, cooldown = max(1, steps // 10), max(1, steps // 25)
    middle = max(steps - warmup - cooldown, 0)
    fraction = lambda k: (steps - middle + math.ceil(middle / k)) / steps  # noqa: E731
    interval = min(range(1, steps + 1), key=lambda k: abs(fraction(k) - target))
    return StaticScheduleConfig(interval=interval, warmup_steps=warmup, cooldown_steps=cooldown)


def policy_configs(policies, thresholds, steps: int) -> dict[str, CacheConfig]:
    configs = {}
    if "static-all" in policies:
        configs["static-all"] = StaticScheduleConfig(interval=1)
    if "bwcache-0" in policies:
        configs["bwcache-0"] = BWCacheConfig(threshold=0.0)
    if "static-40" in policies:
        configs["static-40"] = static_schedule(steps)
    if "bwcache" in policies:
        configs.update({f"bwcache-{t:g}": BWCacheConfig(threshold=t) for t in thresholds})
    return configs


def describe(config: CacheConfig | None) -> dict | None:
    return config and {"type": type(config).__name__, **{f.name: getattr(config, f.name) for f in fields(config)}}


def sample(model, arch: Architecture, scheduler, latents, prompts: dict, steps: int) -> torch.Tensor:
    """The denoising loop of WanPipeline / FluxPipeline on a bare transformer; returns the final latents.

    The cache context tells the block cache the step and branch, as the pipelines do. Latents stay fp32 between
    steps so the final ones compare runs without bf16 rounding of the scheduler update."""
    dtype = model.dtype
    scheduler.set_timesteps(steps, device=latents.device)
    for i, t in enumerate(scheduler.timesteps):
        timestep = (t * arch.timestep_scale).expand(len(latents))
        preds = []
        for branch, prompt in prompts.items():
            with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                preds.append(model(hidden_states=latents.to(dtype), timestep=timestep, **prompt, return_dict=False)[0])
        pred = preds[0] if len(preds) == 1 else preds[1] + CFG_SCALE * (preds[0] - preds[1])
        latents = scheduler.step(pred.float(), t, latents, return_dict=False)[0]
    return latents


@contextmanager
def block_cache(model: torch.nn.Module, config: CacheConfig):
    enable_block_cache(model, config)
    try:
        yield True
    finally:
        disable_block_cache(model)


@contextmanager
def without_blocks(model: torch.nn.Module):
    """Empty the model's block lists for a while: a forward then runs only what surrounds the blocks."""
    saved = {ref.spec.attr: getattr(model, ref.spec.attr) for ref in resolve_adapter(model).blocks}
    try:
        for attr in saved:
            setattr(model, attr, torch.nn.ModuleList())
        yield
    finally:
        for attr, blocks in saved.items():
            setattr(model, attr, blocks)


def timed(generate, device: torch.device) -> tuple[float, torch.Tensor, float | None]:
    """One schedule: (milliseconds, final latents, peak GiB allocated on a GPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    latents = generate()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    return ms, latents, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def round_robin_seconds(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    contexts: dict[str, Callable[[], AbstractContextManager]] | None = None,
) -> dict[str, list]:
    """Seconds of ``repeats`` calls of each run, taken in turns rather than run after run, so that the machine's
    drift (GPU clocks, other load) does not favour whichever run came first. A run's context (``contexts[name]()``,
    e.g. a student served) is entered and left around each call, outside the timed part."""
    contexts = contexts or {}
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            with contexts.get(name, nullcontext)():
                seconds[name].append(timed(run, device)[0] / 1e3)
    return seconds


def measure(model, generate, contexts: dict[str, Callable], args, device: torch.device) -> dict[str, dict]:
    """Times ``args.repeats`` schedules of each run (a context: cache on, blocks off...) round-robin, not run
    after run: a GPU heats up and clocks down over the first minute, which would favour whichever run came first."""
    runs = {name: {"times_ms": [], "peaks": []} for name in contexts}
    for _ in range(args.warmup):
        generate()  # kernel selection, allocator growth, GPU clocks
    for repeat in range(args.repeats):
        for name, context in contexts.items():
            run = runs[name]
            with context() as cached:
                ms, run["latents"], peak = timed(generate, device)
                run["fraction_computed"] = block_cache_summary(model).fraction_computed if cached else 1.0
            run["times_ms"].append(ms)
            run["peaks"].append(peak)
            gc.collect()  # free what the last run left (cache tensors, autograd-free temporaries) before the next
        times = ", ".join(f"{name} {run['times_ms'][-1]:.0f}" for name, run in runs.items())
        print(f"  round {repeat + 1}/{args.repeats} (ms): {times}")
    for run in runs.values():
        run["ms_per_schedule"] = statistics.median(run["times_ms"])
        peaks = run.pop("peaks")
        run["peak_memory_gib"] = max(peaks) if device.type == "cuda" else None
    return runs


def run_model(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    arch = ARCHITECTURES[name]
    steps = args.steps or arch.steps
    model = build(arch, device, dtype, args.seed)
    branches = ("cond", "uncond") if args.cfg else ("cond",)
    print(
        f"\n{name}: {arch.cls.__name__}, {num_parameters(model):,} parameters, {num_tokens(arch)} latent + "
        f"{arch.text_tokens} text tokens, {steps} steps x {len(branches)} call(s), {str(dtype)[6:]} on "
        f"{report.device_name(device)}"
    )
    latents = noise(arch, device, args.seed)
    prompts = {branch: conditioning(arch, device, dtype, args.seed + 1 + i) for i, branch in enumerate(branches)}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
    generate = lambda: sample(model, arch, scheduler, latents, prompts, steps)  # noqa: E731
    configs = policy_configs(args.policies, args.thresholds, steps)
    contexts = {"dense": nullcontext, OUTSIDE: lambda: without_blocks(model)}
    contexts.update({policy: (lambda c=config: block_cache(model, c)) for policy, config in configs.items()})
    with torch.inference_mode():
        runs = measure(model, generate, contexts, args, device)

    outside = runs.pop(OUTSIDE)
    dense = runs["dense"]
    reference = dense["latents"]
    share = 1 - outside["ms_per_schedule"] / dense["ms_per_schedule"]
    for policy, row in runs.items():
        latents = row.pop("latents")
        row["config"] = describe(configs.get(policy))
        row["ms_per_step"] = row["ms_per_schedule"] / steps
        row["speedup"] = dense["ms_per_schedule"] / row["ms_per_schedule"]
        row["ideal_speedup"] = 1 / (1 - share * (1 - row["fraction_computed"]))
        row["overhead_pct"] = (
            100 * (row["ms_per_schedule"] / dense["ms_per_schedule"] - 1)
            if policy != "dense" and row["fraction_computed"] == 1.0
            else None
        )
        row["rel_l2"] = ((latents - reference).double().norm() / reference.double().norm()).item()

    rows = [{"policy": policy, **row} for policy, row in runs.items()]
    report.print_table(
        rows,
        [
            ("policy", "policy", str),
            ("ms_per_schedule", "ms/schedule", "{:.1f}".format),
            ("ms_per_step", "ms/step", "{:.2f}".format),
            ("speedup", "speedup", "{:.2f}x".format),
            ("fraction_computed", "computed", "{:.1%}".format),
            ("ideal_speedup", "ideal", "{:.2f}x".format),
            ("overhead_pct", "overhead", "{:+.1f}%".format),
            ("rel_l2", "rel L2", "{:.2e}".format),
            ("peak_memory_gib", "peak GiB", "{:.1f}".format),
        ],
    )
    print(
        f"outside blocks: {outside['ms_per_schedule'] / steps:.2f} ms/step, so blocks take {share:.1%} of dense "
        f"time (ideal = 1 / (1 - {share:.3f} * (1 - computed)))"
    )
    return {
        "class": arch.cls.__name__,
        "config": arch.config,
        "latent_shape": arch.latent_shape,
        "text_tokens": arch.text_tokens,
        "latent_tokens": num_tokens(arch),
        "parameters": num_parameters(model),
        "steps": steps,
        "branches": list(branches),
        "dtype": str(dtype),
        "outside_blocks_ms_per_schedule": outside["ms_per_schedule"],
        "block_time_share": share,
        "policies": runs,
    }


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    path = report.result_path(args.out, args.name or "cache-" + "_".join(args.model), device)
    payload = {
        "benchmark": "cache",
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "environment": report.environment(device, args.allow_dirty),
        "models": {},
    }
    for name in args.model:
        payload["models"][name] = run_model(name, args, device, dtype)
        report.write_json(path, payload)  # after each model, so a later failure keeps the earlier results
        gc.collect()  # the model and its caches went out of scope with run_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nwrote {path}")
    return payload
