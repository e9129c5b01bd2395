"""BAC with its options chosen by measurement rather than guessed.

A BAC schedule has knobs the similarity matrix cannot settle: how many early steps to always compute
(``keep_first``), whether reuse is scored by direction (``objective="cosine"``) or by size (``"error"``), and whether
skipped steps extrapolate (``forecast="taylor1"``). Which combination is best depends on the model and the budget
(on the shipped digits models the winner changes with the number of updates). So: record the calibration features
once, build one schedule per combination of :data:`DEFAULT_GRID`, run each on *validation* inputs (other prompts and
seeds than the calibration's) and keep the one whose output is closest to the uncached output. The cost is one
extra generation per candidate at calibration time; nothing changes at run time (the result is a static schedule).
The two steps are :func:`~diffusers_block.cache.bac.candidate_schedules` and
:func:`~diffusers_block.cache.bac.select_schedule`, which the diffusion policy's default calibration uses too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .bac import candidate_schedules, record_features, relative_error, select_schedule
from .static import StaticScheduleConfig

DEFAULT_GRID: Mapping[str, Sequence] = {
    "keep_first": (0.0, 0.1, 0.2, 0.3),
    "objective": ("cosine", "error"),
    "forecast": ("none", "taylor1"),
}
#: The :func:`~diffusers_block.cache.bac.schedule_from_features` options a grid may vary.
GRID_KEYS = ("keep_first", "keep_last", "objective", "forecast", "bubbling_union_top")


@dataclass(frozen=True)
class TunedSchedule:
    """The chosen schedule, the options that built it, and every candidate's distance to the uncached output."""

    schedule: StaticScheduleConfig
    options: dict
    distances: dict[str, float] = field(default_factory=dict)


def candidate_name(options: Mapping) -> str:
    return "-".join(f"{key}={value}" for key, value in options.items())


def grid_candidates(grid: Mapping[str, Sequence]) -> dict[str, dict]:
    """Every combination of ``grid``'s values (keys from :data:`GRID_KEYS`) as options, by :func:`candidate_name`."""
    _check_grid(grid)
    choices = (dict(zip(grid, values)) for values in itertools.product(*grid.values()))
    return {candidate_name(choice): choice for choice in choices}


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
    ``bubbling_union_top`` (like ``granularity`` and ``shared``) applies to every candidate unless ``grid`` varies it.
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
    reference=None,
) -> TunedSchedule:
    """:func:`tune_schedule` on a recording already made (:func:`~diffusers_block.cache.bac.record_features` with the
    same ``granularity``), so that one recording serves several budgets. ``reference``: the uncached
    ``validate(target)`` (:func:`~diffusers_block.cache.bac.uncached_output`) if already made, so that several budgets
    share one reference run; by default it is generated here. Combinations the budget cannot hold are left out."""
    candidates = grid_candidates(grid)
    schedules = candidate_schedules(
        features, updates, candidates, granularity=granularity, shared=shared, bubbling_union_top=bubbling_union_top
    )
    best, distances = select_schedule(target, validate, schedules, distance, reference=reference)
    return TunedSchedule(schedules[best], candidates[best], distances)


def _check_grid(grid: Mapping[str, Sequence]) -> None:
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"grid keys must be calibrate options {', '.join(GRID_KEYS)}; got {unknown}")
