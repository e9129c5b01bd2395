"""The shared training loop: it learns, and a resumed run ends exactly where an uninterrupted one does."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file as safetensors_file

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


def test_steps_schedule_is_diffusers_cosine_with_warmup():
    from diffusers.optimization import get_scheduler

    from diffusers_block.train.loop import _BudgetClock

    clock = _BudgetClock(TrainConfig("unused", steps=50, warmup_steps=10))
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    reference = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=50).lr_lambdas[0]
    assert [clock.lr_factor(s) for s in range(50)] == pytest.approx([reference(s) for s in range(50)])


def test_a_time_budget_anneals_the_learning_rate_before_it_stops(tmp_path, monkeypatch):
    """The clock, not the 1,000 steps, ends this run: its learning rate must still reach 0 at the stop."""
    import diffusers_block.train.loop as loop

    now = {"t": 0.0}
    monkeypatch.setattr(loop.time, "time", lambda: now["t"])
    sample_batch, loss_fn = _problem()

    def one_second_a_step(step, rank, device):
        now["t"] = float(step)
        return sample_batch(step, rank, device)

    config = TrainConfig(str(tmp_path), steps=1000, lr=0.05, warmup_steps=5, log_every=5, max_minutes=0.5)
    train(_model(), one_second_a_step, loss_fn, config)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["stopped_early"] and log[-1]["step"] == 32  # step 31 begins at t=31 > 30 s
    lrs = [r["lr"] for r in log]
    assert lrs[0] == pytest.approx(0.05)  # warmup done at step 5
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == 0.0
    assert 0.01 < lrs[3] < 0.04  # step 20, 60% of the time left after warmup: ~0.017 (a steps-only cosine: ~0.05)


def test_rectified_flow_loss_is_zero_for_the_true_velocity():
    from diffusers_block.train.digits_image import rectified_flow_loss

    x0, noise, t = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5), torch.rand(3)
    seen = {}

    def true_velocity(x_t, timestep):
        seen["x_t"], seen["timestep"] = x_t, timestep
        return noise - x0

    assert rectified_flow_loss(true_velocity, x0, noise, t) == 0
    torch.testing.assert_close(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(seen["timestep"], t * 1000)
    assert rectified_flow_loss(lambda x_t, timestep: torch.zeros_like(x0), x0, noise, t) > 0


def test_digits_video_recipe_trains_saves_and_loads(tmp_path):
    from diffusers_block.eval.digits import generate_clips
    from diffusers_block.train.digits_video import train_digits_video
    from diffusers_block.zoo import load_digits_video_pipeline

    out = train_digits_video(str(tmp_path), vae_steps=1, steps=1, clips=8, vae_batch_size=2, flow_batch_size=2)
    for stage in ("vae", "transformer"):
        assert (tmp_path / "runs" / stage / "train_log.jsonl").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == index["tokenizer"] == ["diffusers_block.zoo.no_text_encoder", "NoTextEncoder"]
    assert type(DiffusionPipeline.from_pretrained(out)).__name__ == "WanPipeline"  # plain diffusers loading works
    pipe, encoder = load_digits_video_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.vae.config.latents_mean) == pipe.vae.config.z_dim  # statistics set from the training latents
    clips = generate_clips(pipe, encoder, torch.tensor([1]), torch.tensor([2]), steps=2)
    assert clips.shape == (1, 17, 1, 32, 32)


def test_digits_video_stages_run_apart(tmp_path):
    """--vae-only saves the autoencoder; --vae reuses it unchanged for the transformer stage."""
    from diffusers_block.train.digits_video import train_digits_video

    vae_dir = train_digits_video(str(tmp_path / "a"), vae_steps=1, steps=1, clips=8, vae_batch_size=2, vae_only=True)
    assert not (tmp_path / "a" / "runs" / "transformer").exists()
    out = train_digits_video(str(tmp_path / "b"), vae_steps=1, steps=1, clips=8, flow_batch_size=2, vae_from=vae_dir)
    assert not (tmp_path / "b" / "runs" / "vae").exists()
    trained = safetensors_file(vae_dir / "diffusion_pytorch_model.safetensors")
    shipped = safetensors_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    for name, tensor in trained.items():  # the pipeline ships the reused autoencoder (cast to bf16)
        torch.testing.assert_close(shipped[name].float(), tensor.to(torch.bfloat16).float())
    with pytest.raises(FileNotFoundError, match="--vae-only"):
        train_digits_video(str(tmp_path / "c"), vae_steps=1, steps=1, clips=8, vae_from=str(tmp_path / "missing"))


def test_long_sequence_video_recipe_shares_the_shipped_autoencoder(tmp_path):
    """A 64 px canvas with 14 px digits (4x the tokens) trains on the shipped 32 px autoencoder; shipped without vae/,
    the loader attaches that autoencoder again."""
    import shutil

    from diffusers_block.train.digits_video import train_digits_video
    from diffusers_block.zoo import load_digits_video_pipeline, model_path

    shipped_video = model_path("digits-video")

    out = train_digits_video(
        str(tmp_path),
        vae_steps=1,
        steps=1,
        clips=4,
        flow_batch_size=2,
        vae_from=str(shipped_video),
        canvas=64,
        digit_size=14,
        width=128,
        layers=2,
    )
    shutil.rmtree(out / "vae")
    pipe, encoder = load_digits_video_pipeline(out)
    assert pipe.transformer.config.num_layers == 2 and pipe.transformer.config.num_attention_heads == 2
    shipped = safetensors_file(shipped_video / "vae" / "diffusion_pytorch_model.safetensors")
    for name, tensor in pipe.vae.state_dict().items():
        torch.testing.assert_close(tensor, shipped[name].float())
    clips = pipe(
        **encoder.prompt_kwargs([3], [0]), num_frames=17, height=64, width=64, num_inference_steps=2, output_type="pt"
    ).frames
    assert clips.shape == (1, 17, 1, 64, 64)
