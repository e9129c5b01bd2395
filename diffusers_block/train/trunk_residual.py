"""Train the feature residual approximation of segment students (``train distill --residual-trunk N``).

Each segment's residual networks learn, from pairs of states of the same teacher trajectory (the segment's first
grid point and one of its later grid points), the student's trunk output at the later state from its trunk output
at the first state and the change of the trunk's input. The loss is the feature error relative to reusing the first
state's trunk output unchanged (a plain trunk cache): 1 at the untrained start, lower is better. Only the residual
networks train; the students (teacher blocks with their low-rank changes) are frozen.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.model import BlockwiseFlowModel
from ..distill.residual import trunk_features
from ..distill.schedule import SegmentSchedule
from ..distill.trajectories import transformer_velocity
from .digits_image import generator_for_step
from .loop import TrainConfig, process_rows


def pair_batches(task, schedule: SegmentSchedule, states: torch.Tensor, labels: torch.Tensor, config: TrainConfig):
    """sample_batch(step, rank, device): per segment with later steps, a share of the batch of (first state, later
    state) pairs of the same trajectories, at random later steps of the segment. ``batch_size`` is the global batch,
    split over the processes as the trajectory stage's is (:func:`~.loop.process_rows`)."""
    sigmas = torch.tensor(schedule.sigmas)
    segments = [k for k, n in enumerate(schedule.steps_per_segment) if n > 1]
    if not segments:
        raise ValueError("feature residual approximation needs a segment of two or more steps; every segment has one")
    share = max(config.batch_size // len(segments), 1)
    rows_of = process_rows(share, config.batch_size, len(segments))

    @functools.cache
    def on_device(device):
        return states.to(device), labels.to(device), sigmas.to(device)

    def sample_batch(step: int, rank: int, device) -> dict:
        x_all, y_all, s_all = on_device(device)
        generator = generator_for_step(step, 0, config.seed, device)  # the global batch, on every process
        rows = rows_of(rank)
        batch = {}
        for k in segments:
            first = sum(schedule.steps_per_segment[:k])
            index = torch.randint(0, x_all.shape[1], (share,), generator=generator, device=device)[rows]
            later = torch.randint(1, schedule.steps_per_segment[k], (share,), generator=generator, device=device)[rows]
            inputs = task.conditioning(y_all[index])
            batch[k] = {
                "first": (x_all[first, index], s_all[first].expand(len(index))),
                "later": (x_all[first + later, index], s_all[first + later]),
                "step": later,
                "inputs": inputs,
            }
        return batch

    return sample_batch


class TrunkResidualObjective(nn.Module):
    """The residual networks' loss: per segment and stream, the squared error of the approximate trunk output at
    the later state over that of the plain trunk cache, averaged. Only ``flow.residuals`` are registered (trained)."""

    def __init__(self, flow: BlockwiseFlowModel, students: nn.ModuleList) -> None:
        super().__init__()
        self.residuals = flow.residuals
        self.trunk = flow.config.residual_trunk
        object.__setattr__(self, "students", students)  # frozen, not a submodule

    def features(self, k: int, x: torch.Tensor, sigma: torch.Tensor, inputs: dict) -> tuple[dict, dict]:
        student = self.students[k]
        return trunk_features(student, self.trunk, lambda: transformer_velocity(student, x, sigma, inputs))

    def errors(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximation error, plain-cache error): mean squared feature errors over segments and streams."""
        approximation, cache = [], []
        for k, b in batch.items():
            first_in, first_out = self.features(k, *b["first"], b["inputs"])
            later_in, later_out = self.features(k, *b["later"], b["inputs"])
            approx = self.residuals[k](first_out, first_in, later_in, b["step"])
            for name, target in later_out.items():
                if target is None:
                    continue
                approximation.append(F.mse_loss(approx[name].float(), target.float()))
                cache.append(F.mse_loss(first_out[name].float(), target.float()))
        return torch.stack(approximation), torch.stack(cache)

    def forward(self, batch: dict) -> torch.Tensor:
        approximation, cache = self.errors(batch)
        return (approximation / cache.clamp_min(1e-12)).mean()
