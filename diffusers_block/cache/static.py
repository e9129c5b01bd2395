"""Static schedules: each unit's update steps are fixed before sampling starts.

A schedule makes no decision at run time, so it needs no host synchronisation: the transformer can run under
``torch.compile`` (no graph breaks) and CUDA graphs. Schedules come from a rule (compute every ``interval``
steps after ``warmup_steps``, always the last ``cooldown_steps``), from explicit per-unit step lists (e.g. the
output of BAC calibration), or from both: units listed in ``update_steps`` follow their list, the others the rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import validation
from .policy import CacheConfig, CachePolicy


@dataclass(frozen=True)
class StaticScheduleConfig(CacheConfig):
    """update_steps: unit name (e.g. "blocks.3", or "blocks.3.attn1" with granularity="sub_block") -> the steps
        at which it computes; every list must contain step 0.
    interval / warmup_steps / cooldown_steps: the rule for units not in ``update_steps``; interval=1 computes
        every step (identical to no cache).
    """

    update_steps: Mapping[str, Sequence[int]] = field(default_factory=dict)
    interval: int = 1
    warmup_steps: int = 0
    cooldown_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        validation.check_field(self, "interval", validation.integer, 1)
        validation.check_field(self, "warmup_steps", validation.integer, 0)
        validation.check_field(self, "cooldown_steps", validation.integer, 0)
        object.__setattr__(self, "update_steps", _checked_update_steps(type(self).__name__, self.update_steps))

    def computes(self, unit_name: str, step: int, num_steps: int | None) -> bool:
        """Whether ``unit_name`` is computed (not reused) at ``step`` of a ``num_steps``-step generation."""
        steps = self.update_steps.get(unit_name)
        if steps is not None:
            return step in steps
        if step < self.warmup_steps or (num_steps is not None and step >= num_steps - self.cooldown_steps):
            return True
        return (step - self.warmup_steps) % self.interval == 0

    def build(self, unit_names: Sequence[str]) -> StaticSchedulePolicy:
        """The runtime policy for a model whose cache units are ``unit_names``; unknown ``update_steps`` names raise."""
        unknown = sorted(set(self.update_steps) - set(unit_names))
        if unknown:
            raise ValueError(
                f"StaticScheduleConfig.update_steps names units this model does not have: {unknown[:5]}. "
                f"Its units are e.g. {list(unit_names)[:3]} (granularity={self.granularity!r})."
            )
        return StaticSchedulePolicy(self, unit_names)

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field as JSON-ready values (what ``save`` writes)."""
        return {
            "granularity": self.granularity,
            "forecast": self.forecast,
            "interval": self.interval,
            "warmup_steps": self.warmup_steps,
            "cooldown_steps": self.cooldown_steps,
            "update_steps": {name: list(steps) for name, steps in self.update_steps.items()},
        }

    def save(self, path: str | Path) -> None:
        """Write the schedule as JSON; ``StaticScheduleConfig.load(path)`` reads it back."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StaticScheduleConfig:
        """Read a schedule written by ``save``; an unreadable file or an unknown field raises ``ValueError``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read a static cache schedule from {path}: {error}") from error
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Schedule file {path} has unknown fields {sorted(unknown)}")
        return cls(**data)


def _checked_update_steps(owner: str, update_steps) -> dict[str, tuple[int, ...]]:
    """``{unit name: sorted unique steps}``; each list must hold step 0, since a unit must compute once before it
    can be reused. Steps from JSON or numpy are fine; a lone number or a string is not a list of steps."""
    if not isinstance(update_steps, Mapping):
        raise validation.ConfigTypeError(
            f"{owner}.update_steps must map unit names to lists of steps, e.g. {{'blocks.0': [0, 4, 8]}}, got "
            f"{update_steps!r} ({type(update_steps).__name__})"
        )
    frozen = {}
    for name, steps in update_steps.items():
        field_name = f"update_steps[{name!r}]"
        steps = validation.sequence(
            owner,
            field_name,
            steps,
            lambda owner, item, value: validation.integer(owner, item, value, 0),
            "a list of integer steps, e.g. [0, 4, 8]",
        )
        steps = tuple(sorted(set(steps)))
        if not steps or steps[0] != 0:
            raise ValueError(
                f"{owner}.{field_name} must be a list of non-negative integer steps containing 0 (a unit must "
                f"compute at the first step before it can be reused), got {list(steps)}"
            )
        frozen[str(name)] = steps
    return frozen


class StaticSchedulePolicy(CachePolicy):
    planned = True
    wants_indicator = False
    needs_step = False

    def plan(self, unit: int, step: int, num_steps: int | None) -> bool:
        return self.config.computes(self.unit_names[unit], step, num_steps)
