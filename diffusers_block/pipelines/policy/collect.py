"""Collect Meta-World demonstrations from the package's scripted expert policies.

python -m diffusers_block.pipelines.policy.collect --episodes 100 --out .policy-data/metaworld-demos.npz

Episode e of a task runs in the Meta-World MT1 environment seeded ``seed + e // 50``, in goal variation ``e % 50``,
so every demonstration is reproducible and 100 episodes see 100 different goals. The expert acts until the task
succeeds and ``hold_steps`` more (so the policy also learns to stay at the goal); an episode that does not succeed
within ``max_steps`` is dropped. Actions are stored clipped to [-1, 1], as the environment executes them.

The file holds flat arrays: ``obs`` (N, 39) and ``actions`` (N, 4) float32, ``episode_ends`` (E,) (exclusive end
of each episode in the flat arrays), ``episode_task`` (E,) (index into ``task_names``), and ``task_names``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .envs import EXPERTS, VARIATIONS, make_env, make_expert, reset_to


def expert_episode(env, expert, variation: int, max_steps: int, hold_steps: int):
    """One expert episode: (obs (T, 39), actions (T, 4)) if it succeeds within ``max_steps``, else None."""
    obs = reset_to(env, variation)
    observations, actions, success_at = [], [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(max_steps):
            action = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)
            observations.append(obs)
            actions.append(action)
            obs, _, _, _, info = env.step(action)
            obs = np.asarray(obs, dtype=np.float32)
            if success_at is None and info.get("success", 0.0) > 0:
                success_at = step
            if success_at is not None and step >= success_at + hold_steps:
                break
    if success_at is None:
        return None
    return np.stack(observations), np.stack(actions)


def collect(
    tasks: Sequence[str], episodes: int, seed: int = 0, max_steps: int = 300, hold_steps: int = 10
) -> dict[str, np.ndarray]:
    obs, actions, ends, episode_task, dropped = [], [], [], [], 0
    total = 0
    for index, task in enumerate(tasks):
        expert, envs = make_expert(task), {}
        for episode in range(episodes):
            env_seed = seed + episode // VARIATIONS
            if env_seed not in envs:
                envs[env_seed] = make_env(task, env_seed)
            env = envs[env_seed]
            result = expert_episode(env, expert, episode % VARIATIONS, max_steps, hold_steps)
            if result is None:
                dropped += 1
                continue
            obs.append(result[0])
            actions.append(result[1])
            total += len(result[0])
            ends.append(total)
            episode_task.append(index)
        for env in envs.values():
            env.close()
    if dropped:
        print(f"dropped {dropped} expert episodes that did not succeed within {max_steps} steps")
    return {
        "obs": np.concatenate(obs),
        "actions": np.concatenate(actions),
        "episode_ends": np.asarray(ends, dtype=np.int64),
        "episode_task": np.asarray(episode_task, dtype=np.int64),
        "task_names": np.asarray(list(tasks)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(EXPERTS), choices=list(EXPERTS))
    parser.add_argument("--episodes", type=int, default=100, help="expert episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="first Meta-World MT1 seed (one more per 50 episodes)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--hold-steps", type=int, default=10, help="expert steps kept after the first success")
    parser.add_argument("--out", default=".policy-data/metaworld-demos.npz")
    args = parser.parse_args(argv)
    start = time.time()
    data = collect(args.tasks, args.episodes, args.seed, args.max_steps, args.hold_steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **data)
    lengths = np.diff(np.concatenate([[0], data["episode_ends"]]))
    print(
        f"{len(lengths)} episodes, {len(data['obs'])} steps (mean length {lengths.mean():.0f}) of "
        f"{len(args.tasks)} tasks in {time.time() - start:.0f} s -> {out} ({out.stat().st_size / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
