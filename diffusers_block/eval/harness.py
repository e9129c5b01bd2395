"""The quality harness: the same seeds through a reference and an accelerated configuration, side by side.

Every speed claim of this repo is paired with what it costs: fidelity to the unaccelerated output (PSNR, SSIM,
relative L2 on the decoded images, in [0, 1]), the task metric (the shipped digit classifier's accuracy on the
labels that were asked for, per frame for videos, and the videos' temporal consistency), the work saved (fraction of block evaluations computed) and the wall-clock speed-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..models import resolve_adapter
from .metrics import psnr, relative_l2, ssim, temporal_consistency


@dataclass
class Acceleration:
    """How to switch one acceleration on and off on a pipeline."""

    name: str
    enable: Callable[[object], None]
    disable: Callable[[object], None]


@dataclass
class Comparison:
    name: str
    psnr_db: float
    ssim: float
    relative_l2: float
    accuracy: float | None
    reference_accuracy: float | None
    seconds: float | None  # None: untimed (repeats=0) or failed
    reference_seconds: float | None
    speedup: float | None
    fraction_computed: float  # block work done, relative to the reference (Linear calls inside blocks)
    error: str | None = None  # the acceleration failed on this pipeline: why
    temporal_consistency: float | None = None  # videos only: 1 - mean |frame change| (data range 1)
    reference_temporal_consistency: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class BlockWorkCounter:
    """Counts the Linear layers run inside the transformer blocks: the work done, whatever a cache reports.

    It counts the same way for every cache, ours and the peers', which is what makes fractions comparable.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls = 0
        self._handles = [
            module.register_forward_pre_hook(self._bump)
            for ref in resolve_adapter(transformer).blocks
            for module in ref.module.modules()
            if isinstance(module, torch.nn.Linear)
        ]

    def _bump(self, *_) -> None:
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _measure(pipe, generate: Callable[[object], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float | None, int]:
    """An untimed warm-up run that counts the block work, then ``repeats`` timed runs: output, median s, work.

    ``repeats=0`` times nothing (seconds None) and returns the warm-up run's output: fidelity and work only."""
    counter = BlockWorkCounter(pipe.transformer)
    try:
        warmup = generate(pipe)
    finally:
        counter.remove()
    if repeats == 0:
        return warmup.float().cpu(), None, counter.calls
    times, output = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = generate(pipe)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return output.float().cpu(), statistics.median(times), counter.calls


def compare(
    pipe,
    generate: Callable[[object], torch.Tensor],
    accelerations: list[Acceleration],
    labels: torch.Tensor | None = None,
    classifier=None,
    repeats: int = 3,
) -> list[Comparison]:
    """``generate(pipe)`` returns images (B, C, H, W) or videos (B, T, C, H, W) in [0, 1] from fixed seeds.

    The reference runs first, with no acceleration; then each acceleration is enabled, run and disabled again.
    """
    reference, reference_seconds, reference_work = _measure(pipe, generate, repeats)
    reference_accuracy = _accuracy(classifier, reference, labels)
    results = []
    for acceleration in accelerations:
        try:
            acceleration.enable(pipe)
            output, seconds, work = _measure(pipe, generate, repeats)
        except Exception as error:  # a peer that cannot run this model is a result too, not a crash
            results.append(_failed(acceleration.name, error, reference_accuracy, reference_seconds))
            continue
        finally:
            acceleration.disable(pipe)
        results.append(
            Comparison(
                name=acceleration.name,
                psnr_db=psnr(output, reference, data_range=1.0, reduction="mean").item(),
                ssim=ssim(_frames(output), _frames(reference), data_range=1.0, reduction="mean").item(),
                relative_l2=relative_l2(output, reference, reduction="mean").item(),
                accuracy=_accuracy(classifier, output, labels),
                reference_accuracy=reference_accuracy,
                seconds=seconds,
                reference_seconds=reference_seconds,
                speedup=None if seconds is None else reference_seconds / seconds,
                fraction_computed=work / reference_work,
                temporal_consistency=_consistency(output),
                reference_temporal_consistency=_consistency(reference),
            )
        )
    return results


def _failed(name: str, error: Exception, reference_accuracy, reference_seconds: float | None) -> Comparison:
    nan = float("nan")
    return Comparison(
        name,
        nan,
        nan,
        nan,
        None,
        reference_accuracy,
        None,
        reference_seconds,
        None,
        nan,
        error=f"{type(error).__name__}: {error}",
    )


def _consistency(x: torch.Tensor) -> float | None:
    return temporal_consistency(x, data_range=1.0, reduction="mean").item() if x.ndim == 5 else None


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:])


def _accuracy(classifier, images01: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if classifier is None or labels is None:
        return None
    return classifier.accuracy(images01 * 2 - 1, labels.cpu())
