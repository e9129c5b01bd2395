"""The quality harness: the same seeds through a reference and an accelerated configuration, side by side.

Every speed claim of this repo is paired with what it costs: fidelity to the unaccelerated output (PSNR, SSIM,
relative L2 on the decoded images, in [0, 1]), the task metric (the shipped digit classifier's accuracy on the
labels that were asked for), the work saved (fraction of block evaluations computed) and the wall-clock speed-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..cache import block_cache_summary
from .metrics import psnr, relative_l2, ssim


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
    seconds: float
    reference_seconds: float
    speedup: float
    fraction_computed: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(generate: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    times, output = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = generate()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return output, statistics.median(times)


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
    generate(pipe)  # warm-up: kernels, allocator, lazy init
    reference, reference_seconds = _timed(lambda: generate(pipe), repeats)
    reference = reference.float().cpu()
    reference_accuracy = _accuracy(classifier, reference, labels)
    results = []
    for acceleration in accelerations:
        acceleration.enable(pipe)
        try:
            generate(pipe)
            output, seconds = _timed(lambda: generate(pipe), repeats)
            fraction = _fraction_computed(pipe)
        finally:
            acceleration.disable(pipe)
        output = output.float().cpu()
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
                speedup=reference_seconds / seconds,
                fraction_computed=fraction,
            )
        )
    return results


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-3:])


def _accuracy(classifier, images01: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if classifier is None or labels is None:
        return None
    return classifier.accuracy(images01 * 2 - 1, labels.cpu())


def _fraction_computed(pipe) -> float | None:
    try:
        return block_cache_summary(pipe).fraction_computed
    except RuntimeError:  # not a diffusers-block cache (e.g. one of diffusers' own)
        return None
