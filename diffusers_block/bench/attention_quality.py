"""Sparse attention on the trained video model: fidelity to dense attention at a measured sparsity.

The shipped moving-digits Wan model (models/digits-video) generates the same clips with dense attention and with
sparse attention at each threshold, dropping the skipped key blocks or approximating them (``approximation``).
For each run (approximation x refresh interval x threshold): the fraction of key blocks computed on sparse steps
(with ``approximation="cached"`` a selection step computes all of them: the lists and their complement), PSNR /
SSIM against the dense clips, the digit classifier's per-frame accuracy, and the relative L2 error of each hooked
layer's attention output against exact
attention on the same inputs (``measure_error``: the approximation alone, not the drift from earlier layers; mean
over branches and sparse steps). The model has 576 tokens, so blocks are small (``--block-size``, default 32: 18
key blocks per query block) and ``min_tokens=0`` lets the sparse path run at all.

``--config default`` runs exactly ``SparseAttentionConfig()`` instead, one run (no layer errors: measuring them would
change the config); with its ``min_tokens`` of 4096 that is dense attention on both video models (576 and 2,304
tokens), which the run records (``sparse_calls`` 0), and ``--default-override min_tokens=0 block_size=32`` measures
the default's selection rule at this scale.
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import torch

from .. import SparseAttentionConfig, disable_sparse_attention, enable_sparse_attention, sparse_attention_summary
from ..attention.summary import REUSED, SELECTED
from ..eval.classifier import DigitClassifier
from ..eval.digits import balanced_clip_labels, class_accuracy, generate_clips
from ..eval.metrics import psnr, ssim
from ..zoo import load_digits_video_pipeline, model_path
from . import refresh as refresh_option
from . import report, sparse_config

#: Video models: folder (None: found by name, zoo.locate.model_path), canvas size (px), and how to train it where it
#: does not ship. "digits-video-64" is a
#: long-sequence probe (2,304 tokens instead of 576) for sparse attention, trained on the shipped autoencoder.
MODELS = {
    "digits-video": (None, 32, None),
    "digits-video-64": (
        None,
        64,
        "python -m diffusers_block.train digits-video --out models/digits-video-64 --vae models/digits-video "
        "--canvas 64 --digit-size 14 --width 128 --layers 8 --clips 10000 --flow-batch-size 128 --steps 20000 "
        "--max-minutes 6.3 --compile",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(MODELS), default="digits-video", help="shipped video model")
    parser.add_argument("--clips", type=int, default=16, help="clips, cycling through every (digit, motion) pair")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--approximations", nargs="+", default=["none", "zeroth"], help="none = drop-only")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dense-steps", type=int, default=2)
    parser.add_argument("--refresh", nargs="+", type=refresh_option.parse, default=[2], help=refresh_option.HELP)
    parser.add_argument("--scoring", choices=["mean", "antidiagonal"], default="mean", help="block scoring")
    parser.add_argument("--stride", type=int, default=2, help="antidiagonal stride (block size / stride >= 4 on GPU)")
    sparse_config.add_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"results directory (default: {report.RESULTS_DIR})")
    parser.add_argument("--name", help="result file stem (default: attention-quality-MODEL)")


def run(args) -> dict:
    device = torch.device(args.device)
    path, size, train_command = MODELS[args.model]
    path = model_path(args.model, path, train_command)
    pipe, encoder = load_digits_video_pipeline(path, device=args.device, train_command=train_command)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier")).to(device).eval()
    digits, motions = (labels[: args.clips] for labels in balanced_clip_labels(-(-args.clips // 80)))

    def generate():
        return generate_clips(pipe, encoder, digits, motions, args.steps, args.guidance, size=size)

    reference = generate()
    rows, layer_names = [], None
    for config in _configs(args):
        enable_sparse_attention(pipe, config)
        try:
            clips = generate()
            summary = sparse_attention_summary(pipe)
        finally:
            disable_sparse_attention(pipe)
        layer_names = summary.layer_names
        measured = summary.attention_error[~np.isnan(summary.attention_error)]
        ran_sparse = int(np.isin(summary.mode, (SELECTED, REUSED)).sum())
        rows.append(
            {
                "config": sparse_config.record(config),
                "approximation": config.approximation or "none",
                "refresh": refresh_option.label(config.refresh_schedule or config.refresh_interval),
                "threshold": config.threshold,
                "sparse_calls": ran_sparse,
                "sparse_density": summary.sparse_density,
                "overall_density": summary.overall_density,
                # None where the clips are identical to dense (infinite PSNR; e.g. no call ran sparse)
                "psnr_db": _number(psnr(clips, reference, data_range=1.0, reduction="mean").item()),
                "ssim": ssim(clips.flatten(0, 1), reference.flatten(0, 1), data_range=1.0, reduction="mean").item(),
                "accuracy": class_accuracy(classifier, clips, digits),
                "attention_error_mean": float(measured.mean()) if measured.size else None,
                "attention_error_per_layer": [_number(e) for e in summary.error_per_layer()],
            }
        )
    report.print_table(
        rows,
        [
            ("approximation", "skipped blocks", str),
            ("refresh", "refresh", str),
            ("threshold", "threshold", "{:g}".format),
            ("sparse_calls", "sparse calls", str),
            ("sparse_density", "kept (sparse steps)", "{:.1%}".format),
            ("overall_density", "kept (all steps)", "{:.1%}".format),
            ("psnr_db", "PSNR dB", "{:.2f}".format),
            ("ssim", "SSIM", "{:.4f}".format),
            ("accuracy", "accuracy", "{:.1%}".format),
            ("attention_error_mean", "attn rel err", "{:.4f}".format),
        ],
    )
    reference_accuracy = class_accuracy(classifier, reference, digits)
    print(f"dense attention: per-frame accuracy {reference_accuracy:.1%}")
    payload = {
        "benchmark": "attention-quality",
        "environment": report.environment(device, args.allow_dirty),
        "command": report.command_line(args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "reference": {"accuracy": reference_accuracy},
        "layer_names": layer_names,
        "results": rows,
    }
    name = args.name or f"attention-quality-{args.model}"
    path = report.write_json(report.result_path(args.out, name, device), payload)
    print(f"wrote {path}")
    return payload


def _configs(args) -> list[SparseAttentionConfig]:
    """The configs to run: ``--config default``: the library default (with any ``--default-override``), one run;
    ``--config options``: every (approximation, refresh, threshold) of the command line, with the layer errors
    measured (``measure_error``)."""
    if args.config == "default":
        return [sparse_config.default_config(args)]
    return [
        SparseAttentionConfig(
            threshold=threshold,
            block_size=args.block_size,
            dense_steps=args.dense_steps,
            **refresh_option.config_options(refresh),
            approximation=None if approximation == "none" else approximation,
            min_tokens=0,
            measure_error=True,
            scoring=args.scoring,
            stride=args.stride,
        )
        for approximation, refresh, threshold in itertools.product(args.approximations, args.refresh, args.thresholds)
    ]


def _number(value) -> float | None:
    """A float for the JSON file, None for NaN (not measured) or infinity (identical outputs), which JSON cannot
    hold."""
    value = float(value)
    return None if not math.isfinite(value) else value
