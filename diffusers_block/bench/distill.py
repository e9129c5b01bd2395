"""Distilled segment students against the teacher and same-budget baselines: forwards, FLOPs, quality, time.

One run, the same labels and seeds for every row, on a shipped digits model (``--model digits-image`` or
``digits-video``): the teacher at ``--reference-steps`` (50) Euler steps with CFG (the reference, two forwards a
step); each student in ``--students``; and, at each student's forward budget, the teacher with CFG on Euler,
UniPC and DPM-Solver++ (diffusers' own schedulers, flow sigmas), and the teacher with our block cache (a static
every-other-step schedule at twice the steps, so its block work matches the budget). Per row: transformer
forwards and FLOPs per sample (counted with torch's FlopCounterMode around the transformer), the digit
classifier's accuracy (per frame, and motion accuracy for video), a digit FID (Fréchet distance in the
classifier's feature space to real test digits), PSNR / SSIM to the reference at the same seed, and the median
wall-clock of ``--repeats`` runs taken round-robin over the rows (``--repeats 0``: quality only, each row generated
once and not timed, half the work, for CPU runs). Prints a table, writes JSON (and with ``--plot`` FLOPs vs FID).
``--architecture`` times the student schedules on a real-size architecture instead (:mod:`.distill_timing`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch.utils.flop_counter import FlopCounterMode

from .. import StaticScheduleConfig, disable_block_cache, enable_block_cache
from ..data.digits import load_digit_images, make_moving_digits
from ..distill import BlockwiseFlowModel, disable_blockwise_flow, enable_blockwise_flow, load
from ..eval.classifier import DigitClassifier
from ..eval.digits import balanced_clip_labels, balanced_labels, generate_clips, generate_digits, motion_accuracy
from ..eval.metrics import frechet_distance, psnr, ssim
from ..zoo import load_digits_image_pipeline, load_digits_video_pipeline, model_path
from . import report
from .architectures import ARCHITECTURES
from .cache import round_robin_seconds
from .distill_timing import timing

MODELS = ("digits-image", "digits-video")  # shipped teachers, found by zoo.locate.model_path
STUDENTS = {model: f"{model}-distilled" for model in MODELS}  # their shipped students, found the same way
SOLVERS = {
    "euler": lambda: FlowMatchEulerDiscreteScheduler(shift=1.0),
    "unipc": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0),
    "dpmsolver++": lambda: DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, algorithm_type="dpmsolver++"
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits-image", choices=MODELS)
    parser.add_argument("--students", nargs="*", help="distilled student folders (default: the shipped one)")
    parser.add_argument("--classifier", help="classifier folder (default: the shipped one)")
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, help="teacher CFG (default: 3 image, 5 video)")
    parser.add_argument("--per-class", type=int, default=50, help="images per digit, or clips per (digit, motion)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; 0: quality only, untimed")
    parser.add_argument(
        "--seed", type=int, default=0, help="noise seed of every row (generation batch b uses seed + b)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", help="results file name (default: distill-<model>)")
    parser.add_argument("--plot", action="store_true", help="also draw FLOPs vs digit FID next to the JSON")
    parser.add_argument(
        "--architecture",
        choices=sorted(ARCHITECTURES),
        help="timing only, random weights: 50-step CFG dense against student schedules (+ sparse attention + cache)",
    )
    parser.add_argument("--keep", type=int, help="--architecture: blocks each student keeps (default: 4/5 of them)")


@dataclass
class Row:
    name: str
    forwards: float  # transformer forwards per sample (a CFG step is two)
    gflops: float  # transformer GFLOPs per sample
    flops_ratio: float  # reference FLOPs / this row's
    accuracy: float
    fid: float
    psnr_db: float
    ssim: float
    seconds: float | None  # None under --repeats 0
    speedup: float | None
    motion_accuracy: float | None = None


class TransformerFlops:
    """FLOPs of every call of ``module`` (and whatever it routes to), counted by FlopCounterMode inside its hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.flops = 0
        self._mode = None
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_):
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def _exit(self, *_):
        self._mode.__exit__(None, None, None)
        self.flops += self._mode.get_total_flops()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Workload:
    """The shipped model, its evaluation labels, real test digits and generate(steps, guidance, labels)."""

    def __init__(self, args) -> None:
        self.video = args.model == "digits-video"
        if self.video:
            self.pipe, self.encoder = load_digits_video_pipeline(device=args.device)
            self.digits, self.motions = balanced_clip_labels(args.per_class)
            self.labels = self.digits
            clips, _ = make_moving_digits(len(self.digits), "test", frames=17, size=32, seed=0)
            self.real = (clips + 1) / 2
            self.guidance = 5.0 if args.guidance is None else args.guidance
        else:
            self.pipe, self.encoder = load_digits_image_pipeline(device=args.device)
            self.labels = balanced_labels(args.per_class)
            self.real = (load_digit_images("test", 32)[0] + 1) / 2
            self.guidance = 3.0 if args.guidance is None else args.guidance
        self.pipe.set_progress_bar_config(disable=True)
        self.seed = args.seed

    def generate(self, steps: int, guidance: float, count: int | None = None) -> torch.Tensor:
        if self.video:
            d, m = self.digits[:count], self.motions[:count]
            return generate_clips(self.pipe, self.encoder, d, m, steps, guidance, seed=self.seed)
        return generate_digits(self.pipe, self.encoder, self.labels[:count], steps, guidance, seed=self.seed)


@dataclass(frozen=True)
class _Setting:
    """One row's sampler: ``steps`` at ``guidance`` while ``active()`` holds (a student served, a solver, a cache)."""

    name: str
    steps: int
    guidance: float
    active: Callable[[], AbstractContextManager] = nullcontext


@contextmanager
def _serving(pipe, student: BlockwiseFlowModel):
    enable_blockwise_flow(pipe, student)
    try:
        yield
    finally:
        disable_blockwise_flow(pipe)


@contextmanager
def _scheduler(pipe, make: Callable):
    teacher_scheduler, pipe.scheduler = pipe.scheduler, make()
    try:
        yield
    finally:
        pipe.scheduler = teacher_scheduler


@contextmanager
def _static_cache(pipe):
    enable_block_cache(pipe, StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=0))
    try:
        yield
    finally:
        disable_block_cache(pipe)


def _generated(work: _Workload, setting: _Setting) -> tuple[torch.Tensor, float]:
    """The whole batch's output and the transformer FLOPs per sample (counted on two samples), untimed."""
    with setting.active():
        counter = TransformerFlops(work.pipe.transformer)
        try:
            work.generate(setting.steps, setting.guidance, count=2)
        finally:
            counter.remove()
        output = work.generate(setting.steps, setting.guidance)
    return output.float().cpu(), counter.flops / 2


def _round_robin_seconds(work: _Workload, settings: list[_Setting], repeats: int) -> dict[str, float | None]:
    """Median seconds of ``repeats`` runs of each setting, taken in turns rather than row after row: at a few
    milliseconds a call, the machine's load drifts enough to favour whichever row ran in a quiet minute."""
    runs = {setting.name: partial(work.generate, setting.steps, setting.guidance) for setting in settings}
    contexts = {setting.name: setting.active for setting in settings}
    times = round_robin_seconds(runs, repeats, work.pipe.device, contexts)
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def run(args) -> dict:
    if args.repeats < 0 or (args.architecture and args.repeats == 0):
        raise SystemExit(
            f"--repeats {args.repeats}: give a count of timed runs (>= 1), or 0 for quality only (not with --architecture, "
            "which only times)"
        )
    if args.architecture:
        return timing(args)
    work = _Workload(args)
    device = torch.device(args.device)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier", args.classifier)).to(device).eval()
    real_features = classifier.embed(work.real * 2 - 1)
    pipe = work.pipe

    settings = [_Setting(f"teacher-{args.reference_steps}-cfg", args.reference_steps, work.guidance)]
    for path in args.students or [model_path(STUDENTS[args.model])]:
        student = load(path)
        settings.append(
            _Setting(f"student-{Path(path).name}", student.num_steps, 1.0, partial(_serving, pipe, student))
        )
    generated = {setting.name: _generated(work, setting) for setting in settings}
    reference, reference_flops = generated[settings[0].name]
    forward_flops = reference_flops / (2 * args.reference_steps)
    budgets = {generated[student.name][1] / forward_flops for student in settings[1:]}

    # a student whose trunk runs at a segment's first step only has a fractional budget: baselines by whole steps,
    # each step count once
    baselines = []
    for steps in sorted({max(1, round(budget / 2)) for budget in budgets}):  # CFG: two forwards a step
        for solver, make in SOLVERS.items():
            active = partial(_scheduler, pipe, make)
            baselines.append(_Setting(f"teacher-{solver}-{steps}-cfg", steps, work.guidance, active))
    # every other step computed: about `budget` forwards of block work
    for cache_steps in sorted({max(2, round(budget)) for budget in budgets}):
        active = partial(_static_cache, pipe)
        baselines.append(_Setting(f"teacher-cache-static2-{cache_steps}-cfg", cache_steps, work.guidance, active))
    generated.update({setting.name: _generated(work, setting) for setting in baselines})
    settings += baselines
    seconds = _round_robin_seconds(work, settings, args.repeats)
    reference_seconds = seconds[settings[0].name]

    rows = []
    for setting in settings:
        output, flops = generated[setting.name]
        frames = output.reshape(-1, *output.shape[-3:])
        rows.append(
            Row(
                name=setting.name,
                forwards=flops / forward_flops,
                gflops=flops / 1e9,
                flops_ratio=reference_flops / flops,
                accuracy=classifier.accuracy(output * 2 - 1, work.labels),
                fid=frechet_distance(classifier.embed(output * 2 - 1), real_features),
                psnr_db=psnr(output, reference, data_range=1.0, reduction="mean").item(),
                ssim=ssim(frames, reference.reshape(frames.shape), data_range=1.0, reduction="mean").item(),
                seconds=seconds[setting.name],
                speedup=None if seconds[setting.name] is None else reference_seconds / seconds[setting.name],
                motion_accuracy=motion_accuracy(output, work.motions) if work.video else None,
            )
        )

    dicts = [asdict(r) for r in rows]
    columns = [
        ("name", "run", str),
        ("forwards", "forwards", lambda v: f"{v:.1f}"),
        ("flops_ratio", "FLOPs saved", lambda v: f"{v:.1f}x"),
        ("accuracy", "accuracy", lambda v: f"{v:.1%}"),
        ("fid", "digit FID", lambda v: f"{v:.3f}"),
        ("psnr_db", "PSNR dB", lambda v: f"{v:.2f}"),
        ("ssim", "SSIM", lambda v: f"{v:.4f}"),
        ("seconds", "s / run", lambda v: f"{v:.3f}"),
        ("speedup", "speed-up", lambda v: f"{v:.2f}x"),
    ]
    if work.video:
        columns.insert(4, ("motion_accuracy", "motion", lambda v: f"{v:.1%}"))
    report.print_table(dicts, columns)
    payload = {
        "benchmark": "distill",
        "environment": report.environment(device),
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "samples": len(work.labels),
        "reference_forward_gflops": forward_flops / 1e9,
        "results": dicts,
    }
    path = report.write_json(report.result_path(args.out, args.name or f"distill-{args.model}", device), payload)
    if args.plot:
        _plot(dicts, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["gflops"], r["fid"], label=r["name"])
    ax.set_xscale("log")
    ax.set_xlabel("transformer GFLOPs per sample (log)")
    ax.set_ylabel("digit FID (lower is better)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
