"""The trained models shipped in models/ load offline, generate recognisable digits, and cache well."""

import os

import pytest
import torch

import diffusers_block as db
from diffusers_block.bench.peers import ours
from diffusers_block.eval.classifier import DigitClassifier
from diffusers_block.eval.digits import balanced_labels, class_accuracy, generate_digits
from diffusers_block.eval.harness import compare
from diffusers_block.eval.metrics import psnr
from diffusers_block.zoo import load_digits_image_pipeline, model_path

STEPS = 20


@pytest.fixture(scope="module")
def digits():
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe, encoder = load_digits_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(model_path("digit-classifier")).eval()
    return pipe, encoder, classifier


def test_shipped_image_model_generates_the_requested_digits(digits):
    pipe, encoder, classifier = digits
    labels = balanced_labels(2)
    images = generate_digits(pipe, encoder, labels, steps=STEPS)
    assert images.shape == (20, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert class_accuracy(classifier, images, labels) >= 0.9


def test_block_cache_on_trained_features(digits):
    pipe, encoder, classifier = digits
    labels = balanced_labels(1)
    reference = generate_digits(pipe, encoder, labels, steps=STEPS)
    pipe.enable_block_cache(db.BWCacheConfig(threshold=0.0))
    assert torch.equal(generate_digits(pipe, encoder, labels, steps=STEPS), reference)
    pipe.enable_block_cache(db.BWCacheConfig(threshold=0.2))  # per-step changes are twice as big at 20 steps as at 50
    cached = generate_digits(pipe, encoder, labels, steps=STEPS)
    saved = pipe.block_cache_summary().fraction_saved
    pipe.disable_block_cache()
    assert saved > 0.4  # measured 0.495 (CPU, torch 2.13)
    assert psnr(cached, reference, data_range=1.0, reduction="mean") > 27  # measured 28.9 dB
    assert class_accuracy(classifier, cached, labels) >= 0.9


def test_harness_metrics_and_work_count(digits):
    pipe, encoder, classifier = digits
    labels = balanced_labels(1)
    runs = [
        ours("everything", db.StaticScheduleConfig(interval=1)),
        ours("every-other", db.StaticScheduleConfig(interval=2, warmup_steps=2)),
    ]
    identical, halved = compare(
        pipe, lambda p: generate_digits(p, encoder, labels, steps=8), runs, labels, classifier, repeats=1
    )
    assert identical.psnr_db == float("inf") and identical.ssim == pytest.approx(1.0)
    assert identical.relative_l2 == 0 and identical.fraction_computed == 1.0
    assert halved.fraction_computed == pytest.approx(5 / 8)  # steps 0, 1 (warm-up), 2, 4, 6
    assert 20 < halved.psnr_db < float("inf") and halved.error is None
    assert not hasattr(pipe, "_diffusers_block_cache")  # each run was disabled again
