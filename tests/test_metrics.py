import math

import pytest
import torch

from diffusers_block.eval.metrics import psnr, relative_l2, ssim, temporal_consistency


def _images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identical_inputs_give_inf_psnr_and_unit_ssim():
    x = _images(3, 2, 24, 24)
    assert torch.isinf(psnr(x, x.clone(), 2.0)).all()
    assert torch.equal(ssim(x, x.clone(), 2.0), torch.ones(3))


@pytest.mark.parametrize("offset, data_range, expected", [(0.1, 1.0, 20.0), (0.01, 1.0, 40.0), (0.2, 2.0, 20.0)])
def test_constant_offset_gives_known_psnr(offset, data_range, expected):
    b = torch.zeros(2, 3, 16, 16)
    assert torch.allclose(psnr(b + offset, b, data_range), torch.full((2,), expected), atol=1e-4)


def test_known_mse_gives_known_psnr():
    # Alternating +-0.05 error: MSE = 0.0025 exactly, so PSNR = 10 log10(1 / 0.0025) with data range 1.
    b = torch.rand(1, 1, 8, 8)
    err = torch.tensor([0.05, -0.05]).repeat(32).view(1, 1, 8, 8)
    assert psnr(b + err, b, 1.0).item() == pytest.approx(10 * math.log10(400), abs=1e-3)


def test_ssim_decreases_with_noise():
    x = torch.nn.functional.avg_pool2d(_images(4, 1, 40, 40), 3, 1, 1)  # some structure
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    scores = [ssim(x, x + s * noise, 2.0).mean().item() for s in (0.0, 0.05, 0.2, 0.5)]
    assert scores[0] == 1.0
    assert all(hi > lo for hi, lo in zip(scores, scores[1:]))
    assert scores[-1] < 0.5


def test_ssim_matches_reference_values_of_the_formula():
    # Constant images a, b: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ssim_matches_skimage_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    a = _images(2, 3, 32, 32, seed=2)
    b = (a + 0.3 * _images(2, 3, 32, 32, seed=3)).clamp(-1, 1)
    ref = [
        metrics.structural_similarity(
            a[i].numpy(),
            b[i].numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
        )
        for i in range(2)
    ]
    assert torch.allclose(ssim(a, b, 2.0), torch.tensor(ref, dtype=torch.float32), atol=1e-5)


def test_relative_l2_on_known_vectors():
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    # ||a - b|| / ||b||: first row has a zero reference (eps-guarded, huge), second is 1 / 1.
    out = relative_l2(a, b)
    assert out[1].item() == pytest.approx(1.0)
    assert out[0].item() > 1e6
    assert relative_l2(torch.tensor([[6.0, 8.0]]), torch.tensor([[3.0, 4.0]])).item() == pytest.approx(1.0)
    assert relative_l2(torch.tensor([[3.3, 4.4]]), torch.tensor([[3.0, 4.0]])).item() == pytest.approx(0.1)


def test_shapes_images_and_videos_and_reductions():
    img_a, img_b = _images(3, 2, 16, 16), _images(3, 2, 16, 16, seed=1)
    vid_a, vid_b = _images(3, 4, 2, 16, 16), _images(3, 4, 2, 16, 16, seed=1)
    for fn in (lambda a, b, **k: psnr(a, b, 2.0, **k), lambda a, b, **k: ssim(a, b, 2.0, **k), relative_l2):
        assert fn(img_a, img_b).shape == (3,)
        assert fn(vid_a, vid_b).shape == (3,)
        per_sample = fn(vid_a, vid_b)
        assert fn(vid_a, vid_b, reduction="mean").shape == ()
        assert torch.allclose(fn(vid_a, vid_b, reduction="mean"), per_sample.mean())
        assert fn(img_a.half(), img_b.half()).dtype == torch.float32
    # A video's SSIM is the mean of its frames' SSIMs.
    frames = ssim(vid_a.flatten(0, 1), vid_b.flatten(0, 1), 2.0).view(3, 4).mean(1)
    assert torch.allclose(ssim(vid_a, vid_b, 2.0), frames)
    with pytest.raises(ValueError):
        psnr(img_a, vid_a, 2.0)
    with pytest.raises(ValueError):
        ssim(_images(1, 1, 8, 8), _images(1, 1, 8, 8), 2.0)


def test_temporal_consistency():
    static = _images(2, 1, 1, 8, 8).expand(2, 5, 1, 8, 8)
    assert torch.equal(temporal_consistency(static), torch.ones(2))
    # Frames alternating between -1 and +1: every step changes every pixel by the full range.
    flicker = torch.tensor([-1.0, 1.0]).repeat(3).view(1, 6, 1, 1, 1).expand(1, 6, 1, 4, 4)
    assert temporal_consistency(flicker).item() == pytest.approx(0.0)
    noisy = static + 0.1 * torch.randn(static.shape, generator=torch.Generator().manual_seed(0))
    assert (temporal_consistency(noisy) < 1).all()
    assert temporal_consistency(noisy, reduction="mean").shape == ()
    with pytest.raises(ValueError):
        temporal_consistency(_images(2, 1, 1, 8, 8))
