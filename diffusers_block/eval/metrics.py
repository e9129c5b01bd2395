"""Quality metrics for comparing a fast (cached, sparse, distilled) output with its reference, in torch.

Every metric computes in float32, takes a batch first and returns one value per sample, shape ``(B,)``; with
``reduction="mean"`` it returns the plain mean of those values as a 0-d tensor (``"sum"`` likewise). Inputs are
images ``(B, C, H, W)`` or videos ``(B, T, C, H, W)``; :func:`psnr` and :func:`relative_l2` take any shape
``(B, ...)``.

- :func:`psnr`: ``10 * log10(data_range**2 / MSE)``, the MSE over all of a sample's elements (for a video, over the
  whole clip: pooled MSE, not the mean of per-frame PSNRs). Identical samples give ``inf``.
- :func:`ssim`: the standard Gaussian-window SSIM (Wang et al. 2004): 11x11 window, sigma 1.5, K1 = 0.01,
  K2 = 0.03, population (not sample) covariances, valid windows only (no padding), averaged over the window
  positions and channels of each image. This matches ``skimage.metrics.structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=...)``. For a video, frames are
  folded into the batch and the per-frame SSIMs are averaged over time. Identical samples give exactly 1.
- :func:`relative_l2`: ``||a - b||_2 / ||b||_2`` per sample, ``b`` the reference.
- :func:`temporal_consistency`: ``1 - mean |x[t+1] - x[t]| / data_range`` per video, the mean over all consecutive
  frame pairs and elements: 1 for a static video, lower the more consecutive frames differ (flicker or motion).
  Compare it between a fast output and its reference rather than reading it alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "relative_l2", "temporal_consistency"]

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError("expected a non-empty batch (B, ...)")
    return a.detach().float(), b.detach().float()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float, reduction: str = "none") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, ``(B,)``; ``inf`` where a sample is identical."""
    a, b = _pair(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return _reduce(10.0 * torch.log10(float(data_range) ** 2 / mse), reduction)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float,
    reduction: str = "none",
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image ``(B,)`` for ``(B, C, H, W)`` or per video ``(B,)`` for ``(B, T, C, H, W)``."""
    a, b = _pair(a, b)
    if a.ndim == 5:
        batch, frames = a.shape[:2]
        per_frame = ssim(a.flatten(0, 1), b.flatten(0, 1), data_range, "none", win_size, sigma, k1, k2)
        return _reduce(per_frame.view(batch, frames).mean(1), reduction)
    if a.ndim != 4:
        raise ValueError(f"ssim expects (B, C, H, W) or (B, T, C, H, W), got shape {tuple(a.shape)}")
    n, c, h, w = a.shape
    if h < win_size or w < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {win_size}x{win_size} window")

    g = _gaussian_window(win_size, sigma, a.device)
    # Separable Gaussian filter, valid positions only, over the five moments of every (image, channel) plane.
    planes = torch.stack([a, b, a * a, b * b, a * b], dim=2).reshape(n * c * 5, 1, h, w)
    planes = F.conv2d(planes, g.view(1, 1, win_size, 1))
    planes = F.conv2d(planes, g.view(1, 1, 1, win_size))
    mu_a, mu_b, e_aa, e_bb, e_ab = planes.view(n, c, 5, h - win_size + 1, w - win_size + 1).unbind(2)

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return _reduce(ssim_map.flatten(1).mean(1), reduction)


def relative_l2(a: torch.Tensor, b: torch.Tensor, reduction: str = "none", eps: float = 1e-12) -> torch.Tensor:
    """``||a - b||_2 / max(||b||_2, eps)`` per sample, ``(B,)``; ``b`` is the reference."""
    a, b = _pair(a, b)
    err = (a - b).flatten(1).norm(dim=1)
    ref = b.flatten(1).norm(dim=1).clamp_min(eps)
    return _reduce(err / ref, reduction)


def temporal_consistency(video: torch.Tensor, data_range: float = 2.0, reduction: str = "none") -> torch.Tensor:
    """``1 - mean |x[t+1] - x[t]| / data_range`` per video ``(B,)`` for ``(B, T, ...)`` with ``T >= 2``.

    The default ``data_range`` of 2 is for videos in [-1, 1]. 1 means every frame equals the previous one.
    """
    if video.ndim < 3 or video.shape[1] < 2:
        raise ValueError(f"expected a video (B, T, ...) with at least two frames, got shape {tuple(video.shape)}")
    v = video.detach().float()
    diff = (v[:, 1:] - v[:, :-1]).abs().flatten(1).mean(1)
    return _reduce(1.0 - diff / float(data_range), reduction)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (FID's formula, in float64).

    ``Tr(sqrt(S_a S_b))`` is computed as the trace of the square root of the symmetric ``sqrt(S_a) S_b sqrt(S_a)``,
    whose eigenvalues are real, so no general matrix square root is needed.
    """
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
