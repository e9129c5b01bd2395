"""BAC with its options chosen by measurement rather than guessed.

A BAC schedule has knobs the similarity matrix cannot settle: how many early steps to always compute
(``keep_first``), whether reuse is scored by direction (``objective="cosine"``) or by size (``"error"``), and whether
skipped steps extrapolate (``forecast="taylor1"``). Which combination is best depends on the model and the budget
(on the shipped digits models the winner changes with the number of updates). So: record the calibration features
once, build one schedule per combination of :data:`DEFAULT_GRID`, run each on *validation* inputs (other prompts and
seeds than the calibration's) and keep the one whose output is closest to the uncached output. The cost is one
extra generation per candidate at calibration time; nothing changes at run time (the result is a static schedule).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .bac import record_features, relative_error, schedule_from_features, select_schedule
from .static import StaticScheduleConfig

DEFAULT_GRID: Mapping[str, Sequence] = {
    "keep_first": (0.0, 0.1, 0.2, 0.3),
    "objective": ("cosine", "error"),
    "forecast": ("none", "taylor1"),
}


@dataclass(frozen=True)
class TunedSchedule:
    """The chosen schedule, the options that built it, and every candidate's distance to the uncached output."""

    schedule: StaticScheduleConfig
    options: dict
    distances: dict[str, float] = field(default_factory=dict)


def candidate_name(options: Mapping) -> str:
    return "-".join(f"{key}={value}" for key, value in options.items())


def tune_schedule(
    target,
    calibrate: Callable[[object], object],
    validate: Callable[[object], object],
    updates: int | float,
    *,
    grid: Mapping[str, Sequence] = DEFAULT_GRID,
    granularity: str = "block",
    shared: bool = True,
    bubbling_union_top: int = 0,
    max_samples: int = 8,
    distance: Callable[[object, object], float] = relative_error,
) -> TunedSchedule:
    """The BAC schedule for ``updates`` whose options (every combination of ``grid``, keys being
    :func:`~diffusers_block.cache.bac.calibrate` arguments) reproduce the uncached ``validate(target)`` best.

    ``calibrate(target)`` is run once, uncached, to record features; ``validate(target)`` once uncached and once per
    candidate, so it must be deterministic (seeded) and should use other inputs than ``calibrate``.
    """
    _check_grid(grid)  # before the recording, which is the expensive part
    features = record_features(target, calibrate, granularity, max_samples)
    return tune_schedule_from_features(
        target,
        features,
        validate,
        updates,
        grid=grid,
        granularity=granularity,
        shared=shared,
        bubbling_union_top=bubbling_union_top,
        distance=distance,
    )


def tune_schedule_from_features(
    target,
    features: dict,
    validate: Callable[[object], object],
    updates: int | float,
    *,
    grid: Mapping[str, Sequence] = DEFAULT_GRID,
    granularity: str = "block",
    shared: bool = True,
    bubbling_union_top: int = 0,
    distance: Callable[[object, object], float] = relative_error,
) -> TunedSchedule:
    """:func:`tune_schedule` on a recording already made (:func:`~diffusers_block.cache.bac.record_features` with the
    same ``granularity``), so that one recording serves several budgets."""
    _check_grid(grid)
    candidates, options, infeasible = {}, {}, {}
    for values in itertools.product(*grid.values()):
        choice = dict(zip(grid, values))
        name = candidate_name(choice)
        try:
            candidates[name] = schedule_from_features(
                features,
                updates,
                granularity=granularity,
                shared=shared,
                bubbling_union_top=bubbling_union_top,
                **choice,
            )
        except ValueError as error:  # e.g. more kept steps than the budget has updates: no candidate at this budget
            infeasible[name] = str(error)
            continue
        options[name] = choice
    if not candidates:
        raise ValueError(f"no option combination of the grid is feasible for updates={updates}: {infeasible}")
    best, distances = select_schedule(target, validate, candidates, distance)
    return TunedSchedule(candidates[best], options[best], distances)


def _check_grid(grid: Mapping[str, Sequence]) -> None:
    unknown = set(grid) - {"keep_first", "keep_last", "objective", "forecast"}
    if unknown:
        raise ValueError(
            f"grid keys must be calibrate options keep_first, keep_last, objective, forecast; got {unknown}"
        )
