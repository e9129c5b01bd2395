"""Images tab: the shipped class-conditioned digits model, baseline and block-cached on the same seed.

The model (``models/digits-image``, a 10-block SD3 transformer) loads offline and runs on the CPU in seconds, so
anyone can see what each cache policy saves and what it costs: the two image grids and their difference, the
steps x blocks heatmap, wall-clock and speed-up, block work saved, PSNR / SSIM against the baseline, and the shipped
digit classifier's accuracy on both. Where the distilled student ships (``models/digits-image-distilled``), the tab
also sets the teacher at its steps beside the student at its own few steps, measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import torch

from ..eval.classifier import DigitClassifier
from ..eval.digits import balanced_labels, class_accuracy, generate_digits
from ..zoo import load_digits_image_pipeline, model_path
from . import render
from .checks import check_repeats, check_seed, check_steps
from .controls import (
    CacheSettings,
    accelerations,
)
from .page import DIFFERENCE_GAIN, ComparisonView, acceleration_inputs, in_page, reporter
from .runner import ModelSlot, Report, SideBySide, cpu_threads, side_by_side, teacher_and_student
from .sparse import SPARSE_OFF, SparseSettings, mask_image
from .student import Student

MAX_PER_DIGIT = 5
MAX_COLUMNS = 5  # digits per row of a grid
CALIBRATION_SEED_OFFSET = 1000  # BAC calibrates on other seeds (and one of each digit) than the images shown


@dataclass(frozen=True)
class DigitsRequest:
    digits: tuple[int, ...] = tuple(range(10))
    per_digit: int = 1
    steps: int = 50
    seed: int = 0
    guidance: float = 3.0
    repeats: int = 1  # timed runs per side

    def checked(self) -> DigitsRequest:
        """The same request with every field checked, or a ``gr.Error`` naming the field and its range."""
        digits = tuple(sorted({int(d) for d in self.digits}))
        if not digits:
            raise gr.Error("Pick at least one digit to draw.")
        if digits[0] < 0 or digits[-1] > 9:
            raise gr.Error(f"Digits must be in 0..9, got {list(digits)}.")
        per_digit = self.per_digit
        if isinstance(per_digit, bool) or per_digit is None or not 1 <= per_digit <= MAX_PER_DIGIT:
            raise gr.Error(f"Images per digit must be in [1, {MAX_PER_DIGIT}], got {per_digit!r}.")
        guidance = self.guidance
        if guidance is None or not 1.0 <= float(guidance) <= 20.0:
            raise gr.Error(
                f"Guidance scale must be in [1, 20] (1 turns classifier-free guidance off), got {guidance!r}."
            )
        return DigitsRequest(
            digits,
            int(per_digit),
            check_steps(self.steps),
            check_seed(self.seed),
            float(guidance),
            check_repeats(self.repeats),
        )

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.digits).repeat(self.per_digit)


@dataclass
class DigitsResult:
    request: DigitsRequest
    comparison: SideBySide
    baseline_accuracy: float
    accelerated_accuracy: float
    pictures: render.Pictures


@dataclass
class _DigitsModel:
    pipe: object
    encoder: object
    classifier: DigitClassifier
    student: Student | None  # the distilled student, where it ships


class DigitsImageTab:
    """One digits pipeline for all sessions, in a :class:`ModelSlot` (see ``runner`` for why)."""

    key = "image"
    title = "Images (digits model)"
    student_model = "digits-image-distilled"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.slot = ModelSlot(self._load)

    def _load(self) -> _DigitsModel:
        pipe, encoder = load_digits_image_pipeline(device=self.device)
        pipe.set_progress_bar_config(disable=True)
        classifier = DigitClassifier.from_pretrained(model_path("digit-classifier"))
        classifier = classifier.to(self.device).eval()
        generate_digits(pipe, encoder, torch.tensor([0]), 2)  # warm-up, so the first timed run is not the slowest
        return _DigitsModel(pipe, encoder, classifier, Student.find(self.student_model, self.device))

    def generate(
        self,
        request: DigitsRequest,
        settings: CacheSettings,
        report: Report | None = None,
        sparse: SparseSettings = SPARSE_OFF,
        distilled: bool = False,
    ) -> DigitsResult:
        """Baseline and accelerated images of ``request`` with the cache ``settings`` (and ``sparse`` attention), and
        everything measured; ``distilled``: the teacher against the distilled student instead (settings unused)."""
        request = request.checked()
        labels = request.labels
        # Both runs read `model`, which is bound below once this request holds the model's lock.

        def run(pipe) -> torch.Tensor:
            return generate_digits(pipe, model.encoder, labels, request.steps, request.guidance, seed=request.seed)

        def calibration_run(pipe) -> torch.Tensor:
            return generate_digits(
                pipe,
                model.encoder,
                balanced_labels(1),
                request.steps,
                request.guidance,
                seed=request.seed + CALIBRATION_SEED_OFFSET,
            )

        def student_run(pipe) -> torch.Tensor:  # CFG folded into the student: one forward a step, no CFG batch
            return generate_digits(pipe, model.encoder, labels, model.student.num_steps, 1.0, seed=request.seed)

        if distilled:
            config = sparse_config = None
        else:
            config, sparse_config = accelerations(settings, sparse, request.steps, calibration_run)
        with self.slot.use() as model, cpu_threads(self.device):
            if distilled:
                student = Student.required(model.student, self.student_model)
                result = teacher_and_student(
                    model.pipe, run, student_run, student.model, student.folder, report, request.steps, request.repeats
                )
            else:
                result = side_by_side(model.pipe, run, config, report, request.steps, request.repeats, sparse_config)
            accuracy = [
                class_accuracy(model.classifier, measured.output.to(self.device), labels.to(self.device))
                for measured in (result.baseline, result.accelerated)
            ]
        metrics = render.metrics_table(
            result,
            self.device,
            [("classifier accuracy (shipped CNN)", f"{accuracy[0]:.0%}", f"{accuracy[1]:.0%}")],
        )
        pictures = render.pictures(
            result.baseline.output,
            result.accelerated.output,
            result,
            metrics,
            columns=min(len(request.digits), MAX_COLUMNS),
            cell=96,
            gain=DIFFERENCE_GAIN,
            title=render.heatmap_title(settings.label, result),
            mask=mask_image(result.sparse_summary, sparse.layer, sparse.head) if result.sparse_summary else None,
        )
        if distilled:
            pictures.sides = ("teacher", f"distilled student ({result.student.num_steps} steps)")
        return DigitsResult(request, result, accuracy[0], accuracy[1], pictures)

    # -- page ---------------------------------------------------------------------------------------------------
    def build(self) -> None:
        """The tab's widgets and events; called inside an open ``gr.Tab``."""
        k = self.key
        gr.Markdown(
            "The class-conditioned digits model shipped in `models/digits-image` (10-block SD3 transformer, "
            "50 steps, loaded offline). Both columns use the same seed; only the acceleration differs: the block "
            "cache (and sparse attention) on the same model, or, with *distilled student*, the teacher at its steps "
            "with CFG beside the student shipped in `models/digits-image-distilled` at its own few steps."
        )
        with gr.Row():
            with gr.Column(scale=2):
                digits = gr.CheckboxGroup(
                    [str(d) for d in range(10)],
                    value=[str(d) for d in range(10)],
                    label="digits to draw",
                    elem_id=f"{k}-digits",
                )
                with gr.Row():
                    per_digit = gr.Slider(1, MAX_PER_DIGIT, value=1, step=1, label="images per digit")
                    steps = gr.Slider(2, 200, value=50, step=1, label="steps", elem_id=f"{k}-steps")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", elem_id=f"{k}-seed")
                    guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="guidance scale (CFG)")
                inputs = acceleration_inputs(k, self.device, self.student_model)
            with gr.Column(scale=3):
                view = ComparisonView(k, DIFFERENCE_GAIN)
                view.add_mask()
        view.add_heatmap("cache heatmap: steps x blocks (blue: computed, orange: reused)")

        def on_generate(values: dict, progress=gr.Progress()):  # noqa: B008 (Gradio injects the bar this way)
            request = DigitsRequest(
                digits=tuple(int(d) for d in values[digits]),
                per_digit=values[per_digit],
                steps=values[steps],
                seed=values[seed],
                guidance=values[guidance],
                repeats=values[inputs.repeats],
            )
            result = in_page(
                lambda: self.generate(
                    request,
                    inputs.controls.settings(values),
                    reporter(progress),
                    inputs.sparse_settings(values),
                    inputs.distilled(values),
                )
            )
            return view.values(result.pictures)

        inputs.button.click(
            on_generate,
            inputs={digits, per_digit, steps, seed, guidance, *inputs.components},
            outputs=view.outputs,
        )
