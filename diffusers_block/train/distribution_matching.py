"""Distribution matching beside trajectory distillation (DMD / TDM-style, data-free): ``train distill --dmd-weight``.

Why: a student step that regresses the teacher's average velocity learns, for each state, the *mean* of where the
teacher goes. Where the teacher's flow splits a neighbourhood of states between modes faster than a small student
can follow, the mean lies between them, and the student's samples fall in the gaps (blur). A distribution-matching
term does not ask where each state goes, only that what a step lands on be distributed as the teacher's states there,
which pulls the samples in the gaps onto the modes.

How, for flow matching (x_s = (1 - s) x0 + s eps, velocity eps - x0, x0 = x_s - s v):

- What is matched, per student step (TDM-style): the state the step lands on, ``x_next = x + (s_next - s) v``, from
  a teacher state ``x`` at ``s``, against the teacher's states at ``s_next``. The last step of the last segment lands
  at ``s_next = 0``, where ``x_next = x - s v`` is the step's predicted clean sample, exactly DMD's. Intermediate
  steps are matched at their own noise level rather than through the clean sample they extrapolate,
  ``x - s v``: for a student trained on the teacher's *average* velocity over a step, that extrapolation follows
  the step's chord, not the teacher's data, so matching it to the data would fight the trajectory loss. Every step
  trains from teacher states, as the trajectory loss does: no rollouts through other segments' students.
- Re-noising: a state at level ``a`` goes to a random ``b`` in ``(a, 1)`` with
  ``x_b = (1 - b) / (1 - a) x_a + c eps``, ``c = sqrt(b^2 - ((1 - b) a / (1 - a))^2)``, which maps the teacher's
  states at ``a`` onto its states at ``b`` (and is the usual ``(1 - b) x0 + b eps`` for ``a = 0``).
- The "real" flow is the teacher with classifier-free guidance folded in; the "fake" flow is a critic, a copy of the
  teacher with its own low-rank deltas (a one-segment :class:`BlockwiseFlowModel`), trained online to be the flow of
  the students' re-noised outputs (denoising score matching from level ``a``, turned into a velocity target, weighted
  by ``(c / b)^2`` so that targets near ``b = a`` do not dominate; for ``a = 0`` it is plain flow matching).
- The student's gradient on ``x_next`` is DMD's: ``g = x0_fake(x_b) - x0_real(x_b)``, divided per sample by the mean
  of ``|x0_hat - x0_real|`` (``x0_hat = x - s v``), as the loss ``0.5 ||x_next - stopgrad(x_next - g)||^2``.
- Two time scales: ``critic_steps`` critic updates (on the same students' outputs, fresh noise) before each student
  update; the critic is checkpointed and resumed with the students by the training loop (:class:`loop.Auxiliary`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distill.model import BlockwiseFlowModel
from ..distill.schedule import SegmentSchedule
from ..distill.trajectories import GuidedVelocity, transformer_velocity
from .loop import Auxiliary

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, per-sample sigma) -> velocity


@dataclass(frozen=True)
class DistributionMatchingConfig:
    """``weight`` of the DMD term beside the trajectory loss (0: off); ``critic_steps`` critic updates per student
    update; ``critic_rank`` of the critic's low-rank deltas; ``critic_lr`` its (constant) AdamW learning rate;
    ``renoise`` the range, as fractions of ``(a, 1)``, of the noise level a step's output is re-noised to."""

    weight: float = 0.0
    critic_steps: int = 2
    critic_rank: int = 8
    critic_lr: float = 1e-3
    renoise: tuple[float, float] = (0.02, 0.98)

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"--dmd-weight must be >= 0 (0 turns distribution matching off), got {self.weight}")
        if self.critic_steps < 1:
            raise ValueError(f"--critic-steps must be >= 1 critic update per student update, got {self.critic_steps}")
        if self.critic_rank < 1:
            raise ValueError(f"--critic-rank must be >= 1, got {self.critic_rank}")
        if not self.critic_lr > 0:
            raise ValueError(f"--critic-lr must be > 0, got {self.critic_lr}")
        low, high = self.renoise
        if not 0 <= low < high <= 1:
            raise ValueError(f"renoise must be a range 0 <= low < high <= 1, got {self.renoise}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.float().view(-1, *([1] * (like.ndim - 1)))


def _renoising(level: torch.Tensor, sigma: torch.Tensor, like: torch.Tensor):
    """(a, b, keep, added) per sample, broadcastable to ``like``: ``x_b = keep x_a + added eps``."""
    a, b = _per_sample(level, like), _per_sample(sigma, like)
    keep = (1 - b) / (1 - a)
    added = (b.square() - (keep * a).square()).clamp_min(0).sqrt()
    return a, b, keep, added


def renoise(x: torch.Tensor, level: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """States ``x`` at noise levels ``level`` (B,) taken to the higher levels ``sigma`` (B,) with fresh ``noise``."""
    _, _, keep, added = _renoising(level, sigma, x)
    return keep * x.float() + added * noise.float()


def draw_sigmas(level: torch.Tensor, fractions: tuple[float, float], generator=None) -> torch.Tensor:
    """A random noise level above each of ``level`` (B,): ``a + (1 - a) u``, ``u`` uniform in ``fractions``."""
    low, high = fractions
    u = low + (high - low) * torch.rand(level.shape, generator=generator, device=level.device)
    return level.float() + (1 - level.float()) * u


def critic_loss(
    critic: Velocity, samples: torch.Tensor, level: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Flow-matching loss of ``critic`` on ``samples`` (at noise levels ``level``) re-noised to ``sigma``.

    Its minimiser is the velocity field whose states at ``sigma`` are the re-noised samples: the target is the
    denoising-score-matching one, ``score = -eps / c``, written as a velocity (``v = -(x + b score) / (1 - b)``),
    which for ``a = 0`` is the usual ``eps - x0``.
    """
    samples, noise = samples.detach().float(), noise.float()
    a, b, keep, added = _renoising(level, sigma, samples)
    x = keep * samples + added * noise
    added = added.clamp_min(1e-6)
    target = ((b * (1 - a) + keep * a.square()) / added * noise - samples) / (1 - a)
    weight = (added / b).square()
    return (weight * (critic(x, sigma).float() - target).square()).mean()


def dmd_loss(
    samples: torch.Tensor,
    level: torch.Tensor,
    x0_estimate: torch.Tensor,
    real: Velocity,
    fake: Velocity,
    sigma: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """DMD's generator loss on ``samples`` (at noise levels ``level``, with gradient): its gradient is the difference
    of the fake and real flows' clean predictions at the samples re-noised to ``sigma``, normalised per sample by
    the mean ``|x0_estimate - x0_real|`` (DMD's normaliser; ``x0_estimate`` is the step's clean prediction)."""
    with torch.no_grad():
        x = renoise(samples.detach(), level, sigma, noise)
        b = _per_sample(sigma, x)
        x0_real = x - b * real(x, sigma).float()
        x0_fake = x - b * fake(x, sigma).float()
        dims = tuple(range(1, x.ndim))
        scale = (x0_estimate.detach().float() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        gradient = torch.nan_to_num((x0_fake - x0_real) / scale)
    samples = samples.float()
    return 0.5 * F.mse_loss(samples, (samples - gradient).detach())


class DistributionMatching:
    """The DMD term of a trajectory objective and its critic's loss, on the objective's batches: one dict per
    segment with ``x`` (teacher states), ``sigma`` / ``sigma_next`` (B,) (the step each state starts) and ``inputs``
    (the conditioning); ``real(part, x, sigma)`` is the teacher's (guided) velocity for the conditioning of ``part``;
    ``critic(x, sigma, inputs)`` the fake flow's (a module: the loop trains it, see :meth:`auxiliary`)."""

    def __init__(
        self,
        config: DistributionMatchingConfig,
        real: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
        critic: nn.Module,
    ) -> None:
        if not config.enabled:
            raise ValueError("distribution matching needs a weight > 0 (--dmd-weight)")
        self.config, self.real, self.critic = config, real, critic
        self._samples_of, self._samples = None, None

    @staticmethod
    def step_outputs(part: dict, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(where the step lands, its noise level, the step's clean prediction ``x - s v``)."""
        s, s_next = _per_sample(part["sigma"], velocity), _per_sample(part["sigma_next"], velocity)
        x = part["x"].float()
        return x + (s_next - s) * velocity, part["sigma_next"].float(), x - s * velocity

    def generator_loss(self, batch: list[dict], velocities: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """``weight`` times the mean DMD loss of every segment's steps, and the unweighted term for the log."""
        losses = []
        for part, velocity in zip(batch, velocities):
            landed, level, x0 = self.step_outputs(part, velocity)
            sigma = draw_sigmas(level, self.config.renoise)
            real = lambda x, s, part=part: self.real(part, x, s)  # noqa: E731
            fake = lambda x, s, part=part: self.critic(x, s, part["inputs"])  # noqa: E731
            losses.append(dmd_loss(landed, level, x0, real, fake, sigma, torch.randn_like(landed)))
        term = torch.stack(losses).mean()
        return self.config.weight * term, {"dmd": term.detach()}

    def critic_loss(self, critic: nn.Module, batch: list[dict], velocities: Callable[[list[dict]], list]):
        """The critic's flow-matching loss on the students' outputs for ``batch`` (computed once per batch, however
        many critic updates use them, with ``velocities(batch)``); ``critic`` is the module the loop prepared."""
        if self._samples_of is not batch:
            with torch.no_grad():
                outputs = [self.step_outputs(p, v) for p, v in zip(batch, velocities(batch))]
            self._samples_of, self._samples = batch, [(landed, level) for landed, level, _ in outputs]
        losses = []
        for part, (landed, level) in zip(batch, self._samples):
            sigma = draw_sigmas(level, self.config.renoise)
            fake = lambda x, s, part=part: critic(x, s, part["inputs"])  # noqa: E731
            losses.append(critic_loss(fake, landed, level, sigma, torch.randn_like(landed)))
        return torch.stack(losses).mean()

    def auxiliary(self, velocities: Callable[[list[dict]], list]) -> Auxiliary:
        """The critic as the training loop's second model: ``critic_steps`` updates before each student update."""
        return Auxiliary(
            model=self.critic,
            loss_fn=lambda critic, batch: self.critic_loss(critic, batch, velocities),
            steps=self.config.critic_steps,
            lr=self.config.critic_lr,
            name="critic",
        )


class TransformerCritic(nn.Module):
    """The fake flow of a diffusers teacher: the teacher (its frozen weights shared) with its own rank-``rank``
    deltas on every linear, i.e. the one student of a one-segment :class:`BlockwiseFlowModel` keeping every block.
    It starts as the unguided teacher. Only the deltas (``flow``) are registered, as for the students."""

    def __init__(self, teacher: nn.Module, rank: int) -> None:
        super().__init__()
        device = next(teacher.parameters()).device
        self.flow = BlockwiseFlowModel.for_teacher(teacher, SegmentSchedule((1.0, 0.0), (1,)), rank=rank).to(device)
        object.__setattr__(self, "transformer", self.flow.build_students(teacher, trainable=True)[0])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, inputs: dict) -> torch.Tensor:
        return transformer_velocity(self.transformer, x, sigma, inputs)


def attach(objective, task, guidance_scale: float, config: DistributionMatchingConfig) -> Auxiliary:
    """Give a distillation ``TrajectoryObjective`` a DMD term against ``task``'s teacher guided at
    ``guidance_scale``; returns the critic for the training loop (``train(..., auxiliary=...)``)."""

    def real(part: dict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        uncond = task.conditioning(part["labels"], null=True)
        return GuidedVelocity(task.transformer, part["inputs"], uncond, guidance_scale)(x, sigma)

    matching = DistributionMatching(config, real, TransformerCritic(task.transformer, config.critic_rank))
    objective.distribution_matching = matching
    return matching.auxiliary(objective.velocities)
