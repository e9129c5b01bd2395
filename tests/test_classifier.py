from pathlib import Path

import torch

from diffusers_block.data import load_digit_images, make_moving_digits
from diffusers_block.eval.classifier import DigitClassifier, augment

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "digit-classifier"


def test_shipped_classifier_loads_offline_and_reads_real_digits(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (SHIPPED / "config.json").is_file()
    assert (SHIPPED / "diffusion_pytorch_model.safetensors").stat().st_size < 2 * 1024 * 1024
    model = DigitClassifier.from_pretrained(SHIPPED).eval()
    images, labels = load_digit_images("test")
    assert model(images[:4]).shape == (4, 10)
    assert model.accuracy(images, labels) >= 0.95
    # Whole frames of single-digit test clips, per frame, at 32 and (downsampled) 64 px.
    for size in (32, 64):
        clips, info = make_moving_digits(16, "test", frames=8, size=size, seed=1)
        preds = model.predict(clips)
        assert preds.shape == (16, 8)
        assert model.accuracy(clips, info["digits"][:, 0]) >= 0.9


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(widths=(8, 16), dropout=0.0).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DigitClassifier.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.widths) == (8, 16)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.equal(model(x), loaded(x))


def test_augment_keeps_shape_and_range_and_is_seeded():
    images, _ = load_digit_images("train")
    a = augment(images[:16], torch.Generator().manual_seed(0))
    b = augment(images[:16], torch.Generator().manual_seed(0))
    assert a.shape == (16, 1, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
