"""The shared training loop: it learns, and a resumed run ends exactly where an uninterrupted one does."""

import json

import pytest
import torch

from diffusers_block.train.loop import TrainConfig, train


def _problem():
    torch.manual_seed(0)
    weight = torch.randn(4, 1)

    def sample_batch(step, rank, device):
        g = torch.Generator().manual_seed(step * 7 + rank)
        x = torch.randn(16, 4, generator=g)
        return {"x": x.to(device), "y": (x @ weight).to(device)}

    def loss_fn(model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])

    return sample_batch, loss_fn


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(4, 1)


def test_loss_goes_down_and_is_logged(tmp_path):
    sample_batch, loss_fn = _problem()
    config = TrainConfig(str(tmp_path), steps=60, lr=0.05, warmup_steps=0, log_every=10, ema_decay=0.0)
    train(_model(), sample_batch, loss_fn, config)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 60


def test_resume_matches_an_uninterrupted_run(tmp_path):
    sample_batch, loss_fn = _problem()
    straight = train(
        _model(), sample_batch, loss_fn, TrainConfig(str(tmp_path / "a"), steps=8, lr=0.05, warmup_steps=0)
    )

    def interrupted(step, rank, device):
        if step == 6:
            raise KeyboardInterrupt
        return sample_batch(step, rank, device)

    config = TrainConfig(str(tmp_path / "b"), steps=8, lr=0.05, warmup_steps=0, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), interrupted, loss_fn, config)
    assert (tmp_path / "b" / "checkpoints" / "step-4").is_dir()
    resumed = train(_model(), sample_batch, loss_fn, config)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
