"""Small real datasets that work offline: scikit-learn's handwritten digits as images and moving-digit clips."""

from .digits import MOTIONS, SPLITS, load_digit_images, make_moving_digits, split_indices

__all__ = ["MOTIONS", "SPLITS", "load_digit_images", "make_moving_digits", "split_indices"]
