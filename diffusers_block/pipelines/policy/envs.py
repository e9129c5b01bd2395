"""Meta-World environments for the policy: task names, the package's scripted experts, and a pool stepped in batches.

Meta-World 3 (``metaworld``, MuJoCo) through gymnasium: ``gym.make("Meta-World/MT1", env_name=task, seed=seed)``
gives one task with 50 goal/object variations fixed by ``seed`` (drawn at random at each reset there; here
:func:`reset_to` picks one by index, so episode i of an evaluation is reproducible); state observations
are 39-d (hand position and gripper, two object slots, the previous frame of both, the goal) and actions 4-d (hand
displacement and gripper) in [-1, 1]. An episode succeeds the first time ``info["success"]`` is set; evaluation ends
it there, as Meta-World's own evaluation does, or after ``max_steps``.

:class:`EnvPool` holds many environments (several tasks at once if wanted) and steps them together, one action
chunk at a time, in this process or spread over worker processes, so that a batched policy call serves them all.
"""

from __future__ import annotations

import multiprocessing as mp
import warnings
from collections.abc import Sequence

import numpy as np

from ..._extras import require

# The tasks the shipped policy is trained and evaluated on, with their scripted experts (metaworld.policies).
EXPERTS = {
    "reach-v3": "SawyerReachV3Policy",
    "push-v3": "SawyerPushV3Policy",
    "button-press-topdown-v3": "SawyerButtonPressTopdownV3Policy",
    "drawer-open-v3": "SawyerDrawerOpenV3Policy",
    "window-open-v3": "SawyerWindowOpenV3Policy",
}
OBS_DIM, ACTION_DIM = 39, 4


class UnknownTaskError(ValueError):
    """A Meta-World task name that does not exist (or has no scripted expert here)."""


def check_task(task: str, known: Sequence[str] | None = None) -> str:
    known = list(EXPERTS) if known is None else list(known)
    if task not in known:
        raise UnknownTaskError(f"unknown task {task!r}; choose one of {known}")
    return task


def make_env(task: str, seed: int):
    """One Meta-World MT1 environment of ``task`` whose goal variations are fixed by ``seed``."""
    gym = require("policy", "gymnasium")
    metaworld = require("policy", "metaworld")  # registers the Meta-World/* environments

    if task not in metaworld.env_dict.ALL_V3_ENVIRONMENTS:
        raise UnknownTaskError(f"unknown Meta-World task {task!r}; e.g. {list(EXPERTS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gym.make("Meta-World/MT1", env_name=task, seed=seed, disable_env_checker=True)


VARIATIONS = 50  # goal/object variations per task and seed in Meta-World's MT1


def reset_to(env, variation: int) -> np.ndarray:
    """Reset ``env`` to its goal/object variation ``variation % 50`` (Meta-World's reset ignores its seed argument,
    and its own wrapper draws the variation from an RNG it seeds too late to reproduce)."""
    wrapper = env
    while not hasattr(wrapper, "tasks"):
        wrapper = wrapper.env
    wrapper.toggle_sample_tasks_on_reset(False)
    wrapper.unwrapped.set_task(wrapper.tasks[int(variation) % len(wrapper.tasks)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, _ = env.reset()
    return np.asarray(obs, dtype=np.float32)


def make_expert(task: str):
    policies = require("policy", "metaworld.policies")

    return getattr(policies, EXPERTS[check_task(task)])()


class _Envs:
    """A slice of a pool's environments, stepped in this process (the body of every worker)."""

    def __init__(self, tasks: Sequence[str], seed: int) -> None:
        self.envs = [make_env(task, seed) for task in tasks]

    def reset(self, variations: Sequence[int]) -> np.ndarray:
        return np.stack([reset_to(env, v) for env, v in zip(self.envs, variations)])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Execute each active environment's actions (k, A) until it succeeds; returns the observations after each
        executed action (n, k, obs_dim; repeated after a stop), success flags (n,) and actions executed (n,)."""
        n, k = len(self.envs), actions.shape[1]
        observations = np.zeros((n, k, OBS_DIM), dtype=np.float32)
        success = np.zeros(n, dtype=bool)
        executed = np.zeros(n, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, env in enumerate(self.envs):
                if not active[i]:
                    continue
                for j in range(k):
                    obs, _, _, _, info = env.step(np.clip(actions[i, j], -1.0, 1.0))
                    observations[i, j:] = obs
                    executed[i] += 1
                    if info.get("success", 0.0) > 0:
                        success[i] = True
                        break
        return observations, success, executed

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(connection, tasks, seed) -> None:
    envs = _Envs(tasks, seed)
    while True:
        command, payload = connection.recv()
        if command == "reset":
            connection.send(envs.reset(payload))
        elif command == "step":
            connection.send(envs.step(*payload))
        else:
            envs.close()
            connection.close()
            return


class EnvPool:
    """Many Meta-World environments stepped together, one action chunk per call.

    ``tasks`` names each environment's task (repeat a name for several environments of one task); ``seed`` fixes
    the 50 goal variations of every task, and :meth:`reset` takes one variation index per environment, so a pool
    built once (building an environment takes ~1 s) runs any number of reproducible episodes. ``workers=0`` steps them in this process; ``workers=n`` splits them over n processes (each steps its share of
    the chunk on its own, so a chunk costs one message per worker, not one per environment step).
    """

    def __init__(self, tasks: Sequence[str], seed: int, workers: int = 0) -> None:
        if not tasks:
            raise ValueError("EnvPool needs at least one environment")
        self.tasks = list(tasks)
        workers = min(workers, len(tasks))
        self._local = _Envs(self.tasks, seed) if workers == 0 else None
        self._slices, self._pipes, self._processes = [], [], []
        if workers:
            bounds = np.linspace(0, len(tasks), workers + 1).astype(int)
            context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            for lo, hi in zip(bounds, bounds[1:]):
                parent, child = context.Pipe()
                process = context.Process(target=_worker, args=(child, self.tasks[lo:hi], seed), daemon=True)
                process.start()
                child.close()
                self._slices.append(slice(lo, hi))
                self._pipes.append(parent)
                self._processes.append(process)

    def __len__(self) -> int:
        return len(self.tasks)

    def reset(self, variations: Sequence[int]) -> np.ndarray:
        """Start an episode in every environment, environment i in variation ``variations[i]``; (n, obs_dim)."""
        variations = np.asarray(variations)
        if len(variations) != len(self.tasks):
            raise ValueError(f"reset needs one variation per environment ({len(self.tasks)}), got {len(variations)}")
        if self._local is not None:
            return self._local.reset(variations)
        for pipe, part in zip(self._pipes, self._slices):
            pipe.send(("reset", variations[part]))
        return np.concatenate([pipe.recv() for pipe in self._pipes])

    def step(self, actions: np.ndarray, active: np.ndarray):
        """actions (n, k, action_dim) for every environment; inactive ones are not stepped."""
        if self._local is not None:
            return self._local.step(actions, active)
        for pipe, part in zip(self._pipes, self._slices):
            pipe.send(("step", (actions[part], active[part])))
        parts = [pipe.recv() for pipe in self._pipes]
        return tuple(np.concatenate(values) for values in zip(*parts))

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        for pipe, process in zip(self._pipes, self._processes):
            pipe.send(("close", None))
            process.join(timeout=10)
        self._pipes, self._processes = [], []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
