"""Small glue between the tabs' plain functions and Gradio's page: errors as messages, progress as a bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import gradio as gr

from .controls import CacheControls, repeats_slider
from .render import Pictures
from .runner import Report
from .sparse import SPARSE_OFF, SparseControls, SparseSettings, sparse_available
from .student import STUDENT_CHOICE, acceleration_choice

#: How much the difference pictures amplify |accelerated - baseline|: one scale on every tab, so they compare.
DIFFERENCE_GAIN = 4.0


@dataclass
class AccelerationInputs:
    repeats: gr.Slider
    controls: CacheControls
    sparse: SparseControls | None
    button: gr.Button
    method: gr.Radio | None  # cache or distilled student; None where no student ships

    @property
    def components(self) -> set:
        """Every input a generate event reads."""
        return {
            self.repeats,
            *self.controls.components,
            *(self.sparse.components if self.sparse else ()),
            *((self.method,) if self.method is not None else ()),
        }

    def sparse_settings(self, values: dict) -> SparseSettings:
        return self.sparse.settings(values) if self.sparse else SPARSE_OFF

    def distilled(self, values: dict) -> bool:
        return self.method is not None and values[self.method] == STUDENT_CHOICE


def acceleration_inputs(key: str, device: str, student_name: str | None = None) -> AccelerationInputs:
    """The end of every comparison tab's input column: timed runs per side, the distilled student's choice where it
    ships, the cache policy, sparse attention where the API exists (then "no cache" is a choice too), and the
    button."""
    repeats = repeats_slider()
    method = acceleration_choice(key, student_name) if student_name else None
    with gr.Column(visible=True) as cache_column:
        controls = CacheControls(key, allow_none=sparse_available())
        sparse = SparseControls(key, device) if sparse_available() else None
    button = gr.Button("Generate baseline and accelerated", variant="primary", elem_id=f"{key}-generate")
    if method is not None:
        method.change(lambda choice: gr.update(visible=choice != STUDENT_CHOICE), inputs=method, outputs=cache_column)
    return AccelerationInputs(repeats, controls, sparse, button, method)


T = TypeVar("T")


def in_page(fn: Callable[[], T]) -> T:
    """Run ``fn``; whatever it raises becomes one message in the page (the traceback goes to the server's log)."""
    try:
        return fn()
    except gr.Error:
        raise
    except Exception as error:
        raise gr.Error(f"{type(error).__name__}: {error}") from error


def reporter(progress: gr.Progress) -> Report:
    """A runner ``Report`` that moves the page's progress bar."""

    def report(done_total: tuple[int, int | None], desc: str) -> None:
        progress(done_total, desc=desc, unit="transformer calls")

    return report


class ComparisonView:
    """Where a tab shows a side-by-side run: baseline and accelerated side by side, their difference, the numbers;
    the heatmap goes wherever the tab calls :meth:`add_heatmap` (usually full width, below)."""

    def __init__(self, key: str, difference_gain: float, image_height: int = 240) -> None:
        with gr.Row():
            self.baseline = gr.Image(
                label="baseline (no cache)", format="png", height=image_height, elem_id=f"{key}-baseline"
            )
            self.accelerated = gr.Image(
                label="accelerated", format="png", height=image_height, elem_id=f"{key}-accelerated"
            )
        self.difference = gr.Image(
            label=f"|accelerated - baseline| x {difference_gain:g}",
            format="png",
            height=image_height,
            elem_id=f"{key}-difference",
        )
        self.metrics = gr.Markdown("Press *Generate* to run both.", elem_id=f"{key}-metrics")
        self.key = key
        self.heatmap = self.mask = None

    def add_heatmap(self, label: str) -> None:
        """The cache heatmap picture (its title says what it shows: ``label`` is for screen readers)."""
        self.heatmap = gr.Image(label=label, show_label=False, format="png", elem_id=f"{self.key}-heatmap")

    def add_mask(self) -> None:
        """The sparse block mask picture, hidden until a run with sparse attention has one to show."""
        self.mask = gr.Image(
            label="sparse attention: block mask of the chosen layer and head",
            show_label=False,  # the picture has its own title, which a floating label would cover
            format="png",
            height=320,
            visible=False,  # shown with the first mask
            elem_id=f"{self.key}-mask",
        )

    @property
    def outputs(self) -> list:
        return [self.baseline, self.accelerated, self.difference, self.metrics, self.heatmap, self.mask]

    def cleared(self, message: str = "") -> tuple:
        """The outputs' values with no pictures and ``message`` where the numbers go: how a failed run or a new
        pipeline is shown (a message, never a red error badge left on the pictures)."""
        hidden = gr.Image(value=None, visible=False)
        return (None, None, None, message or gr.update(), hidden, hidden)

    @staticmethod
    def values(pictures: Pictures) -> tuple:
        """The outputs' new values; the heatmap and the mask are hidden when their acceleration was off."""
        return (
            gr.Image(value=pictures.baseline, label=pictures.sides[0]),
            gr.Image(value=pictures.accelerated, label=pictures.sides[1]),
            gr.Image(
                value=pictures.difference, label=f"|{pictures.sides[1]} - {pictures.sides[0]}| x {DIFFERENCE_GAIN:g}"
            ),
            pictures.metrics,
            gr.Image(value=pictures.heatmap, visible=pictures.heatmap is not None),
            gr.Image(value=pictures.mask, visible=pictures.mask is not None),
        )
