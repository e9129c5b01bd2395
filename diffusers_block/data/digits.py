"""Real, offline image and video data from scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 scans (values 0..16) inside scikit-learn, so everything here
works with no network and no download.

Split (fixed, stratified 80/20, independent of the scikit-learn version): the indices of each digit class, in
dataset order, are shuffled with ``numpy.random.default_rng(0)`` (one generator for all classes, classes 0..9 in
order) and the first ``round(0.2 * n_class)`` go to ``"test"``, the rest to ``"train"``. That gives **1,438 train
and 359 test images** (test per class: 36 36 35 37 36 36 36 36 35 36). The dataset has no writer ids, so the
same person's handwriting can appear on both sides: the split is disjoint in scans, not in writers.

Images come back as float32 ``(N, 1, size, size)`` in [-1, 1] (ink +1, background -1), resized from 8x8 with
bilinear interpolation (antialiased when downsampling). Moving-digit clips paste digits, resized the same way, on a
blank canvas and move them at constant velocity, bouncing off the edges; see :func:`make_moving_digits`.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .._extras import require

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0

# Motion classes: the direction of a clip's initial velocity, counter-clockwise from "right" in image terms
# (y grows downwards). A diagonal step moves `speed` pixels along each axis.
MOTIONS = ("right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right")
_DIRECTIONS = np.array([(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)])  # (dy, dx)


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    require("train", "sklearn", "the digits data set (scikit-learn's load_digits)")
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@cache
def split_indices(split: str) -> np.ndarray:
    """Sorted dataset indices of ``split`` ("train" or "test"); see the module docstring for the definition."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = _raw_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test.append(rng.permutation(members)[: round(TEST_FRACTION * len(members))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def motion_directions() -> torch.Tensor:
    """The (dy, dx) unit step of each class of :data:`MOTIONS`, long (len(MOTIONS), 2), y growing downwards."""
    return torch.from_numpy(_DIRECTIONS.copy())


def _resize(images01: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, h, w) in [0, 1] -> (N, 1, size, size) in [0, 1], bilinear (antialias when downsampling)."""
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    out = F.interpolate(images01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0)


def _split_images01(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _raw_digits()
    idx = split_indices(split)
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    return _resize(x, size), torch.from_numpy(labels[idx])


def load_digit_images(split: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit images of ``split``: float32 ``(N, 1, size, size)`` in [-1, 1] and long labels ``(N,)``, dataset order."""
    x, y = _split_images01(split, size)
    return x * 2.0 - 1.0, y.clone()


def _bounce(start: np.ndarray, velocity: np.ndarray, frames: int, limit: int) -> np.ndarray:
    """Positions in [0, limit] of points moving at constant velocity and reflecting off 0 and ``limit``.

    start, velocity: integer arrays of the same shape S; returns (frames, *S). Closed form: unfold the motion on the
    line, then fold it back with a triangle wave of period 2 * limit.
    """
    t = np.arange(frames).reshape((frames,) + (1,) * start.ndim)
    unfolded = start + velocity * t
    if limit == 0:
        return np.zeros_like(unfolded)
    return limit - np.abs(np.mod(unfolded, 2 * limit) - limit)


def make_moving_digits(
    n_clips: int,
    split: str,
    frames: int = 16,
    size: int = 32,
    digits_per_clip: int = 1,
    seed: int = 0,
    digit_size: int | None = None,
    speed: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Moving-digit video clips, fully determined by the arguments (``seed`` drives a numpy ``default_rng``).

    Each clip takes ``digits_per_clip`` digits of ``split`` (drawn with replacement), resized to
    ``digit_size`` px (default ``round(size * 7 / 16)``: 14 px on a 32 px canvas). The clip's motion class (uniform
    over :data:`MOTIONS`) sets every digit's initial velocity: ``speed`` px per frame along each moving axis
    (default ``max(1, size // 16)``: 2 px at 32). A digit reflects off the canvas edges, so it always lies entirely
    inside the canvas; where two digits overlap the brighter pixel wins (max).

    Start positions are random integers, uniform along an axis the digit does not move on and uniform over the
    trailing half of the range along an axis it moves on (left half when moving right, and so on). So every digit
    travels the labelled way for at least ``(size - digit_size) / (2 * speed)`` frames before its first bounce, and
    the label can be read from the whole clip: with uniform starts, "left" and "right" clips would be the same
    bouncing triangle wave in different phases, told apart by the first step alone, which a generator hardly learns.

    Returns ``clips`` float32 ``(n_clips, frames, 1, size, size)`` in [-1, 1] and a dict of labels:
    ``"digits"`` long ``(n_clips, digits_per_clip)``, ``"motion"`` long ``(n_clips,)`` indexing :data:`MOTIONS`,
    and ``"positions"`` long ``(n_clips, frames, digits_per_clip, 2)``: each digit's top-left (y, x) per frame.
    """
    if digits_per_clip < 1:
        raise ValueError("digits_per_clip must be >= 1")
    digit_size = round(size * 7 / 16) if digit_size is None else digit_size
    speed = max(1, size // 16) if speed is None else speed
    if not 1 <= digit_size <= size:
        raise ValueError(f"digit_size must be in [1, {size}], got {digit_size}")

    images01, labels = _split_images01(split, digit_size)  # (M, 1, d, d) in [0, 1]
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(labels), size=(n_clips, digits_per_clip))
    motion = rng.integers(0, len(MOTIONS), size=n_clips)
    limit = size - digit_size
    direction = np.broadcast_to(_DIRECTIONS[motion][:, None, :], (n_clips, digits_per_clip, 2))
    anywhere = rng.integers(0, limit + 1, size=direction.shape)
    behind = rng.integers(0, limit // 2 + 1, size=direction.shape)  # distance from the wall the digit moves away from
    start = np.select([direction > 0, direction < 0], [behind, limit - behind], anywhere)
    velocity = speed * direction
    positions = torch.from_numpy(np.moveaxis(_bounce(start, velocity, frames, limit), 0, 1).copy())  # (N, T, k, 2)

    canvas = torch.zeros(n_clips, frames, size, size)
    offsets = torch.arange(digit_size)
    n_idx = torch.arange(n_clips).view(-1, 1, 1, 1)
    t_idx = torch.arange(frames).view(1, -1, 1, 1)
    for j in range(digits_per_clip):
        rows = (positions[:, :, j, 0, None] + offsets)[..., :, None]  # (N, T, d, 1)
        cols = (positions[:, :, j, 1, None] + offsets)[..., None, :]  # (N, T, 1, d)
        patch = images01[torch.from_numpy(which[:, j]), 0][:, None]  # (N, 1, d, d)
        canvas[n_idx, t_idx, rows, cols] = torch.maximum(canvas[n_idx, t_idx, rows, cols], patch)

    clips = (canvas * 2.0 - 1.0).unsqueeze(2)
    digits = labels[torch.from_numpy(which)]
    return clips, {"digits": digits, "motion": torch.from_numpy(motion), "positions": positions}
