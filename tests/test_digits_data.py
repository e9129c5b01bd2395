import numpy as np
import pytest
import torch

from diffusers_block.data import MOTIONS, load_digit_images, make_moving_digits, split_indices
from diffusers_block.data.digits import _DIRECTIONS


def test_split_sizes_fixed_disjoint_and_stratified():
    train, test = split_indices("train"), split_indices("test")
    assert (len(train), len(test)) == (1438, 359)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.union1d(train, test), np.arange(1797))
    _, test_labels = load_digit_images("test", size=8)
    assert torch.bincount(test_labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    with pytest.raises(ValueError):
        split_indices("val")


def test_images_shapes_ranges_and_resize():
    x, y = load_digit_images("train")
    assert x.shape == (1438, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (1438,) and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert x.min() == -1.0 and x.max() == 1.0
    raw, raw_y = load_digit_images("test", size=8)
    small, _ = load_digit_images("test", size=4)
    assert raw.shape == (359, 1, 8, 8) and small.shape == (359, 1, 4, 4)
    assert small.min() >= -1 and small.max() <= 1
    # The 8x8 images are the scans themselves: multiples of 1/16 mapped to [-1, 1].
    assert torch.allclose((raw + 1) * 8, ((raw + 1) * 8).round(), atol=1e-5)
    assert torch.equal(load_digit_images("test")[1], raw_y)


def test_moving_digits_deterministic_from_seed():
    a, la = make_moving_digits(6, "train", frames=8, digits_per_clip=2, seed=3)
    b, lb = make_moving_digits(6, "train", frames=8, digits_per_clip=2, seed=3)
    c, _ = make_moving_digits(6, "train", frames=8, digits_per_clip=2, seed=4)
    assert torch.equal(a, b) and all(torch.equal(la[k], lb[k]) for k in la)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("size, k", [(32, 1), (32, 2), (64, 1)])
def test_moving_digits_move_bounce_and_stay_inside(size, k):
    n, frames = 24, 16
    clips, labels = make_moving_digits(n, "test", frames=frames, size=size, digits_per_clip=k, seed=0)
    assert clips.shape == (n, frames, 1, size, size) and clips.dtype == torch.float32
    assert clips.min() >= -1 and clips.max() <= 1
    assert labels["digits"].shape == (n, k) and labels["motion"].shape == (n,)
    assert labels["motion"].min() >= 0 and labels["motion"].max() < len(MOTIONS)
    pos = labels["positions"]
    assert pos.shape == (n, frames, k, 2)
    digit = round(size * 7 / 16)
    assert pos.min() >= 0 and pos.max() <= size - digit  # the whole digit is always on the canvas
    # Every clip moves, and the first step follows the motion class until a wall is hit.
    assert ((clips[:, 1:] - clips[:, :-1]).abs().flatten(1).amax(1) > 0).all()
    step = pos[:, 1] - pos[:, 0]
    speed = max(1, size // 16)
    expected = torch.from_numpy(speed * _DIRECTIONS)[labels["motion"]][:, None].expand_as(step)
    free = ((pos[:, 0] + expected >= 0) & (pos[:, 0] + expected <= size - digit)).all(-1)
    assert torch.equal(step[free], expected[free])
    # Later steps keep the speed per axis (a reflection can shorten one to 0), and every digit really travels.
    steps = pos[:, 1:] - pos[:, :-1]
    assert (steps.abs() <= speed).all()
    assert (steps.abs().sum((1, 3)) >= speed * (frames - 1) // 2).all()


def test_single_digit_clips_show_the_labelled_digit_whole():
    # Pasting the labelled digit at the recorded position reproduces each frame exactly: nothing clipped.
    clips, labels = make_moving_digits(5, "test", frames=6, seed=1)
    d = 14
    digits01, _ = load_digit_images("test", size=d)
    ink = (clips + 1) / 2
    mass = ink.flatten(2).sum(-1)
    assert torch.allclose(mass, mass[:, :1].expand_as(mass), rtol=1e-5)  # same ink in every frame
    for i in range(5):
        y, x = labels["positions"][i, 3, 0].tolist()
        crop = ink[i, 3, 0, y : y + d, x : x + d]
        assert crop.sum() == pytest.approx(mass[i, 3].item(), rel=1e-5)
    # The labels name digits of the test split.
    _, test_labels = load_digit_images("test")
    assert set(labels["digits"].flatten().tolist()) <= set(test_labels.tolist())
