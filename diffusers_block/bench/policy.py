"""Diffusion policy on Meta-World: success rate, denoiser FLOPs and chunk latency, uncached against each cache.

On the shipped multi-task policy (``models/policy-metaworld``), with the same evaluation episodes and noise seed
for every run:

  uncached     100-step DDPM (Diffusion Policy's default), the reference;
  bac          BAC as calibrated by default (``pipelines/policy/calibrate.py`` says why): each sub-block updates on
               its own steps (--updates per sub-block, Adaptive Caching Scheduler, the last 3 steps always) plus
               Bubbling Union; the objective and union size are the validated choice among --bac-candidates;
  uniform      every sub-block updates on the same --updates evenly spaced steps;
  bwcache      BWCache's runtime indicator per sub-block (threshold 0.1);
  skip-steps   the whole denoiser runs on --updates evenly spaced steps, the others reuse its last prediction;
  ddim         DDIM with --updates steps (fewer steps instead of caching; same weights);
  bac-paper    (not run by default) BAC as the paper: cosine similarity, no kept steps, Bubbling Union on
               --bubbling-union sub-blocks;
  bac-taylor1  (not run by default) the BAC schedule, reused outputs extrapolated from their last two updates;
  bac-no-union (not run by default) BAC's per-sub-block steps without Bubbling Union.

--bac-variants OBJECTIVE:KEEP_LAST:UNION ... adds runs of other calibrations (from the same recording), and
--schedules adds runs of saved schedules. --validate reports, for every static schedule, the relative error of its
executed actions against the uncached policy's on held-out observation histories from the same noise (what
``select_schedule`` ranks by). Choose among variants on other episodes (--seed) than the ones you report.

Success is over --episodes episodes of each task (Meta-World MT1 seed 1000, goal variations 0..episodes-1,
episodes end at the first success or after --max-steps steps). FLOPs are counted per environment (see
``pipelines/policy/flops.py``) over every chunk of the rollout. Latency is one 100-step chunk for one
environment: eager uncached, eager BAC, and, on a GPU, the chunk captured as one CUDA graph uncached and with BAC
(and the uniform schedule, and DDIM with 10 steps); --cpu-latency adds the eager runs on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..cache.bac import schedule_from_features
from ..cache.static import StaticScheduleConfig
from ..pipelines.policy.calibrate import (
    DEFAULT_CANDIDATES,
    VALIDATION_SEED,
    calibration_observations,
    candidate_name,
    default_bac_schedule,
    record_policy_features,
    select_policy_schedule,
)
from ..pipelines.policy.envs import EnvPool
from ..pipelines.policy.flops import DenoiserFlops, computed_per_unit
from ..pipelines.policy.rollout import (
    EVAL_SEED,
    POLICY,
    cache_config,
    evenly_spaced,
    load_policy,
    run_episodes,
)
from ..zoo.locate import model_path
from . import report

RUNS = ("uncached", "bac", "uniform", "bwcache", "skip-steps", "ddim", "bac-paper", "bac-taylor1", "bac-no-union")
STEPS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", help="policy folder (default: the shipped one)")
    parser.add_argument("--tasks", nargs="+", help="default: every task of the policy")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=200, help="environment steps before an episode fails")
    parser.add_argument("--updates", type=int, default=10, help="updates per sub-block / denoiser calls / DDIM steps")
    parser.add_argument("--bubbling-union", type=int, default=5, help="BAC's top-n variable sub-blocks")
    parser.add_argument(
        "--bac-candidates",
        nargs="+",
        default=[":".join(map(str, c)) for c in DEFAULT_CANDIDATES],
        metavar="OBJ:KEEP_LAST:UNION",
        help="the calibrations the bac run's validated choice picks from (default: the policy default)",
    )
    parser.add_argument(
        "--bac-variants", nargs="+", default=[], metavar="OBJ:KEEP_LAST:UNION", help="extra BAC calibrations to run"
    )
    parser.add_argument("--validate", action="store_true", help="action error of each schedule on held-out histories")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS[:6]))
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=[],
        metavar="JSON",
        help="extra runs: saved StaticScheduleConfig files (e.g. other calibrations), each run named by its file stem",
    )
    parser.add_argument(
        "--seed", type=int, default=EVAL_SEED, help="Meta-World MT1 seed of the episodes (choose on others than 1000)"
    )
    parser.add_argument("--no-latency", action="store_true", help="rollouts only")
    parser.add_argument("--no-rollouts", action="store_true", help="latency and FLOPs only")
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--cpu-latency", action="store_true", help="also time eager chunks on the CPU")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(16, os.cpu_count() or 1) - 1,
        help="processes stepping the environments (0: in this process)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", default="policy-metaworld", help="result file stem")


class _Actor:
    """The rollout's ``act``: one pipeline call per chunk, adding up the denoiser FLOPs of what ran."""

    def __init__(self, pipe, flops: DenoiserFlops, steps: int, denoiser_steps, cached: bool) -> None:
        self.pipe, self.flops, self.steps, self.denoiser_steps, self.cached = pipe, flops, steps, denoiser_steps, cached
        self.chunk_flops: list[int] = []
        self.fractions: list[float] = []

    def __call__(self, history: np.ndarray, tasks) -> np.ndarray:
        out = self.pipe(history, task=list(tasks), num_inference_steps=self.steps, denoiser_steps=self.denoiser_steps)
        if self.cached:
            summary = self.pipe.block_cache_summary()
            self.fractions.append(summary.fraction_computed)
            self.chunk_flops.append(self.flops.chunk(self.steps, unit_computed=computed_per_unit(summary)))
        else:
            calls = self.steps if self.denoiser_steps is None else len(self.denoiser_steps)
            self.chunk_flops.append(self.flops.chunk(self.steps, calls))
        return out.actions


def configure(pipe, run: str, schedules: dict, updates: int, scheduler_config):
    """Set ``pipe`` up for one run; returns (steps, denoiser_steps, cache config or None). ``schedules``: the
    static schedules by run name (bac, bac-paper, variants, saved schedules)."""
    pipe.disable_block_cache()
    pipe.scheduler = type(pipe.scheduler).from_config(scheduler_config)  # a fresh DDPM scheduler
    if run in schedules:
        pipe.enable_block_cache(schedules[run])
        return STEPS, None, schedules[run]
    if run == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(scheduler_config)
        return updates, None, None
    if run == "uncached":
        return STEPS, None, None
    if run == "skip-steps":
        return STEPS, evenly_spaced(STEPS, updates), None
    config = cache_config(run, pipe, STEPS, updates, None)
    pipe.enable_block_cache(config)
    return STEPS, None, config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_chunks(call, repeats: int, device: torch.device, warmup: int = 3) -> dict:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ms_p50": statistics.median(times),
        "ms_min": min(times),
        "ms_p99": float(np.percentile(times, 99)),
        "repeats": repeats,
    }


def measure_latency(pipe, bac, uniform, obs, task: str, repeats: int, graphs: bool, variants=None) -> dict:
    """One 100-step chunk for one environment, eager and (on a GPU) as one CUDA graph (also for each of
    ``variants``, name -> static schedule)."""
    device = pipe._execution_device
    results = {}

    def eager():
        return pipe(obs, task=task, num_inference_steps=STEPS, output_type="np")

    for name, config in (("eager-uncached", None), ("eager-bac", bac)):
        pipe.disable_block_cache()
        if config is not None:
            pipe.enable_block_cache(config)
        results[name] = time_chunks(eager, max(3, repeats // 3) if device.type == "cpu" else repeats, device)
        print(f"  {name}: {results[name]['ms_p50']:.2f} ms")
    if graphs:
        from ..pipelines.policy.graph import CUDAGraphPolicy

        ddpm = pipe.scheduler.config
        runs = (
            ("graph-uncached", None, STEPS),
            ("graph-bac", bac, STEPS),
            ("graph-uniform", uniform, STEPS),
            ("graph-ddim10", None, 10),
            *((f"graph-{name}", config, STEPS) for name, config in (variants or {}).items()),
        )
        for name, config, steps in runs:
            pipe.disable_block_cache()
            pipe.scheduler = (DDPMScheduler if steps == STEPS else DDIMScheduler).from_config(ddpm)
            if config is not None:
                pipe.enable_block_cache(config)
            try:
                runner = CUDAGraphPolicy(pipe, 1, steps)
                results[name] = time_chunks(lambda r=runner: r(obs, task), 5 * repeats, device)
                results[name]["steps"] = steps
                print(f"  {name}: {results[name]['ms_p50']:.2f} ms")
                del runner
            except Exception as error:  # a failed capture is a result too
                results[name] = {"error": f"{type(error).__name__}: {error}"}
                print(f"  {name}: failed: {results[name]['error']}")
        pipe.scheduler = DDPMScheduler.from_config(ddpm)
    pipe.disable_block_cache()
    return results


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    policy_path = str(model_path(POLICY, args.policy))
    pipe = load_policy(policy_path, args.device)
    scheduler_config = pipe.scheduler.config
    tasks = args.tasks or pipe.task_names
    path = report.result_path(args.out, args.name, device)
    payload = {
        "benchmark": "policy",
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "environment": report.environment(device, args.allow_dirty),
        "policy": {
            "path": policy_path,
            "config": dict(pipe.transformer.config),
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        },
    }
    print(
        f"policy {policy_path}: {payload['policy']['parameters']:,} parameters, tasks {tasks}, on "
        f"{report.device_name(device)}"
    )

    start = time.perf_counter()
    calib_obs, calib_tasks = calibration_observations(pipe, tasks, workers=min(args.workers, 2 * len(tasks)))
    features = record_policy_features(pipe, calib_obs, calib_tasks, STEPS)

    def bac_schedule(objective: str, keep_last: int, union: int) -> StaticScheduleConfig:
        return schedule_from_features(
            features,
            args.updates,
            granularity="sub_block",
            objective=objective,
            keep_last=keep_last,
            bubbling_union_top=union,
        )

    def parse(spec: str) -> tuple[str, int, int]:
        try:
            objective, keep_last, union = spec.split(":")
            return objective, int(keep_last), int(union)
        except ValueError as error:
            raise ValueError(
                f"a BAC calibration is OBJECTIVE:KEEP_LAST:UNION (e.g. error:3:12), got {spec!r}"
            ) from error

    candidates = [parse(spec) for spec in args.bac_candidates]
    bac, choice = default_bac_schedule(
        pipe, tasks, args.updates, STEPS, candidates, min(args.workers, 2 * len(tasks)), (calib_obs, calib_tasks)
    )
    objective, keep_last, _ = candidates[[candidate_name(*c) for c in candidates].index(choice["chosen"])]
    print(f"BAC default: {choice['chosen']} (validated choice; action errors {choice['errors']})")
    schedules = {
        "bac": bac,
        "bac-paper": bac_schedule("cosine", 0, args.bubbling_union),
        "bac-taylor1": replace(bac, forecast="taylor1"),
        "bac-no-union": bac_schedule(objective, keep_last, 0),
    }
    variants = []
    for spec in args.bac_variants:
        name = "bac-" + candidate_name(*parse(spec))
        schedules[name] = bac_schedule(*parse(spec))
        variants.append(name)
    for path in args.schedules:
        schedules[Path(path).stem] = StaticScheduleConfig.load(path)
        variants.append(Path(path).stem)
    uniform = cache_config("uniform", pipe, STEPS, args.updates, None)
    payload["bac_schedule"] = bac.to_dict()
    payload["schedules"] = {name: config.to_dict() for name, config in schedules.items() if name != "bac-taylor1"}
    payload["calibration"] = {"histories": len(calib_obs), "seconds": time.perf_counter() - start, **choice}
    flops = DenoiserFlops(pipe)
    reference_flops = flops.chunk(STEPS)
    payload["flops"] = {
        "per_call": flops.per_call,
        "units": flops.units,
        "outside_units": flops.outside_units,
        "uncached_chunk": reference_flops,
    }
    if args.validate:
        valid_obs, valid_tasks = calibration_observations(
            pipe, tasks, chunks=(1, 4, 8), seed=VALIDATION_SEED, workers=min(args.workers, 2 * len(tasks))
        )
        checked = {n: c for n, c in schedules.items() if n != "bac-taylor1"} | {"uniform": uniform}
        best, errors = select_policy_schedule(pipe, checked, valid_obs, valid_tasks, STEPS)
        payload["validation"] = {"histories": len(valid_obs), "seed": VALIDATION_SEED, "best": best, "errors": errors}
        print(
            "action error against uncached on held-out histories: "
            + ", ".join(f"{n} {e:.3f}" for n, e in errors.items())
        )

    obs, task = calib_obs[:1], calib_tasks[0]
    latency = {}
    if not args.no_latency:
        print("latency of one 100-step chunk, batch 1:")
        latency[report.device_name(device)] = measure_latency(
            pipe,
            bac,
            uniform,
            obs,
            task,
            args.latency_repeats,
            graphs=device.type == "cuda",
            variants={name: schedules[name] for name in ["bac-paper", *variants]},
        )
    payload["latency_batch1"] = latency
    report.write_json(path, payload)

    rows = []
    if not args.no_rollouts:
        env_tasks = [task for task in tasks for _ in range(args.episodes)]
        variations = [episode for _ in tasks for episode in range(args.episodes)]
        n_obs = pipe.transformer.config.n_obs_steps
        with EnvPool(env_tasks, args.seed, args.workers) as pool:
            for name in [*args.runs, *variants]:
                steps, denoiser_steps, config = configure(pipe, name, schedules, args.updates, scheduler_config)
                actor = _Actor(pipe, flops, steps, denoiser_steps, cached=config is not None)
                torch.manual_seed(0)  # the same DDPM noise stream for every run
                with torch.no_grad():
                    result = run_episodes(actor, pool, variations, n_obs, args.max_steps)
                row = {"run": name, **result.summary(pipe.transformer.config.n_action_steps)}
                row["denoiser_flops_per_chunk"] = float(np.mean(actor.chunk_flops))
                row["flops_reduction"] = reference_flops / row["denoiser_flops_per_chunk"]
                row["fraction_computed"] = float(np.mean(actor.fractions)) if actor.fractions else None
                row["batch"] = len(env_tasks)
                rows.append(row)
                print(
                    f"  {name}: success {row['success_rate']:.1%} "
                    + " ".join(f"{t}={s:.0%}" for t, s in row["success_per_task"].items())
                    + f", {row['flops_reduction']:.2f}x fewer FLOPs, chunk p50 {row['latency_ms_p50']:.0f} ms"
                )
                payload["runs"] = rows
                report.write_json(path, payload)
        pipe.disable_block_cache()
        pipe.scheduler = type(pipe.scheduler).from_config(scheduler_config)
        base = next((r for r in rows if r["run"] == "uncached"), None)
        for row in rows:
            row["success_delta_points"] = None if base is None else 100 * (row["success_rate"] - base["success_rate"])

    if args.cpu_latency and device.type != "cpu":
        pipe.to("cpu")
        print(f" on the CPU ({torch.get_num_threads()} threads):")
        latency[report.device_name(torch.device("cpu"))] = measure_latency(
            pipe, bac, uniform, obs, task, args.latency_repeats, graphs=False
        )
    payload["latency_batch1"] = latency
    report.write_json(path, payload)

    if rows:
        report.print_table(
            rows,
            [
                ("run", "run", str),
                ("success_rate", "success", "{:.1%}".format),
                ("success_delta_points", "vs uncached", "{:+.1f} pt".format),
                ("flops_reduction", "FLOPs saved", "{:.2f}x".format),
                ("fraction_computed", "sub-blocks computed", "{:.1%}".format),
                ("latency_ms_p50", f"chunk ms (batch {rows[0]['batch']})", "{:.0f}".format),
            ],
        )
    for where, runs in latency.items():
        print(f"\n{where}: " + ", ".join(f"{name} {r['ms_p50']:.2f} ms" for name, r in runs.items()))
    schedule_path = Path(path).with_suffix(".bac.json")
    bac.save(schedule_path)
    print(f"\nwrote {path} (BAC schedule: {schedule_path})")
    return payload
