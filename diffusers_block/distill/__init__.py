"""Step-distilled blockwise flow matching: few-step segment students of a flow-matching teacher.

::

    student = diffusers_block.distill.load("models/digits-image-distilled")
    pipe.enable_blockwise_flow(student)
    images = pipe(**labels, num_inference_steps=student.num_steps).images  # CFG folded in: one forward a step
    pipe.disable_blockwise_flow()  # exactly the teacher again

Train one with ``python -m diffusers_block.train distill --teacher models/digits-image --out DIR``.
"""

from __future__ import annotations

from pathlib import Path

from .apply import StudentScheduler, disable_blockwise_flow, enable_blockwise_flow
from .model import BlockwiseFlowModel, StudentMismatchError
from .schedule import SegmentSchedule


def load(path: str | Path, **kwargs) -> BlockwiseFlowModel:
    """``BlockwiseFlowModel.from_pretrained(path)``, with an error naming the training command for a missing folder."""
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no distilled student (no config.json); train one with "
            f"`python -m diffusers_block.train distill --teacher <pipeline folder> --out {path}`"
        )
    return BlockwiseFlowModel.from_pretrained(path, **kwargs)


__all__ = [
    "BlockwiseFlowModel",
    "SegmentSchedule",
    "StudentMismatchError",
    "StudentScheduler",
    "disable_blockwise_flow",
    "enable_blockwise_flow",
    "load",
]
