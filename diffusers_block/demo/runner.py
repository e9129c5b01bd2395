"""Baseline and accelerated runs of one pipeline on the same seed, measured the same way, one request at a time.

Why a lock and not one pipeline per session: block caching (and sparse attention) attach their hooks and cached
tensors to the pipeline instance, so two requests running at once on one pipeline would share (and corrupt) each
other's cache state. A copy per session would isolate them but multiply the model's memory by the number of
visitors. Instead every tab keeps one pipeline in a :class:`ModelSlot`, and a request holds the slot's lock for its
whole enable -> generate -> summary -> disable sequence (:func:`side_by_side`); every acceleration is disabled again
in a ``finally``, so the next request, whatever its policy, starts from the plain pipeline. Requests for the same model
wait in line (Gradio's queue shows the position); the result of a request (images, summary, numbers) is returned to
that session only and nothing of it stays on the pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .. import BlockCacheSummary, CacheConfig, block_cache_summary, disable_block_cache, enable_block_cache
from ..eval.harness import BlockWorkCounter
from ..eval.metrics import psnr, ssim

T = TypeVar("T")
Report = Callable[[tuple[int, int | None], str], None]  # (done, total or None), description


#: CPU threads for the demo's models. They are tiny (the policy: batch <= 10, 18 tokens, 256 wide; the digits
#: models: 256 wide, a few hundred tokens): split over two threads, each op costs more in synchronisation than in
#: arithmetic, and the BLAS libraries loaded beside torch (numpy's OpenBLAS and a second one) spin their idle threads.
#: On a busy 2-core machine (CPU), one policy episode of 16 environment steps at 100 DDPM steps took 113 CPU-seconds
#: with the default pools against 7.6 with one thread each, and one moving-digits clip of 10 steps took 101 s of
#: wall-clock against 14 s.
CPU_THREADS = 1


@contextmanager
def limited_threads(count: int | None) -> Iterator[None]:
    """Every thread pool (torch's OpenMP, the BLAS libraries) limited to ``count`` for the block (None: unchanged)."""
    if count is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # torch's own pool only
        threadpool_limits = None
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(count):
                yield
    finally:
        torch.set_num_threads(saved)


def cpu_threads(device: str):
    """:func:`limited_threads` to :data:`CPU_THREADS` on the CPU; unchanged on a GPU."""
    return limited_threads(CPU_THREADS if device == "cpu" else None)


class ModelSlot(Generic[T]):
    """A model shared by all sessions: loaded on first use, used by one request at a time."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._value: T | None = None
        self._lock = threading.Lock()

    @contextmanager
    def use(self) -> Iterator[T]:
        with self._lock:
            if self._value is None:
                self._value = self._load()
            yield self._value


def transformers_of(pipe) -> list[torch.nn.Module]:
    """The pipeline's denoising transformers (``transformer``, and ``transformer_2`` for Wan 2.2)."""
    return [
        module
        for name, module in pipe.components.items()
        if name.startswith("transformer") and isinstance(module, torch.nn.Module)
    ]


@contextmanager
def step_progress(pipe, report: Report | None, desc: str, expected_calls: int | None) -> Iterator[list[int]]:
    """Count the transformer calls and the batch rows they ran (yields ``[calls, rows]``) and, with a ``report``,
    call ``report((calls, expected_calls), desc)`` before each one."""
    count = [0, 0]

    def bump(_module, args, kwargs) -> None:
        count[0] += 1
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        count[1] += hidden.shape[0] if isinstance(hidden, torch.Tensor) else 1
        if report is not None:
            report((count[0] if expected_calls is None else min(count[0], expected_calls), expected_calls), desc)

    handles = [module.register_forward_pre_hook(bump, with_kwargs=True) for module in transformers_of(pipe)]
    try:
        if report is not None:
            report((0, expected_calls), desc)
        yield count
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Measured:
    """One timed generation: its output in [0, 1] on the CPU, seconds, and the block work it did."""

    output: torch.Tensor
    seconds: float
    block_work: int  # Linear calls inside the transformer blocks (the harness's BlockWorkCounter)
    transformer_calls: int
    transformer_rows: int = 0  # batch rows over all transformer calls: a CFG batch of 2N rows counts 2 per image

    def forwards_per_output(self) -> float:
        """Transformer forwards per image or clip (CFG's two branches count two, batched or not)."""
        return self.transformer_rows / max(len(self.output), 1)


def measure(
    pipe, generate: Callable[[object], torch.Tensor], report: Report | None, desc: str, expected_calls: int | None
) -> Measured:
    counters = [BlockWorkCounter(module) for module in transformers_of(pipe)]
    try:
        with step_progress(pipe, report, desc, expected_calls) as calls:
            _synchronize()
            start = time.perf_counter()
            output = generate(pipe)
            _synchronize()
            seconds = time.perf_counter() - start
    finally:
        for counter in counters:
            counter.remove()
    return Measured(output.float().cpu(), seconds, sum(c.calls for c in counters), calls[0], calls[1])


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class StudentInfo:
    """Which distilled student served the accelerated side (``diffusers_block.distill``)."""

    folder: str
    num_steps: int
    guidance_scale: float | None  # the CFG folded into the students


@dataclass
class SideBySide:
    """Baseline and accelerated runs of the same seeds, and what the cache did in the accelerated one."""

    baseline: Measured
    accelerated: Measured
    summary: BlockCacheSummary | None  # None: no block cache (sparse attention alone)
    config: CacheConfig | None
    calibration_seconds: float | None = None
    repeats: int = 1  # timed runs per side; seconds are the fastest of them
    sparse_summary: object | None = None  # SparseAttentionSummary where sparse attention was on
    sparse_config: object | None = None  # its SparseAttentionConfig
    student: StudentInfo | None = None  # the accelerated side was a distilled student, not the teacher cached

    @property
    def speedup(self) -> float:
        return self.baseline.seconds / self.accelerated.seconds

    @property
    def work_fraction(self) -> float:
        """Block work of the accelerated run relative to the baseline (1.0: nothing saved)."""
        return self.accelerated.block_work / max(self.baseline.block_work, 1)

    @property
    def psnr_db(self) -> float:
        return psnr(self.accelerated.output, self.baseline.output, 1.0, "mean").item()

    @property
    def ssim(self) -> float | None:
        """Mean SSIM of the images (video frames), or None where they are smaller than SSIM's 11x11 window."""
        a, b = _frames(self.accelerated.output), _frames(self.baseline.output)
        if a.ndim != 4 or min(a.shape[-2:]) < 11:
            return None
        return ssim(a, b, 1.0, "mean").item()


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:]) if x.ndim >= 4 else x


def side_by_side(
    pipe,
    generate: Callable[[object], torch.Tensor],
    config: CacheConfig | Callable[[object], CacheConfig] | None,
    report: Report | None = None,
    expected_calls: int | None = None,
    repeats: int = 1,
    sparse=None,
) -> SideBySide:
    """Run ``generate(pipe)`` plain, then accelerated (block cache and/or sparse attention); the caller holds the
    pipeline's lock.

    ``config`` is a cache config, or a function of the pipeline that calibrates one (BAC: one uncached run on other
    seeds, timed on its own). ``expected_calls`` is the progress total of the first runs (transformer calls in one
    generation; None shows a running count), after which the baseline's own count is used.
    ``repeats`` > 1 times each side that many times, alternating baseline and accelerated so that a machine getting
    busier or quieter affects both alike, and keeps each side's fastest time (outputs and work are the same on every
    repeat: same seeds, same schedule).
    ``sparse`` (a ``SparseAttentionConfig``) also makes self-attention block-sparse in the accelerated run; with it,
    ``config`` may be None (no block cache).
    """
    if config is None and sparse is None:
        raise ValueError("nothing to accelerate: pick a cache policy or turn sparse attention on")
    disable_block_cache(pipe)  # every request disables in its finally; this guards against a foreign caller
    calibration_seconds = None
    if callable(config) and not isinstance(config, CacheConfig):
        start = time.perf_counter()
        with step_progress(pipe, report, "calibrating the BAC schedule (uncached run, other seeds)", expected_calls):
            config = config(pipe)
        calibration_seconds = time.perf_counter() - start
    baseline = accelerated = None
    summaries: dict[str, object] = {}
    for repeat in range(repeats):
        suffix = f", run {repeat + 1} of {repeats}" if repeats > 1 else ""
        plain = measure(pipe, generate, report, f"baseline (no cache){suffix}", expected_calls)
        try:
            if config is not None:
                enable_block_cache(pipe, config)
            if sparse is not None:
                _sparse().enable_sparse_attention(pipe, sparse)
            cached = measure(pipe, generate, report, f"accelerated{suffix}", plain.transformer_calls)
            if not summaries:  # fresh arrays, owned by this request
                summaries["cache"] = block_cache_summary(pipe) if config is not None else None
                summaries["sparse"] = _sparse().sparse_attention_summary(pipe) if sparse is not None else None
        finally:
            disable_block_cache(pipe)
            if sparse is not None:
                _sparse().disable_sparse_attention(pipe)
        expected_calls = plain.transformer_calls
        baseline, accelerated = _keep_fastest(baseline, accelerated, plain, cached)
    return SideBySide(
        baseline, accelerated, summaries["cache"], config, calibration_seconds, repeats, summaries["sparse"], sparse
    )


def _keep_fastest(baseline, accelerated, plain, other):
    """The first repeat's runs, or the kept ones with each side's fastest time so far (a repeat's outputs and work
    are the same: same seeds, same schedule)."""
    if baseline is None:
        return plain, other
    baseline.seconds = min(baseline.seconds, plain.seconds)
    accelerated.seconds = min(accelerated.seconds, other.seconds)
    return baseline, accelerated


def _sparse():
    """The package, for its sparse-attention functions (present only in installs that have the feature)."""
    import diffusers_block

    return diffusers_block


def teacher_and_student(
    pipe,
    teacher_run: Callable[[object], torch.Tensor],
    student_run: Callable[[object], torch.Tensor],
    student,
    folder: str,
    report: Report | None = None,
    expected_calls: int | None = None,
    repeats: int = 1,
) -> SideBySide:
    """The teacher (``teacher_run(pipe)``, its own steps and CFG) against the distilled ``student`` (a
    ``BlockwiseFlowModel``) serving the same pipeline (``student_run(pipe)``, at ``student.num_steps``); the caller
    holds the pipeline's lock. Timed like :func:`side_by_side` (alternating, fastest of ``repeats`` kept); the
    student is disabled in a ``finally``, so the next request gets the teacher exactly."""
    from ..distill import disable_blockwise_flow, enable_blockwise_flow

    disable_block_cache(pipe)
    disable_blockwise_flow(pipe)
    baseline = accelerated = None
    for repeat in range(repeats):
        suffix = f", run {repeat + 1} of {repeats}" if repeats > 1 else ""
        plain = measure(pipe, teacher_run, report, f"teacher{suffix}", expected_calls)
        try:
            enable_blockwise_flow(pipe, student)
            distilled = measure(
                pipe, student_run, report, f"distilled student ({student.num_steps} steps){suffix}", student.num_steps
            )
        finally:
            disable_blockwise_flow(pipe)
        expected_calls = plain.transformer_calls
        baseline, accelerated = _keep_fastest(baseline, accelerated, plain, distilled)
    info = StudentInfo(folder, student.num_steps, student.config.guidance_scale)
    return SideBySide(baseline, accelerated, None, None, None, repeats, student=info)
