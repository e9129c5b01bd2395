"""Training windows over demonstrations, as Diffusion Policy samples them.

A training sample is a window of ``horizon`` consecutive steps of one episode: the first ``n_obs_steps``
observations are the condition and all ``horizon`` actions the target. Windows may start up to ``n_obs_steps - 1``
steps before the episode and end up to ``n_action_steps - 1`` steps after it; the missing steps repeat the first or
last one (Diffusion Policy's SequenceSampler padding), so the start and the end of every episode are learned too.
All windows are precomputed as rows of flat indices, so a batch is one gather on the training device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class DemoDataset:
    """Demonstrations from :mod:`.collect` (a ``.npz`` path or its dict of arrays) cut into training windows."""

    def __init__(self, data: str | Path | dict, horizon: int, n_obs_steps: int, n_action_steps: int) -> None:
        if not isinstance(data, dict):
            with np.load(data) as file:
                data = {key: file[key] for key in file.files}
        self.obs = torch.as_tensor(data["obs"], dtype=torch.float32)
        self.actions = torch.as_tensor(data["actions"], dtype=torch.float32)
        self.task_names = [str(name) for name in data["task_names"]]
        self.n_obs_steps = n_obs_steps
        ends = np.asarray(data["episode_ends"])
        starts = np.concatenate([[0], ends[:-1]])
        rows, tasks = [], []
        for lo, hi, task in zip(starts, ends, data["episode_task"]):
            first = -(n_obs_steps - 1)
            last = (hi - lo) - horizon + (n_action_steps - 1)
            offsets = np.arange(first, last + 1)[:, None] + np.arange(horizon)[None]
            rows.append(lo + np.clip(offsets, 0, hi - lo - 1))
            tasks.append(np.full(len(offsets), task))
        self.windows = torch.as_tensor(np.concatenate(rows))
        self.window_task = torch.as_tensor(np.concatenate(tasks))

    def __len__(self) -> int:
        return len(self.windows)

    def to(self, device: torch.device) -> DemoDataset:
        for name in ("obs", "actions", "windows", "window_task"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A random batch on the dataset's device: obs (B, n_obs_steps, obs_dim), actions (B, horizon, A), task (B,)."""
        pick = torch.randint(0, len(self.windows), (batch_size,), generator=generator, device=self.windows.device)
        index = self.windows[pick]
        return {
            "obs": self.obs[index[:, : self.n_obs_steps]],
            "actions": self.actions[index],
            "task_ids": self.window_task[pick],
        }
