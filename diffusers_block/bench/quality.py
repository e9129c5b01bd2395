"""Cache policies against the uncached output on a trained model: fidelity, task accuracy, work and time.

On a shipped digits model (``--model digits-image``: the class-conditioned SD3-architecture image model;
``--model digits-video``: the digit- and motion-conditioned Wan video model, 17 frames), the
same labels and seeds go through the uncached pipeline and through each cache: ours (BWCache thresholds, per block or per model call, static
schedules, BAC schedules calibrated per block or shared by all blocks) and, side by side, diffusers'
FirstBlockCache, TaylorSeerCache and MagCache. BAC and MagCache are calibrated on the same run, with other labels
and seeds than the evaluated ones. For each: PSNR / SSIM / relative L2 against the uncached images, the digit classifier's
accuracy, the fraction of block work computed (Linear calls inside blocks, counted the same way for every cache)
and the wall-clock speed-up. Prints a table, draws speed-up vs PSNR, writes JSON.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import torch

from .. import BWCacheConfig, StaticScheduleConfig, cache_context
from .._extras import pyplot
from ..cache.apply import default_cache_config
from ..cache.bac import record_features, schedule_from_features, uncached_output
from ..cache.tuning import candidate_name, tune_schedule_from_features
from ..data.digits import MOTIONS
from ..eval.classifier import DigitClassifier
from ..eval.digits import balanced_clip_labels, balanced_labels, generate_clips, generate_digits
from ..eval.harness import compare
from ..zoo import load_digits_image_pipeline, load_digits_video_pipeline, model_path
from . import peers, report

MODELS = ("digits-image", "digits-video")  # shipped, found by zoo.locate.model_path
MAGCACHE_THRESHOLDS = (0.02, 0.06, 0.12, 0.24)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="digits-image", help=f"one of {sorted(MODELS)}, or a directory holding one of them"
    )
    parser.add_argument("--classifier", help="classifier folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, help="default: 3 for the image model, 5 for the video model")
    parser.add_argument(
        "--per-class", type=int, default=10, help="images per digit, or clips per (digit, motion) pair for video"
    )
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--intervals", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument(
        "--bac-fractions",
        nargs="*",
        type=float,
        default=[0.44, 0.36],
        help="BAC schedules updating this fraction of the steps (calibrated on other labels and seeds)",
    )
    parser.add_argument("--only", help="run only the caches whose name matches this regular expression")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' own caches")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also the sub-block and taylor1-forecast variants of every BWCache and static candidate",
    )
    parser.add_argument(
        "--limit",
        type=int,
        help="score only this many of the balanced labels, spread evenly over them (small CPU runs of the video model)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per cache after the counted warm-up run; 0 keeps the warm-up's output and times nothing",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", help="results file name (default: quality-<model>)")
    parser.add_argument("--plot", action="store_true", help="also draw speed-up vs PSNR next to the JSON")


BAC_VARIANTS = {  # name -> schedule_from_features options
    "bac": {},
    "bac-shared": {"shared": True},
    "bac-error": {"shared": True, "objective": "error"},
    "bac-shared-keep": {"shared": True, "keep_first": 0.2},
}


def accelerations(args, pipe, calibration_run, validation_run=None, choices: dict | None = None) -> list:
    """Every cache to compare (those ``--only`` selects); BAC and MagCache calibrate with ``calibration_run(pipe)``,
    bac-validated also chooses its options on ``validation_run(pipe)`` (other inputs again) and records its choice in
    ``choices``. Calibration is only run for caches that are selected."""

    def wanted(name: str) -> bool:
        return not args.only or re.search(args.only, name) is not None

    warmup, cooldown = max(1, args.steps // 10), max(1, args.steps // 25)
    runs = [peers.ours("default", default_cache_config())]  # what enable_block_cache() uses with no arguments
    families = {  # name -> config; taylor1 and sub-block variants of each with --variants
        **{f"bwcache-{t:g}": BWCacheConfig(threshold=t) for t in args.thresholds},
        **{f"bwcache-model-{t:g}": BWCacheConfig(threshold=t, scope="model") for t in args.thresholds},
        **{
            f"static-{k}": StaticScheduleConfig(interval=k, warmup_steps=warmup, cooldown_steps=cooldown)
            for k in args.intervals
        },
    }
    variants = getattr(args, "variants", False)
    for name, config in families.items():
        runs.append(peers.ours(name, config))
        if variants or name.startswith("static-"):
            runs.append(peers.ours(f"{name}-taylor1", replace(config, forecast="taylor1")))
        if variants:
            runs.append(peers.ours(f"{name}-sub", replace(config, granularity="sub_block")))
            runs.append(peers.ours(f"{name}-sub-taylor1", replace(config, granularity="sub_block", forecast="taylor1")))

    features = None  # one uncached calibration recording serves every BAC schedule
    reference = None  # and one uncached validation run every bac-validated choice
    for fraction in args.bac_fractions:
        updates = max(1, round(fraction * args.steps))
        names = [f"{variant}-{updates}" for variant in BAC_VARIANTS]
        validated = f"bac-validated-{updates}" if validation_run is not None else None
        if features is None and any(wanted(name) for name in names + [validated] if name):
            features = record_features(pipe, calibration_run)
        for variant, options in BAC_VARIANTS.items():
            if wanted(f"{variant}-{updates}"):
                runs.append(peers.ours(f"{variant}-{updates}", schedule_from_features(features, updates, **options)))
        if validated and wanted(validated):
            if reference is None:
                reference = uncached_output(pipe, validation_run)
            tuned = tune_schedule_from_features(pipe, features, validation_run, updates, reference=reference)
            print(f"{validated}: chose {candidate_name(tuned.options)}")
            if choices is not None:
                choices[validated] = {"chosen": tuned.options, "relative_errors": tuned.distances}
            runs.append(peers.ours(validated, tuned.schedule))
    if not args.no_peers:
        runs += [peers.first_block_cache(t) for t in (0.05, 0.1, 0.2, 0.3)]
        runs += [peers.taylorseer_cache(k, warmup) for k in args.intervals]
        if any(wanted(f"diffusers-magcache-{t:g}") for t in MAGCACHE_THRESHOLDS):
            ratios = peers.calibrate_mag_ratios(pipe, calibration_run, args.steps)  # same calibration set as BAC
            runs += [peers.mag_cache(t, ratios, args.steps) for t in MAGCACHE_THRESHOLDS]
        try:
            runs += [peers.cache_dit_dbcache(t, warmup) for t in (0.04, 0.08, 0.12, 0.2)]
        except ImportError as error:
            print(f"{error}: its DBCache is left out")
    if args.only:
        runs = [run for run in runs if re.search(args.only, run.name)]
    return runs


def _subset(args, *labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``--limit``: that many of the labels, at evenly spaced positions (every digit, and every motion of the video
    model, still appears when the limit allows); otherwise all of them."""
    limit = getattr(args, "limit", None)
    if limit is None or limit >= len(labels[0]):
        return labels
    if limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {limit}")
    keep = torch.linspace(0, len(labels[0]) - 1, limit).round().long()
    return tuple(t[keep] for t in labels)


def _workload(args):
    """The pipeline, the labels scored, and generate(pipe, split) for the chosen model (split: evaluate, calibrate or validate).

    Calibration runs (BAC, MagCache) and validation runs (bac-validated's choice) use other labels and seeds than
    the evaluated ones and than each other (no test leakage).
    """
    path = model_path(args.model) if args.model in MODELS else model_path(Path(args.model).name, args.model)
    video = (Path(path) / "transformer" / "config.json").is_file() and "Wan" in (
        Path(path) / "transformer" / "config.json"
    ).read_text()
    if video:
        pipe, encoder = load_digits_video_pipeline(path, device=args.device)
        guidance = 5.0 if args.guidance is None else args.guidance
        digits, motions = _subset(args, *balanced_clip_labels(args.per_class))
        inputs = {
            "evaluate": (digits, motions, 0),
            "calibrate": (torch.arange(10), torch.arange(10) % len(MOTIONS), 100),
            "validate": (torch.arange(10), (torch.arange(10) + 3) % len(MOTIONS), 200),
        }

        def generate(pipe, split="evaluate"):  # WanPipeline sets its own cache context
            d, m, seed = inputs[split]
            return generate_clips(pipe, encoder, d, m, args.steps, guidance, seed=seed)

        return pipe, digits, generate, "video"

    pipe, encoder = load_digits_image_pipeline(path, device=args.device)
    guidance = 3.0 if args.guidance is None else args.guidance
    (labels,) = _subset(args, balanced_labels(args.per_class))

    inputs = {"evaluate": (labels, 0), "calibrate": (balanced_labels(1), 100), "validate": (balanced_labels(1), 200)}

    def generate(pipe, split="evaluate"):
        # SD3 pipelines set no cache context; diffusers' caches need one (ours does not, and ignores it here).
        with cache_context(pipe.transformer, "cond"):
            chosen, seed = inputs[split]
            return generate_digits(pipe, encoder, chosen, args.steps, guidance, seed=seed)

    return pipe, labels, generate, "image"


def run(args) -> dict:
    device = torch.device(args.device)
    pipe, labels, generate, kind = _workload(args)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier", args.classifier)).to(device).eval()
    choices = {}
    runs = accelerations(
        args, pipe, lambda pipe: generate(pipe, "calibrate"), lambda pipe: generate(pipe, "validate"), choices
    )
    results = compare(pipe, generate, runs, labels, classifier, args.repeats)
    rows = [r.to_dict() for r in results]
    report.print_table(
        rows,
        [
            ("name", "run", str),
            ("fraction_computed", "work", lambda v: f"{v:.1%}"),
            ("speedup", "speed-up", lambda v: f"{v:.2f}x"),
            ("psnr_db", "PSNR dB", lambda v: f"{v:.2f}"),
            ("ssim", "SSIM", lambda v: f"{v:.4f}"),
            ("relative_l2", "rel L2", lambda v: f"{v:.4f}"),
            ("accuracy", "accuracy", lambda v: f"{v:.1%}"),
        ]
        + ([("temporal_consistency", "temporal", lambda v: f"{v:.4f}")] if kind == "video" else []),
    )
    for row in rows:
        if row["error"]:
            print(f"{row['name']} failed: {row['error'][:200]}")
    timed = "untimed" if results[0].reference_seconds is None else f"{results[0].reference_seconds:.2f} s per run"
    print(f"uncached: accuracy {results[0].reference_accuracy:.1%}, {timed}")
    payload = {
        "benchmark": "quality",
        "environment": report.environment(device, args.allow_dirty),
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "bac_validated": choices,
        "reference": {"accuracy": results[0].reference_accuracy, "seconds": results[0].reference_seconds},
        "results": rows,
    }
    path = report.write_json(report.result_path(args.out, args.name or f"quality-digits-{kind}", device), payload)
    if args.plot:
        _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


def _plot(rows: list[dict], path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    families = {}
    for row in rows:
        if row["error"]:
            continue
        families.setdefault(re.sub(r"-[0-9.]+(?=-|$)", "", row["name"]), []).append(row)
    for family, members in families.items():
        members = sorted(members, key=lambda r: r["fraction_computed"])
        ax.plot(
            [1 / r["fraction_computed"] for r in members], [min(r["psnr_db"], 60) for r in members], "o-", label=family
        )
    ax.set_xlabel("block work saved: 1 / fraction computed")
    ax.set_ylabel("PSNR vs uncached (dB, capped at 60)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
