"""The distribution-matching (DMD) option of ``train distill``: its re-noising, the DMD gradient and the critic's
loss on a 2-D Gaussian-mixture flow whose velocities are exact, and the option end to end on the tiny SD3 teacher
(logged terms, the critic checkpointed and resumed, bad values refused)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_distill import _ToyTask, toy_distillation
from torch import nn

from diffusers_block.train.distribution_matching import (
    DistributionMatchingConfig,
    critic_loss,
    dmd_loss,
    draw_sigmas,
    renoise,
)

MODES = 4
CENTRES = 2.0 * torch.stack(
    [torch.cos(torch.arange(MODES) * 2 * math.pi / MODES), torch.sin(torch.arange(MODES) * 2 * math.pi / MODES)], 1
)


def _mixture_velocity(std: float):
    """The exact flow-matching velocity of an equal mixture of N(centre, std^2 I) (x_s = (1 - s) x0 + s eps)."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.float().view(-1, 1)
        variance = ((1 - s) * std) ** 2 + s**2
        centred = x[:, None, :] - (1 - s)[:, None] * CENTRES[None]
        weights = torch.softmax(-centred.square().sum(-1) / (2 * variance), dim=1)
        posterior = CENTRES[None] + ((1 - s) * std**2 / variance)[:, None] * centred
        return (x - (weights[..., None] * posterior).sum(1)) / s

    return velocity


def _states(n: int, std: float, level: float, generator: torch.Generator) -> torch.Tensor:
    """States at noise level ``level`` of the mixture with component std ``std``."""
    x0 = CENTRES[torch.randint(0, MODES, (n,), generator=generator)] + std * torch.randn(n, 2, generator=generator)
    return (1 - level) * x0 + level * torch.randn(n, 2, generator=generator)


def _energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


TEACHER_STD, BLURRED_STD = 0.1, 0.5


def test_renoising_takes_the_flow_states_at_one_level_to_those_at_a_higher_one():
    generator = torch.Generator().manual_seed(0)
    n, a, b, x0 = 200_000, 0.3, 0.7, 1.5
    x_a = (1 - a) * x0 + a * torch.randn(n, 1, generator=generator)
    x_b = renoise(x_a, torch.full((n,), a), torch.full((n,), b), torch.randn(n, 1, generator=generator))
    assert float(x_b.mean()) == pytest.approx((1 - b) * x0, abs=0.01)
    assert float(x_b.std()) == pytest.approx(b, abs=0.01)
    clean = torch.randn(n, 1, generator=generator)
    noise = torch.randn(n, 1, generator=generator)
    expected = (1 - b) * clean + b * noise
    assert torch.allclose(renoise(clean, torch.zeros(n), torch.full((n,), b), noise), expected)  # a = 0: the usual
    levels = torch.tensor([0.0, 0.5, 0.9])
    sigmas = draw_sigmas(levels.repeat(1000), (0.02, 0.98), torch.Generator().manual_seed(1)).view(1000, 3)
    assert (sigmas > levels).all() and (sigmas < 1).all()


@pytest.mark.parametrize("level, rate, bound", [(0.0, 0.05, 0.4), (0.4, 0.01, 0.8)])
def test_dmd_gradient_moves_blurred_samples_onto_the_teachers_distribution(level, rate, bound):
    """With exact real and fake flows, following DMD's gradient takes samples of a blurred mixture (at noise level
    ``level``, as a student step landing there) towards the teacher's states at that level. The fake flow stays the
    blurred mixture's here (in training the critic follows the samples), so only the first moves are meaningful:
    at level 0.4, where the two are already close, longer or larger moves overshoot."""
    generator = torch.Generator().manual_seed(0)
    teacher = _states(1500, TEACHER_STD, level, generator)
    samples = _states(1500, BLURRED_STD, level, generator).requires_grad_()
    levels = torch.full((1500,), level)
    real, fake = _mixture_velocity(TEACHER_STD), _mixture_velocity(BLURRED_STD)
    before = _energy_distance(samples.detach(), teacher)
    for _ in range(30):
        sigma = draw_sigmas(levels, (0.02, 0.98), generator)
        noise = torch.randn(samples.shape, generator=generator)
        loss = dmd_loss(samples, levels, samples.detach(), real, fake, sigma, noise)
        (gradient,) = torch.autograd.grad(loss, samples)
        with torch.no_grad():
            samples -= rate * gradient * samples.numel()  # the loss is a mean: steps per sample
    after = _energy_distance(samples.detach(), teacher)
    assert after < bound * before, (before, after)


class _Critic(nn.Module):
    """The teacher's flow plus a learned change of its clean prediction, zero at start (the critic starts as the
    teacher, as the transformer critic does)."""

    def __init__(self) -> None:
        super().__init__()
        self.change = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
        nn.init.zeros_(self.change[-1].weight)
        nn.init.zeros_(self.change[-1].bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.float().view(-1, 1)
        return _mixture_velocity(TEACHER_STD)(x, sigma) - self.change(torch.cat([x, s], 1)) / s


@pytest.mark.parametrize("level, bound", [(0.0, 0.75), (0.4, 0.85)])
def test_critic_loss_teaches_the_critic_the_flow_of_the_samples(level, bound):
    """Trained with ``critic_loss`` on samples of a blurred mixture at noise level ``level``, the critic (starting as
    the teacher) closes part of the gap between the teacher's flow and the blurred mixture's exact flow: its loss on
    held-out draws falls from the teacher's towards the exact flow's (the loss's floor)."""
    torch.manual_seed(0)
    critic = _Critic()
    optimizer = torch.optim.AdamW(critic.parameters(), lr=3e-3, weight_decay=0.0)
    generator, held_out = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    levels = torch.full((20000,), level)
    draws = (
        _states(20000, BLURRED_STD, level, held_out),
        levels,
        draw_sigmas(levels, (0.02, 0.98), held_out),
        torch.randn(20000, 2, generator=held_out),
    )

    def held_out_loss(velocity) -> float:
        with torch.no_grad():
            return float(critic_loss(velocity, *draws))

    floor, start = held_out_loss(_mixture_velocity(BLURRED_STD)), held_out_loss(critic)
    assert start > floor  # the teacher is not the blurred mixture's flow
    for _ in range(500):
        samples, batch_levels = _states(256, BLURRED_STD, level, generator), torch.full((256,), level)
        batch_sigma = draw_sigmas(batch_levels, (0.02, 0.98), generator)
        loss = critic_loss(critic, samples, batch_levels, batch_sigma, torch.randn(256, 2, generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gap_left = (held_out_loss(critic) - floor) / (start - floor)
    assert gap_left < bound, gap_left


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight": -1.0}, "--dmd-weight must be >= 0"),
        ({"weight": 1.0, "critic_steps": 0}, "--critic-steps must be >= 1"),
        ({"critic_rank": 0}, "--critic-rank"),
        ({"critic_lr": 0.0}, "--critic-lr"),
        ({"renoise": (0.5, 0.2)}, "renoise"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DistributionMatchingConfig(**options)


def test_bad_command_line_values_are_refused_before_any_work(tmp_path):
    from diffusers_block.train.__main__ import main

    for flag, value, message in (("--dmd-weight", "-0.5", "--dmd-weight"), ("--critic-steps", "0", "--critic-steps")):
        with pytest.raises(ValueError, match=message):
            main(["distill", "--teacher", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), flag, value])


def test_guided_velocity_takes_one_sigma_per_sample():
    from diffusers_block.distill.trajectories import GuidedVelocity

    task = _ToyTask()
    labels = torch.tensor([0, 1, 1])
    velocity = GuidedVelocity(task.transformer, task.conditioning(labels), task.conditioning(labels, True), 2.0)
    x = torch.randn(3, *task.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = velocity(x, 0.5)
        each = velocity(x, torch.tensor([0.5, 0.5, 0.5]))
        mixed = velocity(x, torch.tensor([0.5, 0.9, 0.5]))
    assert torch.equal(one, each)
    assert torch.equal(mixed[0], one[0]) and not torch.allclose(mixed[1], one[1])


STEPS, CHECKPOINT = 6, 3


def _distill(folder, name: str):
    matching = DistributionMatchingConfig(weight=0.5, critic_steps=2, critic_rank=2, critic_lr=1e-3)
    return toy_distillation(folder, name, STEPS, CHECKPOINT, batch_size=8, distribution_matching=matching)


def test_distillation_with_distribution_matching_logs_its_terms_and_resumes_its_critic(tmp_path):
    from diffusers_block.distill import load

    _distill(tmp_path, "full")
    log = [json.loads(line) for line in (tmp_path / "full" / "runs" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == STEPS
    for record in log:
        assert {"trajectory", "dmd", "critic_loss"} <= set(record)
        assert all(math.isfinite(record[key]) for key in ("loss", "trajectory", "dmd", "critic_loss"))
        assert record["loss"] == pytest.approx(record["trajectory"] + 0.5 * record["dmd"], rel=1e-4)
    checkpoint = tmp_path / "full" / "runs" / "checkpoints" / f"step-{CHECKPOINT}"
    assert (checkpoint / "model_1.safetensors").is_file() and (checkpoint / "optimizer_1.bin").is_file()  # critic

    # resumed from the step-3 checkpoint (students, critic, both optimizers, RNG): the same students as the full run
    (tmp_path / "resumed" / "runs" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "runs" / "checkpoints" / f"step-{CHECKPOINT}")
    _distill(tmp_path, "resumed")
    full, resumed = (load(tmp_path / name / "student").state_dict() for name in ("full", "resumed"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
