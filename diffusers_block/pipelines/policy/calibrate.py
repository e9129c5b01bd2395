"""BAC calibration of a policy: one uncached run on calibration observations -> a static schedule as JSON.

python -m diffusers_block.pipelines.policy.calibrate --task reach-v3 push-v3 --updates 10 --out bac.json

Calibration observations come from the policy itself: a short uncached closed-loop rollout on Meta-World episodes
that are not evaluated (MT1 seed 500), whose observation histories at a few chunks (start, middle, late) form one
batch. :func:`diffusers_block.calibrate_schedule` records every sub-block's output at every denoising step of that
batch, picks each sub-block's ``updates`` update steps by BAC's dynamic programme and applies Bubbling Union to the
``bubbling_union`` most variable sub-blocks. The saved schedule is run by ``--cache bac --schedule PATH``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from ... import StaticScheduleConfig, calibrate_schedule
from .envs import EnvPool
from .pipeline import DiffusionPolicyPipeline
from .rollout import DEFAULT_POLICY, load_policy, run_episodes

CALIBRATION_SEED = 500  # Meta-World MT1 seed of calibration episodes (evaluation uses 1000, demos 0 and 1)


def calibration_observations(
    pipe: DiffusionPolicyPipeline,
    tasks: Sequence[str],
    episodes_per_task: int = 2,
    chunks: Sequence[int] = (0, 3, 6),
    steps: int = 100,
    seed: int = CALIBRATION_SEED,
    workers: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Observation histories (n, n_obs_steps, obs_dim) and their tasks, seen at ``chunks`` of an uncached rollout."""
    env_tasks = [task for task in tasks for _ in range(episodes_per_task)]
    variations = [episode for _ in tasks for episode in range(episodes_per_task)]
    seen = []

    def act(history, names):
        seen.append(history.copy())
        return pipe(history, task=list(names), num_inference_steps=steps).actions

    config = pipe.transformer.config
    with EnvPool(env_tasks, seed, workers) as pool:
        run_episodes(act, pool, variations, config.n_obs_steps, (max(chunks) + 1) * config.n_action_steps)
    picked = [seen[min(c, len(seen) - 1)] for c in chunks]
    return np.concatenate(picked), env_tasks * len(picked)


def calibrate_policy(
    pipe: DiffusionPolicyPipeline,
    observations: np.ndarray,
    tasks: Sequence[str],
    updates: int = 10,
    bubbling_union: int = 5,
    steps: int = 100,
    seed: int = 0,
) -> StaticScheduleConfig:
    def generate(p):
        return p(
            observations,
            task=list(tasks),
            num_inference_steps=steps,
            generator=torch.Generator(p._execution_device).manual_seed(seed),
        )

    return calibrate_schedule(
        pipe,
        generate,
        updates,
        granularity="sub_block",
        bubbling_union_top=bubbling_union,
        max_samples=len(observations),
    )


def main(argv=None) -> StaticScheduleConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", help="tasks to calibrate on (default: all the policy's tasks)")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--updates", type=int, default=10, help="update steps per sub-block (BAC's M)")
    parser.add_argument("--bubbling-union", type=int, default=5, help="top-n variable sub-blocks (paper: 5 in sim)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="policy_bac_schedule.json")
    args = parser.parse_args(argv)
    pipe = load_policy(args.policy, args.device)
    obs, tasks = calibration_observations(pipe, args.task or pipe.task_names, steps=args.steps)
    schedule = calibrate_policy(pipe, obs, tasks, args.updates, args.bubbling_union, args.steps)
    schedule.save(args.out)
    total = sum(map(len, schedule.update_steps.values()))
    print(
        f"{len(schedule.update_steps)} sub-blocks, {total} updates in all ({total / len(schedule.update_steps):.1f} "
        f"per sub-block of {args.steps} steps) calibrated on {len(obs)} observation histories -> {args.out}"
    )
    return schedule


if __name__ == "__main__":
    main()
