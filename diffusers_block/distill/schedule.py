"""Where a student's steps fall on the flow trajectory: K segments of sigma in [0, 1], a few steps in each.

A flow-matching pipeline integrates x from sigma = 1 (noise) to sigma = 0 (data) with Euler steps
x <- x + (sigma_next - sigma) * v. A segment student is trained to return, at each of its step starts, the
*average* velocity of the teacher's trajectory over that step, so the stock Euler update lands where the teacher's
many small steps would. The schedule is therefore just the student's sigma grid and which segment owns each step.

Grids come in two kinds, measured against each other in ``bench distill``:
- uniform: equal steps in sigma;
- curvature-optimal (BOSS-style): the grid points, chosen among a fine teacher grid by dynamic programming, that
  minimise the summed Euler defect of the teacher's own trajectories, ``|x_b - x_a - (s_b - s_a) v(x_a)|^2``: where
  the trajectory bends, steps are short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Two sigmas closer than this are the same grid point (timesteps travel through pipelines as sigma * 1000 in bf16).
SIGMA_TOLERANCE = 2e-3


@dataclass(frozen=True)
class SegmentSchedule:
    """The student's sigma grid (descending, first <= 1, last 0) and the number of steps in each segment."""

    sigmas: tuple[float, ...]
    steps_per_segment: tuple[int, ...]

    def __post_init__(self):
        sigmas = tuple(float(s) for s in self.sigmas)
        steps = tuple(int(n) for n in self.steps_per_segment)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "steps_per_segment", steps)
        if len(sigmas) < 2 or not all(0.0 <= s <= 1.0 for s in sigmas):
            raise ValueError(f"sigmas must be at least two values in [0, 1], got {list(sigmas)}")
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be strictly descending from noise (1) to data (0), got {list(sigmas)}")
        if sigmas[-1] != 0.0:
            raise ValueError(f"the last sigma must be 0 (the data end of the flow), got {sigmas[-1]}")
        if not steps or any(n < 1 for n in steps) or sum(steps) != len(sigmas) - 1:
            raise ValueError(
                f"steps_per_segment must be positive and sum to the number of steps ({len(sigmas) - 1}), got "
                f"{list(steps)}"
            )

    @property
    def num_steps(self) -> int:
        """Steps of the student (the ``num_inference_steps`` to pass the pipeline)."""
        return len(self.sigmas) - 1

    @property
    def num_segments(self) -> int:
        """Segments, one student each."""
        return len(self.steps_per_segment)

    @property
    def boundaries(self) -> tuple[float, ...]:
        """Sigma at the start of each segment, then 0."""
        starts = [0]
        for n in self.steps_per_segment:
            starts.append(starts[-1] + n)
        return tuple(self.sigmas[i] for i in starts)

    @property
    def segment_of_step(self) -> tuple[int, ...]:
        """The segment that owns each step."""
        return tuple(k for k, n in enumerate(self.steps_per_segment) for _ in range(n))

    def step_at(self, sigma: float) -> int:
        """Index of the step that starts at ``sigma``, or a ValueError naming the grid."""
        for index, start in enumerate(self.sigmas[:-1]):
            if abs(start - sigma) <= SIGMA_TOLERANCE:
                return index
        raise ValueError(
            f"timestep {sigma * 1000:.1f} (sigma {sigma:.4f}) is not a step of this student, whose steps start at "
            f"sigmas {[round(s, 4) for s in self.sigmas[:-1]]}: run the pipeline with "
            f"num_inference_steps={self.num_steps} and no custom sigmas or timesteps"
        )

    def segment_at(self, sigma: float) -> int:
        """The segment whose student serves the step starting at ``sigma``; ValueError off the grid."""
        return self.segment_of_step[self.step_at(sigma)]


def split_steps(num_steps: int, num_segments: int) -> tuple[int, ...]:
    """``num_steps`` steps in ``num_segments`` contiguous segments, as even as possible (earlier ones longer)."""
    if num_segments < 1 or num_steps < num_segments:
        raise ValueError(f"need 1 <= segments <= steps, got {num_segments} segments for {num_steps} steps")
    base, extra = divmod(num_steps, num_segments)
    return tuple(base + (k < extra) for k in range(num_segments))


def uniform_sigmas(num_steps: int) -> tuple[float, ...]:
    return tuple(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist())


def euler_defects(states: torch.Tensor, velocities: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """(M+1, M+1) matrix: mean squared miss of one Euler jump from fine point a to fine point b > a.

    ``states`` (M+1, B, ...) are the teacher's trajectory at the fine ``sigmas`` (M+1 values), ``velocities``
    (M, B, ...) its velocity at each of the first M points. Entries with b <= a are +inf.
    """
    points = len(sigmas)
    x = states.flatten(2).double()
    v = velocities.flatten(2).double()
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    cost = torch.full((points, points), float("inf"), dtype=torch.float64)
    for a in range(points - 1):
        jump = (s[a + 1 :] - s[a]).view(-1, 1, 1)  # (points - a - 1, 1, 1)
        miss = x[a + 1 :] - x[a] - jump * v[a]
        cost[a, a + 1 :] = miss.square().mean(dim=(1, 2))
    return cost


def optimal_grid(defects: torch.Tensor, num_steps: int) -> list[int]:
    """Indices 0 = i_0 < ... < i_N = M of the fine grid minimising the summed ``defects[i_j, i_j+1]`` (exact DP)."""
    points = defects.shape[0]
    if not 1 <= num_steps <= points - 1:
        raise ValueError(f"cannot place {num_steps} steps on a grid of {points} points")
    best = torch.full((num_steps + 1, points), float("inf"), dtype=torch.float64)
    parent = torch.zeros((num_steps + 1, points), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, num_steps + 1):
        # best[n, b] = min over a of best[n - 1, a] + defects[a, b]
        total = best[n - 1].unsqueeze(1) + defects
        best[n], parent[n] = total.min(dim=0)
    path = [points - 1]
    for n in range(num_steps, 0, -1):
        path.append(int(parent[n, path[-1]]))
    return path[::-1]
