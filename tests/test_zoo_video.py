"""The shipped moving-digits video model loads offline, generates the requested digits, and its labels are checked."""

import os

import pytest
import torch

from diffusers_block.data.digits import make_moving_digits
from diffusers_block.eval.classifier import DigitClassifier
from diffusers_block.eval.digits import (
    class_accuracy,
    estimate_motion,
    generate_clips,
    motion_accuracy,
    motion_axes_accuracy,
)
from diffusers_block.zoo import load_digits_video_pipeline, model_path

STEPS = 10


@pytest.fixture(scope="module")
def video():
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe, encoder = load_digits_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, encoder, DigitClassifier.from_pretrained(model_path("digit-classifier")).eval()


def test_shipped_video_model_draws_the_requested_digits(video):
    pipe, encoder, classifier = video
    digits, motions = torch.tensor([2, 9, 4, 6, 1, 5, 7, 8]), torch.arange(8)  # every motion once
    clips = generate_clips(pipe, encoder, digits, motions, steps=STEPS, guidance_scale=5.0)
    assert clips.shape == (8, 17, 1, 32, 32) and 0 <= clips.min() and clips.max() <= 1
    # Per frame; 10 steps (98% at 50 steps on the 160-clip eval) and single clips vary: well above chance (10%).
    assert class_accuracy(classifier, clips, digits) >= 0.75


def test_clip_labels_are_checked(video):
    _, encoder, _ = video
    with pytest.raises(ValueError, match="motions must be in"):
        encoder.prompt_kwargs([1], [8])
    with pytest.raises(ValueError, match="one motion per digit"):
        encoder.prompt_kwargs([1, 2], [0])
    kwargs = encoder.prompt_kwargs([1, 2], [0, 5])
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (2, 4, 64)


def test_motion_estimate_reads_real_clips():
    clips, labels = make_moving_digits(200, "test", frames=17, seed=3)
    clips01 = (clips + 1) / 2
    assert motion_accuracy(clips01, labels["motion"]) == 1.0  # digits start behind their motion: no early bounce
    assert (estimate_motion(torch.zeros_like(clips01)) == -1).all()  # no ink, no motion
    assert motion_accuracy(clips01[:, :1].expand_as(clips01), labels["motion"]) == 0.0  # a still clip has none


def test_motion_axes_ignore_the_sign():
    clips, labels = make_moving_digits(200, "test", frames=17, seed=3)
    clips01 = (clips + 1) / 2
    assert motion_axes_accuracy(clips01, labels["motion"]) > 0.9
    mirrored = clips01.flip(-1, -2)  # a point mirror turns every motion around: same axes, the other sign
    assert motion_axes_accuracy(mirrored, labels["motion"]) > 0.9
    assert motion_accuracy(mirrored, labels["motion"]) == 0.0
    still = clips01[:, :1].expand_as(clips01)
    assert motion_axes_accuracy(still, labels["motion"]) == 0.0


def test_a_missing_model_names_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffusers_block.train digits-video --out"):
        load_digits_video_pipeline(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="train digits-video --canvas 64"):
        load_digits_video_pipeline(
            tmp_path / "absent", train_command="python -m diffusers_block.train digits-video --canvas 64"
        )
