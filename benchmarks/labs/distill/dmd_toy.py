"""Does the distribution-matching term (``train distill --dmd-weight``) help a student that blurs? A 2-D study, CPU.

The teacher is the exact flow of a Gaussian mixture (4 modes of std 0.1 on a circle of radius 2); the student, a
small MLP, covers the whole flow in one step from noise, trained through the shared loop (``loop.train``) exactly as
``train distill`` trains segment students: the trajectory loss (the teacher's average velocity over the step, from
its 200-step solve), plus, with ``--weight``, the DMD term of ``train.distribution_matching`` with a critic trained in
alternation (the teacher's flow plus a learned change of its clean prediction, zero at start). ``--kde`` replaces the
learned critic by the exact flow of a kernel density of the student's current samples (a stand-in for a perfect
critic). Reported: the energy distance of 2000 student samples to 2000 of the teacher's (and the floor, teacher vs
teacher on other noises) and the fraction of samples farther than 3 std from every mode.

    python benchmarks/labs/distill/dmd_toy.py --steps 2000                       # trajectory loss only
    python benchmarks/labs/distill/dmd_toy.py --steps 2000 --weight 0.3 --critic-steps 5 --critic-lr 3e-3
    python benchmarks/labs/distill/dmd_toy.py --steps 2000 --weight 0.3 --kde
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_block.train.distribution_matching import DistributionMatching, DistributionMatchingConfig
from diffusers_block.train.loop import TrainConfig, train

MODES, RADIUS, STD = 4, 2.0, 0.1
_angles = torch.arange(MODES) * 2 * math.pi / MODES
CENTRES = RADIUS * torch.stack([_angles.cos(), _angles.sin()], 1)


def mixture_velocity(x: torch.Tensor, sigma: torch.Tensor, centres=CENTRES, std=STD) -> torch.Tensor:
    """Exact flow-matching velocity of an equal mixture of N(centre, std^2 I)."""
    s = sigma.float().view(-1, 1)
    variance = ((1 - s) * std) ** 2 + s**2
    centred = x[:, None, :] - (1 - s)[:, None] * centres[None]
    weights = torch.softmax(-centred.square().sum(-1) / (2 * variance), dim=1)
    posterior = centres[None] + ((1 - s) * std**2 / variance)[:, None] * centred
    return (x - (weights[..., None] * posterior).sum(1)) / s


def teacher_samples(noise: torch.Tensor, steps: int = 200) -> torch.Tensor:
    sigmas = torch.linspace(1, 0, steps + 1)
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * mixture_velocity(x, s.expand(len(x)))
    return x


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, outputs)
    )


class OneStepStudent(nn.Module):
    """``velocities`` / ``forward`` as ``TrajectoryObjective``'s, for one segment of one step from sigma 1 to 0."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = _mlp(2, hidden, 2)
        self.distribution_matching = None

    def velocities(self, batch: list[dict]) -> list[torch.Tensor]:
        return [self.net(batch[0]["x"])]

    def forward(self, batch: list[dict]):
        velocities = self.velocities(batch)
        loss = F.mse_loss(velocities[0], batch[0]["target"])
        if self.distribution_matching is None:
            return loss
        term, logged = self.distribution_matching.generator_loss(batch, velocities)
        return loss + term, {"trajectory": loss.detach(), **logged}


class Critic(nn.Module):
    """The teacher's flow plus a learned change of its clean prediction, zero at start."""

    def __init__(self) -> None:
        super().__init__()
        self.change = _mlp(3, 64, 2)
        nn.init.zeros_(self.change[-1].weight)
        nn.init.zeros_(self.change[-1].bias)

    def forward(self, x, sigma, inputs):
        s = sigma.float().view(-1, 1)
        return mixture_velocity(x, sigma) - self.change(torch.cat([x, s], 1)) / s


class KernelDensityCritic(nn.Module):
    """The exact flow of a kernel density (bandwidth 0.05) of the student's current samples from fixed noises."""

    def __init__(self, student: OneStepStudent) -> None:
        super().__init__()
        object.__setattr__(self, "student", student)
        self.noise = torch.randn(1024, 2, generator=torch.Generator().manual_seed(7))

    def forward(self, x, sigma, inputs):
        with torch.no_grad():
            centres = self.noise - self.student.net(self.noise)
        return mixture_velocity(x, sigma, centres, 0.05)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def off_modes(x: torch.Tensor) -> float:
    return float((torch.cdist(x, CENTRES).min(1).values > 3 * STD).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="student updates")
    parser.add_argument("--hidden", type=int, default=16, help="student MLP width")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight", type=float, default=0.0, help="--dmd-weight (0: trajectory loss only)")
    parser.add_argument("--critic-steps", type=int, default=2)
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--kde", action="store_true", help="a kernel-density critic instead of the learned one")
    parser.add_argument("--init", help="start from this student state dict (--save of an earlier run)")
    parser.add_argument("--save", help="save the trained student's state dict here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    clean = teacher_samples(noise)
    torch.manual_seed(0)
    student = OneStepStudent(args.hidden)
    if args.init:
        student.load_state_dict(torch.load(args.init))
    critic = None
    if args.weight > 0:
        config = DistributionMatchingConfig(
            weight=args.weight, critic_steps=args.critic_steps, critic_lr=args.critic_lr
        )
        real = lambda part, x, sigma: mixture_velocity(x, sigma)  # noqa: E731
        matching = DistributionMatching(config, real, KernelDensityCritic(student) if args.kde else Critic())
        student.distribution_matching = matching
        critic = None if args.kde else matching.auxiliary(student.velocities)

    def sample_batch(step: int, rank: int, device) -> list[dict]:
        index = torch.randint(0, len(noise), (256,), generator=torch.Generator().manual_seed(step))
        x = noise[index]
        ones = torch.ones(256)
        return [{"x": x, "sigma": ones, "sigma_next": 0 * ones, "target": x - clean[index], "inputs": {}}]

    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            output_dir=folder,
            steps=args.steps,
            batch_size=256,
            lr=args.lr,
            warmup_steps=20,
            ema_decay=0.9,
            log_every=max(args.steps // 5, 1),
            checkpoint_every=10**9,
        )
        started = time.time()
        trained = train(student, sample_batch, lambda model, batch: model(batch), config, auxiliary=critic)
        seconds = time.time() - started
        log = [json.loads(line) for line in open(f"{folder}/train_log.jsonl")]
    if args.save:
        torch.save(trained.state_dict(), args.save)
    held_out = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    other = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    truth = teacher_samples(held_out)
    with torch.no_grad():
        samples = held_out - trained.net(held_out)
    result = {
        "energy_distance": round(energy_distance(samples, truth), 4),
        "floor": round(energy_distance(teacher_samples(other), truth), 4),
        "off_modes": round(off_modes(samples), 3),
        "teacher_off_modes": round(off_modes(truth), 3),
        "train_s": round(seconds, 1),
        "log": [{k: round(v, 4) for k, v in r.items() if k not in ("lr", "elapsed_s")} for r in log],
    }
    print(json.dumps({"args": vars(args), **result}))


if __name__ == "__main__":
    main()
