"""The "distilled student" choice of the digits tabs: a shipped ``BlockwiseFlowModel`` beside its teacher.

A tab offers the choice only where its student's folder exists (``zoo.model_path``: an explicit path, then
``$DIFFUSERS_BLOCK_MODELS``, then the checkout's ``models/``), checked when the page is built, so a student added
later shows up on the next start. Chosen, the tab runs the teacher at its own steps with CFG and the student at
``student.num_steps`` with CFG folded in (one forward a step), on the same seed, and shows both side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from ..zoo.locate import ModelNotFoundError, model_path

CACHE_CHOICE = "block cache / sparse attention (same model, fewer block evaluations)"
STUDENT_CHOICE = "distilled student (fewer steps, one forward a step)"


@dataclass(frozen=True)
class Student:
    model: object  # diffusers_block.distill.BlockwiseFlowModel
    folder: str

    @property
    def num_steps(self) -> int:
        return self.model.num_steps

    @staticmethod
    def folder_of(name: str) -> str | None:
        """The student's folder, or None where this install has none."""
        try:
            return str(model_path(name))
        except ModelNotFoundError:
            return None

    @classmethod
    def find(cls, name: str, device: str) -> Student | None:
        """The shipped student ``name`` loaded on ``device``, or None where it does not ship."""
        from ..distill import load

        folder = cls.folder_of(name)
        if folder is None:
            return None
        shown = os.path.relpath(folder)  # as a visitor would type it, where the folder is under the working directory
        return cls(load(folder).to(device).eval(), folder if shown.startswith("..") else shown)

    @staticmethod
    def required(student: Student | None, name: str) -> Student:
        if student is None:
            raise gr.Error(
                f"No distilled student `{name}` on this install; train one with "
                f"`python -m diffusers_block.train distill` (see the distillation docs)."
            )
        return student


def acceleration_choice(key: str, student_name: str) -> gr.Radio | None:
    """The radio that picks between the cache controls and the distilled student; None (no radio) where the student
    does not ship."""
    if Student.folder_of(student_name) is None:
        return None
    return gr.Radio(
        [CACHE_CHOICE, STUDENT_CHOICE],
        value=CACHE_CHOICE,
        label="accelerate with",
        elem_id=f"{key}-method",
    )
