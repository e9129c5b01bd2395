"""A distilled few-step sampler for one teacher: its segment schedule and, per segment, a student.

A student is the teacher with a subset of its blocks kept and a low-rank change to every ``nn.Linear`` it keeps
(``W + up @ down``), so what is saved is small: the schedule, the kept block names and the low-rank factors (a few
MB for the shipped digits models, whose teachers are 12-18 MB each). :meth:`BlockwiseFlowModel.build_students`
binds it to the teacher it was distilled from (checked by architecture and a weight checksum) and returns one
ordinary diffusers transformer per segment, sharing every tensor the student does not change with the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..models import resolve_adapter
from .residual import TrunkResidual, check_blocks_after_trunk, check_trunk_kept, check_trunk_size, stream_widths
from .schedule import SegmentSchedule

# Relative difference of the teacher checksum above which a student refuses to bind (bf16 vs fp32 copies of the
# same weights agree to ~1e-7; another checkpoint differs by far more).
CHECKSUM_TOLERANCE = 1e-3


class StudentMismatchError(ValueError):
    """The student was distilled from another teacher than the transformer it is asked to run beside."""


class LowRankDelta(nn.Module):
    """``weight + up @ down``: used as a ``torch.nn.utils.parametrize`` parametrization while training, merged once
    into a copy of the weight at run time. ``up`` starts at zero, so a fresh student is exactly the teacher."""

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features) / in_features**0.5)
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype)

    @torch.no_grad()
    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.up.float() @ self.down.float()).to(weight.dtype)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys may not hold dots


def teacher_checksum(teacher: nn.Module) -> float:
    """Sum of |w| over every parameter, in float64: equal for the same weights in any float dtype to ~1e-7."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in teacher.parameters()))


def architecture(teacher: nn.Module) -> dict:
    """The teacher's config without diffusers' bookkeeping keys: what must match for a student to bind."""
    return {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}


def block_names(teacher: nn.Module) -> list[str]:
    return [block.name for block in resolve_adapter(teacher).blocks]


def student_linears(teacher: nn.Module, kept: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every nn.Linear a student keeping blocks ``kept`` runs (teacher names)."""
    dropped = [name for name in block_names(teacher) if name not in set(kept)]
    linears = {}
    for name, module in teacher.named_modules():
        if isinstance(module, nn.Linear) and not any(name.startswith(block + ".") for block in dropped):
            linears[name] = (module.out_features, module.in_features)
    return linears


def _structural_copy(teacher: nn.Module) -> tuple[nn.Module, dict[int, object]]:
    """A copy of the module tree that shares every parameter and buffer with ``teacher`` and carries none of the
    hooks (diffusers' registries, replaced forwards) that may sit on it; and ``id(teacher object) -> copy``."""
    memo = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    for module in teacher.modules():
        for attr in ("_diffusers_hook", "forward"):
            value = module.__dict__.get(attr)
            if value is not None:
                memo[id(value)] = None
    student = copy.deepcopy(teacher, memo)
    for module in student.modules():
        for attr in ("_diffusers_hook", "forward"):
            if attr in module.__dict__ and module.__dict__[attr] is None:
                del module.__dict__[attr]
    return student, memo


def keep_blocks(model: nn.Module, kept: Sequence[str]) -> nn.Module:
    """Drop from ``model`` (in place) every block not named in ``kept`` (teacher names, order preserved)."""
    kept = set(kept)
    by_list: dict[str, list[nn.Module]] = {}
    for block in resolve_adapter(model).blocks:
        by_list.setdefault(block.spec.attr, [])
        if block.name in kept:
            by_list[block.spec.attr].append(block.module)
    for attr, modules in by_list.items():
        setattr(model, attr, nn.ModuleList(modules))
    return model


class BlockwiseFlowModel(ModelMixin, ConfigMixin):
    """Segment students of one flow-matching teacher, saved with ``save_pretrained`` (safetensors).

    ``sigmas`` / ``steps_per_segment``: the :class:`SegmentSchedule`; ``blocks[k]``: teacher block names segment k
    keeps; ``linears[k]``: ``{name: [out, in]}`` of the linears segment k changes with rank-``rank`` factors;
    ``guidance_scale``: the classifier-free guidance folded into the students (None: none was);
    ``teacher_class`` / ``teacher_config`` / ``teacher_checksum``: the teacher it binds to.

    ``residual_trunk``: feature residual approximation (:mod:`diffusers_block.distill.residual`), off (None) by
    default: the number of leading blocks that form each segment's trunk, run only at the segment's first step;
    ``residual_width``: the hidden width of its residual networks; ``residual_streams``: ``{stream: features}`` of
    the streams the trunk returns (read off the teacher by :meth:`with_residual_trunk`).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        teacher_class: str = "",
        teacher_config: dict | None = None,
        teacher_checksum: float = 0.0,
        sigmas: Sequence[float] = (1.0, 0.0),
        steps_per_segment: Sequence[int] = (1,),
        blocks: Sequence[Sequence[str]] = ((),),
        linears: Sequence[dict] = ({},),
        rank: int = 4,
        guidance_scale: float | None = None,
        residual_trunk: int | None = None,
        residual_width: int = 64,
        residual_streams: dict | None = None,
    ) -> None:
        super().__init__()
        self.schedule = SegmentSchedule(tuple(sigmas), tuple(steps_per_segment))
        if not (len(blocks) == len(linears) == self.schedule.num_segments):
            raise ValueError(
                f"one block list and one linear map per segment: {self.schedule.num_segments} segments, "
                f"{len(blocks)} block lists, {len(linears)} linear maps"
            )
        self.deltas = nn.ModuleList(
            nn.ModuleDict({_key(name): LowRankDelta(out, inp, rank) for name, (out, inp) in segment.items()})
            for segment in linears
        )
        self.residuals = None
        if residual_trunk is not None:
            check_trunk_size(residual_trunk)
            if not residual_streams:
                raise ValueError("residual_trunk needs residual_streams: build it with with_residual_trunk(teacher)")
            check_blocks_after_trunk(blocks, residual_trunk)
            self.residuals = nn.ModuleList(
                TrunkResidual(dict(residual_streams), residual_width, steps - 1)
                for steps in self.schedule.steps_per_segment
            )

    @classmethod
    def for_teacher(
        cls,
        teacher: nn.Module,
        schedule: SegmentSchedule,
        blocks: Sequence[Sequence[str]] | None = None,
        rank: int = 4,
        guidance_scale: float | None = None,
        residual_trunk: int | None = None,
        residual_width: int = 64,
    ) -> BlockwiseFlowModel:
        """Untrained students of ``teacher`` (each exactly the teacher restricted to its blocks; all by default),
        with an untrained feature residual approximation of the first ``residual_trunk`` blocks if given."""
        blocks = [block_names(teacher)] * schedule.num_segments if blocks is None else [list(b) for b in blocks]
        known = set(block_names(teacher))
        for kept in blocks:
            unknown = [name for name in kept if name not in known]
            if unknown or not kept:
                raise ValueError(f"each segment keeps one or more of the teacher's blocks {sorted(known)}; got {kept}")
        flow = cls(
            teacher_class=type(teacher).__name__,
            teacher_config=architecture(teacher),
            teacher_checksum=teacher_checksum(teacher),
            sigmas=list(schedule.sigmas),
            steps_per_segment=list(schedule.steps_per_segment),
            blocks=blocks,
            linears=[{k: list(v) for k, v in student_linears(teacher, kept).items()} for kept in blocks],
            rank=rank,
            guidance_scale=guidance_scale,
        )
        if residual_trunk is None:
            return flow
        return flow.with_residual_trunk(teacher, residual_trunk, residual_width)

    def with_residual_trunk(self, teacher: nn.Module, trunk: int | None, width: int = 64) -> BlockwiseFlowModel:
        """A copy of these students (same schedule, blocks and low-rank factors) whose first ``trunk`` blocks run
        only at each segment's first step, approximated at its later steps by new, untrained residual networks
        (``trunk=None``: without feature residual approximation). A ValueError names the fix when a segment does
        not keep the teacher's first ``trunk`` blocks and at least one more."""
        self.check_teacher(teacher)
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        config.update(residual_trunk=trunk, residual_width=width, residual_streams=None)
        if trunk is not None:
            config["residual_streams"] = stream_widths(teacher, trunk)  # checks the trunk against the teacher
            check_trunk_kept(block_names(teacher), self.config.blocks, trunk)
        flow = type(self)(**config)
        flow.deltas.load_state_dict(self.deltas.state_dict())
        flow.to(self.device)
        return flow if flow.dtype == self.dtype else flow.to(self.dtype)

    @property
    def num_steps(self) -> int:
        """Pass this as the pipeline's ``num_inference_steps``."""
        return self.schedule.num_steps

    def check_teacher(self, teacher: nn.Module) -> None:
        """A :class:`StudentMismatchError` naming the difference if ``teacher`` is not the one distilled from."""
        if type(teacher).__name__ != self.config.teacher_class:
            raise StudentMismatchError(
                f"this student was distilled from a {self.config.teacher_class}, not a {type(teacher).__name__}: "
                f"load the student made for this pipeline's transformer, or distill one with "
                f"`python -m diffusers_block.train distill --teacher <pipeline folder>`"
            )
        wanted, found = dict(self.config.teacher_config), architecture(teacher)
        differing = sorted(k for k in set(wanted) | set(found) if _jsonable(wanted.get(k)) != _jsonable(found.get(k)))
        if differing:
            details = ", ".join(f"{k}: student {wanted.get(k)!r} vs transformer {found.get(k)!r}" for k in differing)
            raise StudentMismatchError(f"the transformer's config differs from the student's teacher ({details})")
        checksum = teacher_checksum(teacher)
        expected = self.config.teacher_checksum
        if abs(checksum - expected) > CHECKSUM_TOLERANCE * max(abs(expected), 1e-12):
            raise StudentMismatchError(
                f"the transformer has the student's architecture but other weights (checksum {checksum:.6g}, "
                f"student expects {expected:.6g}): a student only works beside the checkpoint it was distilled from"
            )

    def build_students(self, teacher: nn.Module, trainable: bool = False) -> nn.ModuleList:
        """One transformer per segment: ``teacher``'s kept blocks with this model's low-rank changes.

        ``trainable=False`` merges the changes into copies of the weights (inference: ordinary diffusers
        transformers). ``trainable=True`` attaches them as parametrizations reading this model's factors, so a loss
        on the students trains them; the teacher's weights are frozen.
        """
        self.check_teacher(teacher)
        students = nn.ModuleList()
        for kept, deltas in zip(self.config.blocks, self.deltas):
            student, copies = _structural_copy(teacher)
            keep_blocks(student, kept)
            teacher_linears = {_key(name): module for name, module in teacher.named_modules()}
            for key, delta in deltas.items():
                linear = copies[id(teacher_linears[key])]
                if trainable:
                    linear.weight.requires_grad_(False)
                    torch.nn.utils.parametrize.register_parametrization(linear, "weight", delta)
                else:
                    linear.weight = nn.Parameter(delta.merged(linear.weight), requires_grad=False)
            students.append(student.eval())
        return students


def _jsonable(value):
    """Config values compare equal whether they came from JSON (lists) or from a live config (tuples)."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
