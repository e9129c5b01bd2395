"""Closed-loop control on Meta-World: a batch of environments driven by the diffusion policy, chunk by chunk.

python -m diffusers_block.pipelines.policy.rollout --task reach-v3 --episodes 20 [--cache bac --schedule S.json]

Every environment keeps its last ``n_obs_steps`` observations (the first one repeated at the start of an episode).
At each chunk the policy gets the histories of all environments in one batch and returns ``n_action_steps``
actions per environment; each environment executes them (stopping at its first success) and the next chunk is
planned from the new observations. It reports the success rate per task, the per-chunk policy latency (p50, p99),
the control frequency the policy alone allows (actions per chunk / latency) and the one the whole loop achieved.

``--real-time HZ`` runs the loop against a wall clock with a fixed control period of 1/HZ s: one action is sent
per tick, and the next chunk is planned when the current one runs out; a chunk whose planning takes longer than
one period misses its deadline: the robot would hold its last command for the ticks it missed (counted; the
simulation waits for the chunk).

``--cache``: none; bac (``--schedule``, a JSON from ``python -m diffusers_block.pipelines.policy.calibrate``, or
without it a default calibration first, on the policy's own rollouts); uniform
(each sub-block updates on evenly spaced steps, as many as ``--updates``); bwcache (runtime indicator); skip-steps
(the denoiser runs on ``--updates`` evenly spaced steps and the others reuse its last prediction).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ... import BWCacheConfig, StaticScheduleConfig
from ...zoo.locate import model_path
from .envs import EnvPool, UnknownTaskError
from .pipeline import DiffusionPolicyPipeline

CACHES = ("none", "bac", "uniform", "bwcache", "skip-steps")
POLICY = "policy-metaworld"  # the shipped policy, found by zoo.locate.model_path
EVAL_SEED = 1000  # Meta-World MT1 seed of evaluation episodes; the demos came from seeds 0 and 1


def evenly_spaced(steps: int, count: int) -> list[int]:
    """``count`` update steps spread over ``steps``, starting at 0 (the uniform schedule)."""
    if not 1 <= count <= steps:
        raise ValueError(f"the number of updates must be in [1, {steps}], got {count}")
    return sorted({int(i * steps / count) for i in range(count)})


def uniform_schedule(pipe: DiffusionPolicyPipeline, steps: int, updates: int) -> StaticScheduleConfig:
    """Every sub-block updates on the same ``updates`` evenly spaced steps (same work as BAC with that budget)."""
    spaced = evenly_spaced(steps, updates)
    names = [
        f"transformer_blocks.{i}.{child}"
        for i in range(len(pipe.transformer.transformer_blocks))
        for child in ("attn1", "attn2", "ff")
    ]
    return StaticScheduleConfig(update_steps={name: spaced for name in names}, granularity="sub_block")


def cache_config(name: str, pipe, steps: int, updates: int, schedule: str | None):
    """The block-cache config of a ``--cache`` choice (None for none and skip-steps, which need no block cache)."""
    if name == "bac":
        if schedule is not None:
            return StaticScheduleConfig.load(schedule)
        from .calibrate import calibrate_policy, calibration_observations  # calibrate imports this module

        obs, tasks = calibration_observations(pipe, pipe.task_names, steps=steps)  # the default calibration
        return calibrate_policy(pipe, obs, tasks, updates, steps=steps)
    if name == "uniform":
        return uniform_schedule(pipe, steps, updates)
    if name == "bwcache":
        return BWCacheConfig(threshold=0.1, granularity="sub_block")
    if name in ("none", "skip-steps"):
        return None
    raise ValueError(f"--cache must be one of {CACHES}, got {name!r}")


def load_policy(path: str | None = None, device: str = "cpu", scheduler: str = "ddpm") -> DiffusionPolicyPipeline:
    """The policy at ``path`` (default: the shipped one) with ``scheduler`` (ddpm, ddim, or as saved)."""
    path = model_path(POLICY, path)
    pipe = DiffusionPolicyPipeline.from_pretrained(path, torch_dtype=torch.float32).to(device)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "saved":
        raise ValueError(f"scheduler must be ddpm, ddim or saved, got {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class RolloutResult:
    tasks: list[str]
    success: list[bool]  # per environment (episode)
    episode_steps: list[int]
    chunk_latency_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    deadline_misses: int | None = None  # real-time mode: chunks planned later than one control period
    missed_ticks: int | None = None  # real-time mode: control ticks on which the robot held its last command
    chunks: int = 0

    def summary(self, n_action_steps: int) -> dict:
        latency = np.asarray(self.chunk_latency_ms) if self.chunk_latency_ms else np.asarray([np.nan])
        per_task = {
            task: float(np.mean([s for t, s in zip(self.tasks, self.success) if t == task]))
            for task in dict.fromkeys(self.tasks)
        }
        steps = int(np.max(self.episode_steps)) if self.episode_steps else 0
        return {
            "episodes": len(self.success),
            "success_rate": float(np.mean(self.success)),
            "success_per_task": per_task,
            "mean_episode_steps": float(np.mean(self.episode_steps)),
            "chunks": self.chunks,
            "latency_ms_p50": float(np.percentile(latency, 50)),
            "latency_ms_p99": float(np.percentile(latency, 99)),
            "policy_hz": float(n_action_steps / np.percentile(latency, 50) * 1e3),
            "loop_hz": steps / self.wall_s if self.wall_s else None,
            "deadline_misses": self.deadline_misses,
            "missed_ticks": self.missed_ticks,
        }


def run_episodes(
    act: Callable[[np.ndarray, list[str]], np.ndarray],
    pool: EnvPool,
    variations: Sequence[int],
    n_obs_steps: int,
    max_steps: int,
    real_time_hz: float | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> RolloutResult:
    """One episode in every environment of ``pool``; ``act(histories (n, n_obs_steps, obs_dim), tasks)`` returns
    action chunks (n, k, action_dim) for all of them (finished environments are planned for too, so the batch keeps
    its shape, but not stepped)."""
    n = len(pool)
    obs = pool.reset(variations)
    history = np.repeat(obs[:, None], n_obs_steps, axis=1)
    active, success = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    steps = np.zeros(n, dtype=np.int64)
    result = RolloutResult(list(pool.tasks), [], [])
    period = None if real_time_hz is None else 1.0 / real_time_hz
    misses = ticks_missed = 0
    start = next_tick = time.perf_counter()
    while active.any() and steps.max() < max_steps:
        t0 = time.perf_counter()
        chunk = act(history, pool.tasks)
        latency = time.perf_counter() - t0
        result.chunk_latency_ms.append(latency * 1e3)
        result.chunks += 1
        if on_chunk is not None:
            on_chunk()
        chunk = chunk[:, : max_steps - int(steps.max())]
        if period is None:
            observations, done, executed = pool.step(chunk, active)
        else:
            # The chunk was due at next_tick (one period after the last executed action; the first chunk of an
            # episode has no deadline): every tick that passed while planning is a tick the robot held its command.
            now = time.perf_counter()
            if result.chunks == 1:
                next_tick = now
            elif now > next_tick:
                missed = math.ceil((now - next_tick) / period)
                misses, ticks_missed, next_tick = misses + 1, ticks_missed + missed, next_tick + missed * period
            observations = np.repeat(history[:, -1:], chunk.shape[1], axis=1)
            done, executed = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
            for j in range(chunk.shape[1]):
                time.sleep(max(0.0, next_tick - time.perf_counter()))
                next_tick += period
                going = active & ~done
                obs_j, done_j, _ = pool.step(chunk[:, j : j + 1], going)
                observations[going, j:] = obs_j[going, :1]
                executed += going
                done |= done_j
        for j in range(observations.shape[1]):  # keep each environment's last n_obs_steps observations
            moved = active & (executed > j)
            history[moved] = np.concatenate([history[moved, 1:], observations[moved, j : j + 1]], axis=1)
        steps += np.where(active, executed, 0)
        success |= done & active
        active &= ~done
    result.wall_s = time.perf_counter() - start
    result.success, result.episode_steps = success.tolist(), steps.tolist()
    if period is not None:
        result.deadline_misses, result.missed_ticks = misses, ticks_missed
    return result


def make_actor(pipe: DiffusionPolicyPipeline, steps: int, denoiser_steps=None, graph: bool = False, batch: int = 0):
    """The ``act`` function of :func:`run_episodes`: eager pipeline calls, or replays of one captured CUDA graph."""
    if graph:
        from .graph import CUDAGraphPolicy

        runner = CUDAGraphPolicy(pipe, batch, steps, denoiser_steps)
        return lambda history, tasks: runner(history, list(tasks)).actions
    return lambda history, tasks: (
        pipe(history, task=list(tasks), num_inference_steps=steps, denoiser_steps=denoiser_steps).actions
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", required=True, help="Meta-World task(s) of the policy, e.g. reach-v3")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (all run as one batch)")
    parser.add_argument("--policy", help="policy folder (default: the shipped one)")
    parser.add_argument("--cache", choices=CACHES, default="none")
    parser.add_argument("--schedule", help="BAC schedule JSON (--cache bac; default: calibrate now)")
    parser.add_argument(
        "--updates", type=int, default=10, help="updates per sub-block (uniform) or denoiser calls (skip-steps)"
    )
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--steps", type=int, default=100, help="denoising steps per chunk")
    parser.add_argument("--max-steps", type=int, default=200, help="environment steps before an episode fails")
    parser.add_argument("--real-time", type=float, metavar="HZ", help="fixed control period of 1/HZ s")
    parser.add_argument("--cuda-graph", action="store_true", help="replay the chunk as one CUDA graph (static caches)")
    parser.add_argument("--workers", type=int, default=0, help="processes stepping the environments")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="Meta-World MT1 seed of the episodes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    pipe = load_policy(args.policy, args.device, args.scheduler)
    for task in args.task:
        if task not in pipe.task_names:
            raise UnknownTaskError(
                f"the policy at {args.policy or model_path(POLICY)} was not trained for task {task!r}; it was trained for {pipe.task_names}"
            )
    config = cache_config(args.cache, pipe, args.steps, args.updates, args.schedule)
    if config is not None:
        pipe.enable_block_cache(config)
    denoiser_steps = evenly_spaced(args.steps, args.updates) if args.cache == "skip-steps" else None
    tasks = [task for task in args.task for _ in range(args.episodes)]
    variations = [episode for _ in args.task for episode in range(args.episodes)]
    act = make_actor(pipe, args.steps, denoiser_steps, args.cuda_graph, len(tasks))
    with EnvPool(tasks, args.seed, args.workers) as pool:
        result = run_episodes(
            act, pool, variations, pipe.transformer.config.n_obs_steps, args.max_steps, args.real_time
        )
    summary = {"args": vars(args), **result.summary(pipe.transformer.config.n_action_steps)}
    print(
        f"success {summary['success_rate']:.1%} over {summary['episodes']} episodes "
        + " ".join(f"[{t}: {s:.0%}]" for t, s in summary["success_per_task"].items())
        + f"; chunk latency p50 {summary['latency_ms_p50']:.1f} ms, p99 {summary['latency_ms_p99']:.1f} ms "
        f"(batch {len(tasks)}); policy allows {summary['policy_hz']:.0f} Hz, loop ran at {summary['loop_hz']:.0f} Hz"
        + (
            f"; {summary['deadline_misses']} deadline misses ({summary['missed_ticks']} ticks held) at "
            f"{args.real_time:g} Hz"
            if args.real_time
            else ""
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
