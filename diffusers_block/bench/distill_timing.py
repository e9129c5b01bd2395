"""``bench distill --architecture``: wall-clock of student schedules on a real-size architecture (random weights).

The teacher at 50 steps with CFG and dense attention against students that keep 4/5 of its blocks and fold CFG in,
at 8 and 4 steps: alone, with the feature residual approximation (a quarter of the kept blocks as trunk), and with
sparse attention and a static block cache on top. Runs are timed round-robin after a warm-up. Timing only: with
random weights there is no quality to measure; the shipped digits students are where quality is measured.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .. import StaticScheduleConfig, disable_block_cache, enable_block_cache
from ..attention import SparseAttentionConfig, disable_sparse_attention, enable_sparse_attention
from ..distill import BlockwiseFlowModel, SegmentSchedule
from ..distill.apply import serving_students
from ..distill.model import block_names
from ..distill.schedule import split_steps, uniform_sigmas
from ..state import cache_context
from . import attention, report
from .architectures import ARCHITECTURES, build, conditioning, noise, num_tokens
from .cache import round_robin_seconds, sample

STUDENT_SCHEDULES = {"8 steps": (2, 4), "4 steps": (2, 2)}  # name -> (segments, steps per segment)
RESIDUAL_TRUNK_FRACTION = 0.25  # feature residual approximation rows: this share of the kept blocks is the trunk


def sample_students(students, schedule: SegmentSchedule, latents: torch.Tensor, prompt: dict) -> torch.Tensor:
    """Euler over the student's grid, each step on its segment's student, one forward a step (CFG folded in)."""
    dtype = students[0].dtype
    first = [sum(schedule.steps_per_segment[:k]) for k in range(schedule.num_segments)]
    for i, (sigma, sigma_next) in enumerate(zip(schedule.sigmas[:-1], schedule.sigmas[1:])):
        k = schedule.segment_of_step[i]
        timestep = torch.full((len(latents),), sigma * 1000, device=latents.device)
        local, steps = i - first[k], schedule.steps_per_segment[k]
        with cache_context(students[k], "cond", step_index=local, num_inference_steps=steps):
            v = students[k](hidden_states=latents.to(dtype), timestep=timestep, **prompt, return_dict=False)[0]
        latents = latents + (sigma_next - sigma) * v.float()
    return latents


def _sparse_config(tokens: int, cpu: bool) -> SparseAttentionConfig:
    """bench attention's e2e settings (its defaults), first step of each student dense."""
    defaults = argparse.ArgumentParser()
    attention.add_arguments(defaults)
    options = attention._model_sparse_options(defaults.parse_args([]), tokens, cpu)
    return SparseAttentionConfig(**options, dense_steps=1)


def timing(args) -> dict:
    device = torch.device(args.device)
    cpu = device.type != "cuda"
    arch = ARCHITECTURES[args.architecture]
    dtype = torch.float32 if cpu else torch.bfloat16
    teacher = build(arch, device, dtype)
    latents = noise(arch, device, 0)
    prompts = {"cond": conditioning(arch, device, dtype, 1), "uncond": conditioning(arch, device, dtype, 2)}
    names = block_names(teacher)
    keep = args.keep or max(1, round(0.8 * len(names)))
    trunk = max(1, round(RESIDUAL_TRUNK_FRACTION * keep))
    sparse = _sparse_config(num_tokens(arch), cpu)
    cache = StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=1)
    attention_backend = attention._cudnn if not cpu else nullcontext

    runs = {}
    with torch.inference_mode(), attention_backend():
        scheduler = FlowMatchEulerDiscreteScheduler(shift=arch.shift)
        runs["teacher-50-cfg-dense"] = lambda steps=args.reference_steps: sample(
            teacher, arch, scheduler, latents, prompts, steps
        )
        for label, (segments, per_segment) in STUDENT_SCHEDULES.items():
            schedule = SegmentSchedule(
                uniform_sigmas(segments * per_segment), split_steps(segments * per_segment, segments)
            )
            flow = BlockwiseFlowModel.for_teacher(teacher, schedule, [names[:keep]] * segments)
            # with a trunk: untrained residual networks, the same work as trained ones
            with_trunk = flow.with_residual_trunk(teacher, trunk)
            for suffix, model in (("", flow), (f"+residual-trunk{trunk}", with_trunk)):
                students = serving_students(model, teacher)
                name = f"students-{label}-{keep}of{len(names)}-blocks{suffix}"
                runs[name] = _student_run(students, schedule, latents, prompts)
                runs[f"{name}+sparse+cache"] = _student_run(students, schedule, latents, prompts, sparse, cache)
        runs["teacher-50-cfg-dense"](2)  # warm-up: kernel selection, autotuning, allocator
        for name, run in runs.items():
            if name.startswith("students"):
                run()
        times = round_robin_seconds(runs, args.repeats, device)
    reference = statistics.median(times["teacher-50-cfg-dense"])
    rows = [
        {"name": name, "seconds": statistics.median(t), "speedup": reference / statistics.median(t), "times_s": t}
        for name, t in times.items()
    ]
    report.print_table(
        rows,
        [("name", "run", str), ("seconds", "s", lambda v: f"{v:.3f}"), ("speedup", "speed-up", lambda v: f"{v:.1f}x")],
    )
    payload = {
        "benchmark": "distill-timing",
        "environment": report.environment(device),
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "architecture": args.architecture,
        "tokens": num_tokens(arch),
        "sparse_attention": str(sparse),
        "block_cache": str(cache),
        "residual_trunk": trunk,
        "note": "random weights: wall-clock only; students keep the first blocks (timing does not depend on which)",
        "results": rows,
    }
    name = args.name or f"distill-timing-{args.architecture}"
    path = report.write_json(report.result_path(args.out, name, device), payload)
    print(f"wrote {path}")
    return payload


def _student_run(students, schedule, latents, prompts, sparse=None, cache=None):
    """A callable running the student schedule, with sparse attention and the block cache on every student."""

    def run():
        if sparse is not None:
            for student in students:
                enable_sparse_attention(student, sparse)
                enable_block_cache(student, cache)
        try:
            return sample_students(students, schedule, latents, prompts["cond"])
        finally:
            if sparse is not None:
                for student in students:
                    disable_block_cache(student)
                    disable_sparse_attention(student)

    return run
