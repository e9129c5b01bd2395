"""Pictures and tables for the page, drawn from the measured data (tensors, summaries, numbers)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import BlockCacheSummary
from .._extras import pyplot
from .runner import SideBySide


def image_grid(images: torch.Tensor, columns: int, cell: int = 96) -> Image.Image:
    """(N, C, H, W) in [0, 1], C in {1, 3}, as one picture of ``columns`` per row, each image scaled to ``cell``
    pixels high with nearest-neighbour resampling (small images stay crisp)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = torch.ones(rows * columns, c, h, w)
    canvas[:n] = images.float().clamp(0, 1)
    grid = canvas.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    pixels = (grid.numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if c == 1 else pixels, "L" if c == 1 else "RGB")
    scale = max(1, cell // h)
    return picture.resize((columns * w * scale, rows * h * scale), Image.NEAREST)


def difference(a: torch.Tensor, b: torch.Tensor, gain: float) -> torch.Tensor:
    """|a - b| x gain, clipped to [0, 1]: where the accelerated output departs from the baseline."""
    return ((a.float() - b.float()).abs() * gain).clamp(0, 1)


def heatmap(summary: BlockCacheSummary, title: str) -> Image.Image:
    """The steps x units cache heatmap of the first CFG branch (``BlockCacheSummary.plot``), as a picture."""
    with tempfile.TemporaryDirectory() as folder:
        path = summary.plot(Path(folder) / "heatmap.png", branch=0, title=title)
        with Image.open(path) as picture:
            return picture.convert("RGB")


def heatmap_title(policy: str, result: SideBySide) -> str:
    if result.summary is None:
        return ""
    return f"{policy}\n{result.summary.fraction_computed:.0%} of units computed (blue), reused (orange)"


def skipped_work(result: SideBySide) -> bool:
    """Whether the accelerated run left out any work: blocks reused, attention blocks dropped, or fewer forwards
    (a student). Where it did not, a wall-clock difference is timing noise, not a speed-up."""
    if result.student is not None:
        return True
    if result.work_fraction < 1:
        return True
    sparse = result.sparse_summary
    return sparse is not None and sparse.overall_density < 1


def speedup_cell(result: SideBySide) -> str:
    """The speed-up, bold only where work was skipped; otherwise named as the noise it is."""
    if skipped_work(result):
        return f"**{result.speedup:.2f}x**"
    return f"{result.speedup:.2f}x (no blocks skipped: timing noise)"


def metrics_table(result: SideBySide, device: str, extra: list[tuple[str, str, str]] = ()) -> str:
    """The numbers of a side-by-side run as a Markdown table (baseline | accelerated), then the configs used."""
    from .controls import describe

    base, fast = result.baseline, result.accelerated
    ssim = result.ssim
    student = result.student
    rows = [
        ("wall-clock", f"{base.seconds:.2f} s", f"{fast.seconds:.2f} s"),
        ("speed-up", "1.00x", speedup_cell(result)),
    ]
    if student is not None:
        rows.append(
            (
                "transformer forwards per image (CFG counts 2)",
                f"{base.forwards_per_output():.0f}",
                f"{fast.forwards_per_output():.0f} ({student.num_steps} steps, CFG folded in)",
            )
        )
    else:
        rows.append(
            (
                "block work (Linear calls inside blocks)",
                "100%",
                f"{result.work_fraction:.1%} ({_bold_if(1 - result.work_fraction > 0, f'{1 - result.work_fraction:.1%} saved')})",
            )
        )
    if result.summary is not None:
        summary = result.summary
        rows.append(
            (
                "cache-unit evaluations computed",
                "100%",
                f"{summary.fraction_computed:.1%} ({summary.fraction_saved:.1%} reused)",
            )
        )
    if result.sparse_summary is not None:
        sparse = result.sparse_summary
        rows += [
            ("attention key blocks kept (sparse steps)", "100%", f"{sparse.sparse_density:.1%}"),
            ("attention kept overall (dense steps count 100%)", "100%", f"{sparse.overall_density:.1%}"),
        ]
    against = "teacher" if student is not None else "baseline"
    rows += [
        (f"PSNR vs {against}", "inf", _db(result.psnr_db)),
        (f"SSIM vs {against}", "1", "n/a (images under 11 px)" if ssim is None else f"{ssim:.4f}"),
        *extra,
    ]
    if result.calibration_seconds is not None:
        rows.append(("BAC calibration (one uncached run, other seeds)", "", f"{result.calibration_seconds:.2f} s"))
    header = "| | teacher | distilled student |" if student is not None else "| | baseline | accelerated |"
    lines = [header, "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    runs = "One run per side" if result.repeats == 1 else f"Fastest of {result.repeats} alternating runs per side"
    exact = "forwards are exact" if student is not None else "block work is exact"
    lines.append(f"\n{runs} on `{device}`, same seed. Wall-clock on a busy machine is noisy; {exact}.")
    if student is not None:
        guidance = "none" if student.guidance_scale is None else f"{student.guidance_scale:g}"
        lines.append(
            f"\nDistilled student: `diffusers_block.distill.load({student.folder!r})`, {student.num_steps} steps, "
            f"one forward a step (CFG {guidance} folded in during training); the teacher runs its own steps with CFG."
        )
        return "\n".join(lines)
    lines.append(f"\nCache: `{describe(result.config) if result.config is not None else 'none'}`")
    if result.sparse_config is not None:
        c = result.sparse_config
        lines.append(
            f"\nSparse attention: `SparseAttentionConfig(threshold={c.threshold}, block_size={c.block_size}, "
            f"dense_steps={c.dense_steps}, refresh_interval={c.refresh_interval}, min_tokens={c.min_tokens})`"
        )
    return "\n".join(lines)


def _bold_if(condition: bool, text: str) -> str:
    return f"**{text}**" if condition else text


def _db(value: float) -> str:
    return "inf (identical)" if math.isinf(value) else f"{value:.2f} dB"


@dataclass
class Pictures:
    """What a tab shows for one side-by-side run (heatmap and mask: None where that acceleration was off)."""

    baseline: Image.Image | str  # a picture, or the path of an animation (GIF)
    accelerated: Image.Image | str
    difference: Image.Image | str
    heatmap: Image.Image | None
    mask: Image.Image | None
    metrics: str
    sides: tuple[str, str] = ("baseline (no cache)", "accelerated")  # the two pictures' labels


def pictures(
    baseline: torch.Tensor,
    accelerated: torch.Tensor,
    result: SideBySide,
    metrics: str,
    *,
    columns: int,
    cell: int,
    gain: float,
    title: str,
    mask: Image.Image | None = None,
) -> Pictures:
    """Grids of the two outputs (N, C, H, W) and of their amplified difference, and the cache heatmap."""
    return Pictures(
        image_grid(baseline, columns, cell),
        image_grid(accelerated, columns, cell),
        image_grid(difference(accelerated, baseline, gain), columns, cell),
        None if result.summary is None else heatmap(result.summary, title),
        mask,
        metrics,
    )


def trajectories(
    runs: list[tuple[str, list[np.ndarray], list[np.ndarray], list[bool]]], goals: list[np.ndarray], title: str
) -> Image.Image:
    """Gripper (solid) and object (dotted) paths of every episode, one colour per run, goals as stars: a top view
    (x-y) and a side view (x-z), so that a miss in height shows. Each episode's end is a dot if it succeeded and a
    cross if it failed.

    ``runs``: (label, gripper paths, object paths, success per episode), each path (steps, 3); the robot's closed
    loop drawn from the observations, since the simulator renders no frames here (MuJoCo rendering is off on a
    headless CPU).
    """
    import io

    plt = pyplot()

    colours = ("#3b6ea5", "#f4a259")
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.4))
    for ax, (other, name) in zip(axes, ((1, "y"), (2, "z"))):
        for (label, hands, objects, success), colour in zip(runs, colours):
            for i, (hand, obj) in enumerate(zip(hands, objects)):
                first = i == 0 and other == 1
                ax.plot(
                    hand[:, 0], hand[:, other], "-", color=colour, lw=1.6, label=f"{label}: gripper" if first else None
                )
                ax.plot(
                    obj[:, 0], obj[:, other], ":", color=colour, lw=1.6, label=f"{label}: object" if first else None
                )
                ax.plot(
                    hand[-1, 0], hand[-1, other], "o" if success[i] else "X", color=colour, ms=5 if success[i] else 9
                )
        for i, goal in enumerate(goals):
            ax.plot(goal[0], goal[other], "*", color="#2a9d3f", ms=12, label="goal" if i == 0 and other == 1 else None)
        ax.set_xlabel("x (m)")
        ax.set_ylabel(f"{name} (m)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"{'top view' if other == 1 else 'side view'} (x-{name})", fontsize=9)
    axes[0].plot([], [], "o", color="grey", ms=5, label="end: succeeded")
    axes[0].plot([], [], "X", color="grey", ms=9, label="end: failed")
    fig.suptitle(title, fontsize=10)
    fig.legend(fontsize=7, loc="center right")  # beside the axes: never over a path
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as picture:
        return picture.convert("RGB")
