"""Feature residual approximation (BFM's FRA): a segment's trunk runs only at the segment's first step.

The first ``residual_trunk`` blocks of a segment student form its *trunk*. Within one segment the trunk's output
moves little from step to step, so at the segment's first step the trunk runs and its input and output are
recorded; at the segment's later steps the trunk's blocks are skipped and its output is approximated by the first
step's output plus a small residual network of (that output, the change of the trunk's input since the first
step). The residual network's output layer starts at zero, so an untrained one is a plain trunk cache (the first
step's trunk output reused as it is).

Family-generic: the trunk is found through the adapter table (its first block list), and each stream a block
returns (the hidden stream, and the text stream of joint-attention blocks such as SD3's) gets a residual network of
its own. The step within a segment comes from the call's timestep and the :class:`SegmentSchedule`, never from
counting calls, so a new pipeline run starts clean at its first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..models import ENCODER, FFN, FFN_CONTEXT, HIDDEN, BlockRef, argument_index, get_argument, resolve_adapter
from .schedule import SegmentSchedule

TRUNK_STEP_HOOK = "diffusers_block.trunk_residual.step"
TRUNK_BLOCK_HOOK = "diffusers_block.trunk_residual.block"
STREAMS = (HIDDEN, ENCODER)  # the streams a block can return that the residual networks approximate


class StreamResidual(nn.Module):
    """One stream's trunk output at a later step of a segment: ``first + up(gelu(down([norm(first), change]) +
    step)) + gate * change``, per token.

    ``first`` is the trunk's output at the segment's first step, ``change`` the change of the trunk's input of this
    stream since then, ``step`` a learned vector per later step (the step's sigma is fixed by the schedule). The
    linear path ``gate * change`` carries what the trunk's residual connections pass straight through. ``up`` and
    ``gate`` start at zero: an untrained network returns ``first`` (a plain trunk cache).
    """

    def __init__(self, features: int, width: int, later_steps: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.down = nn.Linear(2 * features, width)
        self.step = nn.Parameter(torch.zeros(later_steps, width))
        self.up = nn.Linear(width, features)
        self.gate = nn.Parameter(torch.zeros(features))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, first: torch.Tensor, change: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
        """``step``: the local step (>= 1), one for the batch or one per sample (B,) while training."""
        embedding = self.step[step - 1]
        if embedding.ndim == 2:  # per sample: broadcast over the tokens
            embedding = embedding.view(len(embedding), *([1] * (first.ndim - 2)), -1)
        hidden = self.down(torch.cat([self.norm(first), change], dim=-1)) + embedding
        return first + self.up(F.gelu(hidden)) + self.gate * change


class TrunkResidual(nn.Module):
    """One segment's residual networks, one per stream the trunk returns (``streams``: name -> feature width)."""

    def __init__(self, streams: dict[str, int], width: int, later_steps: int) -> None:
        super().__init__()
        self.streams = nn.ModuleDict(
            {name: StreamResidual(features, width, later_steps) for name, features in streams.items()}
        )

    def forward(self, first: dict, first_inputs: dict, inputs: dict, step: int) -> dict:
        """The approximate trunk output at local ``step`` (>= 1) of the segment, per stream."""
        approximation = {}
        for name, net in self.streams.items():
            if first.get(name) is None:
                approximation[name] = None
                continue
            change = (
                inputs[name] - first_inputs[name] if inputs.get(name) is not None else torch.zeros_like(first[name])
            )
            approximation[name] = net(first[name], change.to(first[name].dtype), step).to(first[name].dtype)
        return approximation


# ----------------------------------------------------------------------------------------------------------------
# The trunk: located and checked through the adapter table
# ----------------------------------------------------------------------------------------------------------------
def check_trunk_size(trunk) -> None:
    """A ValueError unless ``trunk`` is a positive number of blocks."""
    if isinstance(trunk, bool) or not isinstance(trunk, int) or trunk < 1:
        raise ValueError(
            f"residual_trunk must be a positive number of leading blocks (or None to turn feature residual "
            f"approximation off), got {trunk!r}"
        )


def trunk_blocks(transformer: nn.Module, trunk: int) -> list[BlockRef]:
    """The first ``trunk`` blocks of ``transformer``, or a ValueError saying why they cannot form a trunk."""
    check_trunk_size(trunk)
    blocks = resolve_adapter(transformer).blocks
    if trunk >= len(blocks):
        raise ValueError(
            f"residual_trunk={trunk} leaves no block after the trunk: the model has {len(blocks)} blocks; use a trunk "
            f"of at most {len(blocks) - 1}"
        )
    first_list = blocks[0].spec
    chosen = list(blocks[:trunk])
    if any(block.spec is not first_list for block in chosen):
        count = sum(block.spec is first_list for block in blocks)
        raise ValueError(
            f"residual_trunk={trunk} reaches past {type(transformer).__name__}'s first block list `{first_list.attr}` "
            f"({count} blocks), and the transformer runs code of its own between block lists: use a trunk of at "
            f"most {count} blocks"
        )
    unknown = [role for role in first_list.returns if role not in STREAMS]
    if unknown:
        raise ValueError(
            f"{type(transformer).__name__}'s blocks in `{first_list.attr}` return {list(first_list.returns)}: a value "
            f"that is not a stream ({unknown}) cannot be approximated from the first step, so feature residual "
            f"approximation does not support this family"
        )
    return chosen


def stream_widths(transformer: nn.Module, trunk: int) -> dict[str, int]:
    """Feature width of each stream the trunk returns, read off the output layer of the last trunk block's FFNs.

    A shape-preserving block's FFN for a stream ends in a linear map back to that stream's width (the FFN role of
    the adapter table for the hidden stream, FFN_CONTEXT for the text stream; a block without a text FFN runs its
    text tokens through the shared one, so they have the hidden width).
    """
    block = trunk_blocks(transformer, trunk)[-1]
    sub_blocks = {role: module for _, role, module in block.sub_blocks()}

    def width(role: str) -> int | None:
        linears = [m for m in sub_blocks[role].modules() if isinstance(m, nn.Linear)] if role in sub_blocks else []
        return linears[-1].out_features if linears else None

    hidden = width(FFN)
    if hidden is None:
        raise ValueError(
            f"cannot tell the width of {type(transformer).__name__}'s hidden stream: its blocks at "
            f"`{block.spec.attr}` have no FFN sub-block in the adapter table (diffusers_block.models.FAMILIES); add "
            f"one to its entry to use feature residual approximation"
        )
    widths = {}
    for role in block.spec.returns:
        widths[role] = hidden if role == HIDDEN else (width(FFN_CONTEXT) or hidden)
    return widths


def check_blocks_after_trunk(kept: Sequence[Sequence[str]], trunk: int) -> None:
    """A ValueError naming the fix if some segment keeps no block after a trunk of ``trunk`` blocks."""
    for k, names in enumerate(kept):
        if len(names) <= trunk:
            raise ValueError(
                f"residual_trunk={trunk} leaves no block after the trunk in segment {k}, which keeps {len(names)} "
                f"blocks: use a trunk of at most {len(names) - 1} blocks"
            )


def check_trunk_kept(teacher_blocks: Sequence[str], kept: Sequence[Sequence[str]], trunk: int) -> None:
    """A ValueError naming the fix if some segment does not keep the teacher's first ``trunk`` blocks, or keeps
    no block after them."""
    leading = list(teacher_blocks[:trunk])
    for k, names in enumerate(kept):
        missing = [name for name in leading if name not in names]
        if missing:
            raise ValueError(
                f"residual_trunk={trunk} needs every segment to keep the teacher's first {trunk} blocks; segment {k} "
                f"drops {missing}: keep them (--blocks first or all) or use a trunk of the leading blocks it keeps"
            )
    check_blocks_after_trunk(kept, trunk)


# ----------------------------------------------------------------------------------------------------------------
# Serving: hooks on a segment student
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _TrunkState:
    """What one student's hooks share: the call in flight and the record of the segment's first step."""

    step: int | None = None  # local step of the call in flight (None: no call in flight)
    approximate: bool = False  # this call skips the trunk
    batch: int | None = None  # batch of the call in flight
    pending: dict | None = None  # trunk inputs of the first step's call in flight
    first_inputs: dict | None = None  # trunk inputs at the segment's first step
    first_outputs: dict | None = None  # trunk outputs at the segment's first step
    record_batch: int | None = None
    last_step: int | None = None  # local step of the previous call

    def clear(self) -> None:
        self.pending = self.first_inputs = self.first_outputs = self.record_batch = self.last_step = None


class TrunkStepHook(ModelHook):
    """On the student: from the call's timestep, the step within the segment, and whether the trunk may be skipped.

    The trunk is skipped at a later step only with a record of this segment's first step made for the same batch
    size, and with no call at a later step since (a record from another run would be stale). Otherwise the step runs
    the trunk in full: the exact student.
    """

    _is_stateful = True

    def __init__(self, state: _TrunkState, schedule: SegmentSchedule, segment: int) -> None:
        super().__init__()
        self.state = state
        self.schedule = schedule
        self.segment = segment
        self.first_step = sum(schedule.steps_per_segment[:segment])
        self._timestep_index = self._hidden_index = None

    def initialize_hook(self, module):
        self._timestep_index = argument_index(module, "timestep")
        self._hidden_index = argument_index(module, "hidden_states")
        return module

    def new_forward(self, module, *args, **kwargs):
        timestep = get_argument(args, kwargs, "timestep", self._timestep_index)
        hidden = get_argument(args, kwargs, "hidden_states", self._hidden_index)
        if timestep is None or not isinstance(hidden, torch.Tensor):
            raise ValueError("feature residual approximation needs the student's `timestep` and `hidden_states`")
        sigma = torch.as_tensor(timestep).float().max().item() / 1000
        step = self.schedule.step_at(sigma) - self.first_step
        if not 0 <= step < self.schedule.steps_per_segment[self.segment]:
            raise ValueError(
                f"timestep {sigma * 1000:.1f} is a step of segment {self.schedule.segment_at(sigma)}, not of segment "
                f"{self.segment} whose student was called"
            )
        state, batch = self.state, hidden.shape[0]
        # a record of this run's first step: same batch, and no call at a later step of the segment since
        recorded = state.first_outputs is not None and state.record_batch == batch
        in_order = state.last_step is not None and state.last_step <= step
        state.step, state.batch = step, batch
        state.approximate = step > 0 and recorded and in_order
        if step > 0 and not state.approximate:
            state.clear()  # a stale record (another run, another batch) must not serve this run's later steps
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.step, state.approximate, state.pending = None, False, None
            state.last_step = step

    def reset_state(self, module):
        self.state.clear()
        return module


class _BlockStreams:
    """A trunk block's streams: read off its call's arguments, split out of its output, and put back in the form it
    returns (one tensor, or a tuple in the adapter table's ``returns`` order)."""

    def __init__(self, module: nn.Module, spec) -> None:
        self.spec = spec
        self._hidden_index = argument_index(module, spec.hidden_arg)
        self._encoder_index = argument_index(module, spec.encoder_arg)

    def inputs(self, args, kwargs) -> dict:
        streams = {HIDDEN: get_argument(args, kwargs, self.spec.hidden_arg, self._hidden_index)}
        if ENCODER in self.spec.returns:
            streams[ENCODER] = get_argument(args, kwargs, self.spec.encoder_arg, self._encoder_index)
        return streams

    def outputs(self, output) -> dict:
        values = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        return dict(zip(self.spec.returns, values))

    def as_output(self, streams: dict):
        if self.spec.returns == (HIDDEN,):
            return streams[HIDDEN]
        return tuple(streams[role] for role in self.spec.returns)


class TrunkBlockHook(ModelHook):
    """On each trunk block: record the trunk at the first step; at later steps, skip the block.

    At a skipped step the trunk's first block returns the approximation of the whole trunk's output and the other
    trunk blocks pass their input through unchanged.
    """

    def __init__(self, state: _TrunkState, block: BlockRef, residual: TrunkResidual, first: bool, last: bool):
        super().__init__()
        self.state, self.residual = state, residual
        self.streams = _BlockStreams(block.module, block.spec)
        self.first, self.last = first, last

    def new_forward(self, module, *args, **kwargs):
        state, streams = self.state, self.streams
        if state.approximate:
            inputs = streams.inputs(args, kwargs)
            if not self.first:
                return streams.as_output(inputs)  # the first trunk block already returned the trunk's output
            return streams.as_output(self.residual(state.first_outputs, state.first_inputs, inputs, state.step))
        recording = state.step == 0
        if recording and self.first:
            state.pending = streams.inputs(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if recording and self.last and state.pending is not None:  # (a block cache may have skipped the first)
            state.first_inputs, state.first_outputs = state.pending, streams.outputs(output)
            state.record_batch = state.batch
        return output


def apply_trunk_residual(
    student: nn.Module, residual: TrunkResidual, trunk: int, schedule: SegmentSchedule, segment: int
) -> nn.Module:
    """Serve ``student`` (segment ``segment`` of ``schedule``) with its trunk approximated at later steps."""
    blocks = trunk_blocks(student, trunk)
    state = _TrunkState()
    HookRegistry.check_if_exists_or_initialize(student).register_hook(
        TrunkStepHook(state, schedule, segment), TRUNK_STEP_HOOK
    )
    for i, block in enumerate(blocks):
        hook = TrunkBlockHook(state, block, residual, first=i == 0, last=i == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block.module).register_hook(hook, TRUNK_BLOCK_HOOK)
    return student


# ----------------------------------------------------------------------------------------------------------------
# Training: the trunk's input and output on a batch
# ----------------------------------------------------------------------------------------------------------------
class _TrunkDone(Exception):
    """Raised after the last trunk block: the rest of the forward is not needed."""


@torch.no_grad()
def trunk_features(student: nn.Module, trunk: int, run: Callable[[], object]) -> tuple[dict, dict]:
    """(inputs, outputs): the trunk's streams on the call ``run()`` makes to ``student`` (which stops after the
    trunk: the blocks after it are not run)."""
    blocks = trunk_blocks(student, trunk)
    streams = _BlockStreams(blocks[0].module, blocks[0].spec)  # the trunk's blocks share one list's signature
    captured: dict = {}

    def enter(module, args, kwargs):
        captured["inputs"] = streams.inputs(args, kwargs)

    def leave(module, args, kwargs, output):
        captured["outputs"] = streams.outputs(output)
        raise _TrunkDone

    handles = [
        blocks[0].module.register_forward_pre_hook(enter, with_kwargs=True),
        blocks[-1].module.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        run()
    except _TrunkDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "outputs" not in captured:
        raise RuntimeError("the student's forward never reached the end of its trunk")
    return captured["inputs"], captured["outputs"]
