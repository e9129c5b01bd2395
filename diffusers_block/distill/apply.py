"""Run a pipeline on its segment students: ``enable_blockwise_flow(pipe, student)`` / ``disable_blockwise_flow``.

Nothing of the pipeline is forked. Two things are swapped while the students serve, both restored on disable:

- the scheduler, for a flow-matching Euler scheduler on the student's own sigma grid (:class:`StudentScheduler`),
  which refuses a step count the student was not trained for;
- the transformer's forward, by a diffusers hook that sends each call to the student of the segment its timestep
  falls in (the way Wan2.2 switches experts at a boundary timestep).

The students have classifier-free guidance folded in, so each step needs one forward. A pipeline that still runs
CFG gets the guided velocity for both branches, whatever its guidance scale, from that one forward: pipelines that
batch both branches put the unconditional half first (diffusers' convention), so the student runs on the second
half; pipelines that call the transformer once per branch name the calls with a cache context ("cond" first, then
"uncond"), so the "uncond" call returns the "cond" call's output.
"""

from __future__ import annotations

import copy
import weakref

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from ..attention import disable_sparse_attention
from ..attention.apply import _ATTR as SPARSE_ATTR
from ..cache import disable_block_cache
from ..cache.apply import _ATTR as CACHE_ATTR
from ..cache.apply import SERVING_ATTR
from ..models import argument_index, get_argument
from .model import BlockwiseFlowModel, block_names
from .residual import apply_trunk_residual
from .schedule import SegmentSchedule

ROUTING_HOOK = "diffusers_block.blockwise_flow"
_ATTR = "_diffusers_block_flow"  # on a pipeline served by students: its own scheduler, restored on disable
COND, UNCOND = "cond", "uncond"  # the context names of pipelines that call once per CFG branch


class StudentScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler on the student's sigma grid; ``set_timesteps`` only accepts the student's step count."""

    schedule: SegmentSchedule

    @classmethod
    def for_schedule(cls, schedule: SegmentSchedule) -> StudentScheduler:
        """A scheduler (no shift) that steps on ``schedule``'s sigma grid."""
        scheduler = cls(shift=1.0, use_dynamic_shifting=False)
        scheduler.schedule = schedule
        return scheduler

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """The student's grid; another step count, custom ``sigmas`` or ``timesteps`` raise ``ValueError``."""
        if sigmas is not None or timesteps is not None:
            raise ValueError(
                "a blockwise-flow student runs on its own schedule: call the pipeline without `sigmas` or "
                "`timesteps` (disable_blockwise_flow() to use your own)"
            )
        steps = self.schedule.num_steps
        if num_inference_steps is not None and num_inference_steps != steps:
            raise ValueError(
                f"this student was trained for num_inference_steps={steps} (segments of "
                f"{list(self.schedule.steps_per_segment)} steps), got {num_inference_steps}: pass "
                f"num_inference_steps=student.num_steps"
            )
        super().set_timesteps(sigmas=list(self.schedule.sigmas[:-1]), device=device)


class _ContextName(StateManager):
    """Receives the name of diffusers' cache context (``_set_cache_context`` sets every StateManager of a hook)."""

    def __init__(self) -> None:
        super().__init__(dict)
        self.name: str | None = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name


class SegmentRoutingHook(ModelHook):
    """Replaces the transformer's forward by its segment student's; folds the pipeline's CFG into one forward."""

    _is_stateful = True  # receives the cache context

    def __init__(
        self, students: torch.nn.ModuleList, schedule: SegmentSchedule, pipeline=None, controlnet_refusal: str = ""
    ) -> None:
        super().__init__()
        self.students = students
        self.schedule = schedule
        self.controlnet_refusal = controlnet_refusal  # why these students cannot take ControlNet residuals, if so
        self.context = _ContextName()
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._timestep_index: int | None = None
        self._cond_output = None  # (sigma, output) of the last "cond" call

    def initialize_hook(self, module):
        self._timestep_index = argument_index(module, "timestep")
        return module

    def _guided(self) -> bool:
        pipeline = self._pipeline() if self._pipeline is not None else None
        return bool(getattr(pipeline, "do_classifier_free_guidance", False))

    def new_forward(self, module, *args, **kwargs):
        timestep = get_argument(args, kwargs, "timestep", self._timestep_index)
        if timestep is None:
            raise ValueError("blockwise flow routes by timestep, but the transformer was called without one")
        if self.controlnet_refusal and carries_controlnet_residuals(kwargs):
            raise ValueError(self.controlnet_refusal)
        lowest, highest = torch.as_tensor(timestep).float().aminmax()
        lowest, highest = lowest.item() / 1000, highest.item() / 1000  # one host sync per call
        segment = self.schedule.segment_at(highest)
        if self.schedule.segment_at(lowest) != segment:
            raise ValueError("one call's timesteps fall in different segments; call once per timestep")
        student = self.students[segment]
        if not self._guided():
            return student(*args, **kwargs)
        if self.context.name == COND:
            output = student(*args, **kwargs)
            self._cond_output = (highest, output)
            return output
        if self.context.name == UNCOND:
            if self._cond_output is None or self._cond_output[0] != highest:
                raise RuntimeError("an 'uncond' call came before this step's 'cond' call; call 'cond' first")
            return self._cond_output[1]
        return _run_on_second_half(student, args, kwargs)

    def reset_state(self, module):
        """End of a pipeline call: forget the last output and the students' own per-run state (trunk records)."""
        self._cond_output = None
        for student in self.students:
            HookRegistry.check_if_exists_or_initialize(student).reset_stateful_hooks()
        return module


def carries_controlnet_residuals(kwargs: dict) -> bool:
    """Whether a transformer call passes ControlNet residuals (tensors, or lists of them, one per block); a flag such as
    Flux's ``controlnet_blocks_repeat`` is not one."""

    def residual(value) -> bool:
        if isinstance(value, (list, tuple)):
            return any(isinstance(v, torch.Tensor) for v in value)
        return isinstance(value, torch.Tensor)

    return any(residual(value) for key, value in kwargs.items() if "controlnet" in key)


def _run_on_second_half(student, args: tuple, kwargs: dict):
    """One forward on the conditional half of a CFG batch (unconditional half first), its output returned for both."""
    batch = get_argument(args, kwargs, "hidden_states", 0).shape[0]
    if batch % 2:
        raise ValueError(f"a classifier-free-guidance batch has an even size, got {batch}")

    def half(value):  # per-sample tensors, also in lists (ControlNet residuals, one per block)
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return value[batch // 2 :]
        if isinstance(value, (list, tuple)):
            return type(value)(half(v) for v in value)
        return value

    output = student(*[half(a) for a in args], **{k: half(v) for k, v in kwargs.items()})
    if isinstance(output, tuple):
        return (torch.cat([output[0], output[0]]), *output[1:])
    output.sample = torch.cat([output.sample, output.sample])
    return output


def serving_students(student: BlockwiseFlowModel, teacher: torch.nn.Module) -> torch.nn.ModuleList:
    """One inference transformer per segment on ``teacher``'s device, with the student's feature residual
    approximation hooked in when it has one (its trunks then run at each segment's first step only)."""
    students = student.to(teacher.device).build_students(teacher)
    if student.residuals is not None:
        for segment, (module, residual) in enumerate(zip(students, student.residuals)):
            residual = copy.deepcopy(residual).to(teacher.device, teacher.dtype).eval().requires_grad_(False)
            apply_trunk_residual(module, residual, student.config.residual_trunk, student.schedule, segment)
    return students


def enable_blockwise_flow(pipe, student: BlockwiseFlowModel):
    """Serve ``pipe``'s denoising with ``student``'s segment students; returns ``pipe``.

    Generate with ``num_inference_steps=student.num_steps``. Block caching and sparse attention enabled on the
    pipeline afterwards act on the students (the transformers that now run).
    """
    if not isinstance(student, BlockwiseFlowModel):
        raise TypeError(
            f"expected a BlockwiseFlowModel (diffusers_block.distill.load(path)), got {type(student).__name__}"
        )
    teacher = getattr(pipe, "transformer", None)
    if not isinstance(teacher, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no `transformer` for a blockwise-flow student to replace")
    for feature, attr in (("block caching", CACHE_ATTR), ("sparse attention", SPARSE_ATTR)):
        if getattr(pipe, attr, None) is not None:
            raise ValueError(
                f"{feature} is enabled on this pipeline's teacher transformer, which the students replace: enable "
                f"blockwise flow first, then {feature} (it then acts on the students)"
            )
    if not _is_flow_matching(getattr(pipe, "scheduler", None)):
        raise ValueError(
            f"{type(pipe).__name__} samples with {type(pipe.scheduler).__name__}, not a flow-matching scheduler: "
            f"blockwise-flow students replace flow-matching teachers (FlowMatchEulerDiscreteScheduler, or UniPC / "
            f"DPM-Solver with use_flow_sigmas)"
        )
    disable_blockwise_flow(pipe)
    students = serving_students(student, teacher)
    hook = SegmentRoutingHook(students, student.schedule, pipe, _controlnet_refusal(student, teacher))
    HookRegistry.check_if_exists_or_initialize(teacher).register_hook(hook, ROUTING_HOOK)
    teacher_scheduler = pipe.scheduler
    pipe.scheduler = StudentScheduler.for_schedule(student.schedule)
    setattr(pipe, _ATTR, teacher_scheduler)  # what disable restores
    setattr(pipe, SERVING_ATTR, {f"segment_{k}": s for k, s in enumerate(students)})
    return pipe


def _controlnet_refusal(student: BlockwiseFlowModel, teacher: torch.nn.Module) -> str:
    """Why ``student`` cannot serve a ControlNet pipeline ("" if it can).

    Transformers add ControlNet residuals by block index inside their forward (SD3, Flux): a student that drops
    blocks would add them to other blocks than the ControlNet was trained for, and one that skips its trunk (feature
    residual approximation) would drop the trunk's. A student keeping every block takes them as the teacher does.
    """
    if student.residuals is not None:
        return (
            f"this student skips its first {student.config.residual_trunk} blocks at a segment's later steps, where "
            "ControlNet adds its residuals: serve a ControlNet pipeline with a student trained without "
            "--residual-trunk"
        )
    teacher_blocks = block_names(teacher)
    if any(set(kept) != set(teacher_blocks) for kept in student.config.blocks):
        return (
            "this student drops some of the teacher's blocks, and ControlNet residuals are added by block index: "
            "serve a ControlNet pipeline with a student keeping every block (train distill --blocks all)"
        )
    return ""


def _is_flow_matching(scheduler) -> bool:
    config = getattr(scheduler, "config", {})
    return (
        isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
        or config.get("use_flow_sigmas", False)
        or config.get("prediction_type") == "flow_prediction"
    )


def disable_blockwise_flow(pipe) -> None:
    """The teacher and its own scheduler again: outputs are exactly the teacher's. No-op if not enabled.

    Block caching and sparse attention enabled while the students served are removed with them.
    """
    teacher_scheduler = getattr(pipe, _ATTR, None)
    if teacher_scheduler is None:
        return
    disable_block_cache(pipe)
    disable_sparse_attention(pipe)
    delattr(pipe, SERVING_ATTR)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(ROUTING_HOOK, recurse=False)
    pipe.scheduler = teacher_scheduler
    delattr(pipe, _ATTR)
