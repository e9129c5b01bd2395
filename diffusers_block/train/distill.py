"""Distil a flow-matching teacher pipeline into segment students (``python -m diffusers_block.train distill``).

1. Calibration: the teacher's guided flow from a few hundred noises, solved on a fine grid; it picks the
   student's grid (uniform, or the curvature-optimal one of :func:`distill.schedule.optimal_grid`) and, with
   ``--blocks calibration``, which blocks each segment keeps.
2. Trajectories: the guided flow from ``--trajectories`` noises and random labels, recorded at the student's grid
   points (no dataset: the teacher is the data).
3. Training: each student step regresses the teacher's average velocity over that step,
   ``(x(s_next) - x(s)) / (s_next - s)``, from the teacher's state at ``s``; the segments' students train together,
   each on its own share of every batch, through the shared loop (accelerate, EMA, checkpoints); with
   ``--dmd-weight``, plus a distribution-matching term (:mod:`.distribution_matching`).
4. With ``--residual-trunk N``: the feature residual approximation of each segment's first N blocks
   (:mod:`.trunk_residual`), on pairs of states of the same trajectories, after the students.

``--init-student DIR`` starts from a trained student (its schedule, blocks and low-rank factors) instead of
planning a new one; with ``--steps 0`` only the residual networks train.
"""

from __future__ import annotations

import functools
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import load
from ..distill.importance import calibration_scores, choose_blocks, weight_scores
from ..distill.model import BlockwiseFlowModel, block_names
from ..distill.schedule import SegmentSchedule, euler_defects, optimal_grid, split_steps, uniform_sigmas
from ..distill.trajectories import GuidedVelocity, solve, transformer_velocity
from . import distribution_matching
from .digits_image import generator_for_step
from .distribution_matching import DistributionMatchingConfig
from .loop import TrainConfig, process_device, process_rows, train
from .trunk_residual import TrunkResidualObjective, pair_batches

CALIBRATION_SAMPLES = 256


@dataclass
class DistillConfig:
    segments: int = 2
    steps_per_segment: int = 4
    grid: str = "uniform"  # or "optimal"
    blocks: str = "all"  # all | first | weights | calibration
    keep: int | None = None  # blocks each student keeps (all of them for blocks="all")
    rank: int = 4
    guidance_scale: float = 3.0
    trajectories: int = 20000
    fine_steps: int = 96
    generation_batch: int = 1024
    init_student: str | None = None  # start from this student's schedule, blocks and factors
    residual_trunk: int | None = None  # feature residual approximation of the first N blocks (None: off)
    residual_width: int = 64
    residual_steps: int = 1000
    distribution_matching: DistributionMatchingConfig = field(default_factory=DistributionMatchingConfig)  # --dmd-*


class DigitsTask:
    """A shipped digits pipeline as a distillation task: random labels and the transformer inputs they give."""

    def __init__(self, path: str | Path, device: str, dtype: torch.dtype = torch.float32) -> None:
        from ..zoo import load_digits_image_pipeline, load_digits_video_pipeline

        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
        self.video = config["_class_name"] == "WanTransformer3DModel"
        if self.video:
            self.pipe, self.encoder = load_digits_video_pipeline(path, device=device, dtype=dtype)
            frames, size = 17, 32
            self.latent_shape = (
                config["in_channels"],
                (frames - 1) // self.pipe.vae_scale_factor_temporal + 1,
                size // self.pipe.vae_scale_factor_spatial,
                size // self.pipe.vae_scale_factor_spatial,
            )
        else:
            self.pipe, self.encoder = load_digits_image_pipeline(path, device=device, dtype=dtype)
            self.latent_shape = (config["in_channels"], config["sample_size"], config["sample_size"])
        self.transformer = self.pipe.transformer.requires_grad_(False)
        self.encoder.requires_grad_(False)

    def sample_labels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) digits, or (n, 2) digits and motions for the video model."""
        device = generator.device
        digits = torch.randint(0, 10, (n,), generator=generator, device=device)
        if not self.video:
            return digits
        motions = torch.randint(0, self.encoder.config.num_motions, (n,), generator=generator, device=device)
        return torch.stack([digits, motions], dim=1)

    @torch.no_grad()
    def conditioning(self, labels: torch.Tensor, null: bool = False) -> dict[str, torch.Tensor]:
        if self.video:
            digits, motions = self.encoder.null_labels(len(labels)) if null else labels.unbind(1)
            return {"encoder_hidden_states": self.encoder(digits, motions)}
        labels = torch.full_like(labels, self.encoder.null_label) if null else labels
        tokens, pooled = self.encoder(labels)
        return {"encoder_hidden_states": tokens, "pooled_projections": pooled}

    def guided_velocity(self, labels: torch.Tensor, guidance_scale: float) -> GuidedVelocity:
        return GuidedVelocity(
            self.transformer, self.conditioning(labels), self.conditioning(labels, null=True), guidance_scale
        )


def teacher_flow(task, n: int, sigmas, keep, guidance_scale: float, batch: int, seed: int, device):
    """States of the guided teacher flow at grid points ``keep`` for ``n`` random (noise, label) pairs: (states
    (len(keep), n, ...) on the CPU, labels, velocities or None), generated in batches under bf16 autocast on GPU."""
    generator = torch.Generator(device).manual_seed(seed)
    states, labels, velocities = [], [], []
    autocast = torch.autocast("cuda", torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()
    for start in range(0, n, batch):
        count = min(batch, n - start)
        chosen = task.sample_labels(count, generator)
        noise = torch.randn((count, *task.latent_shape), generator=generator, device=device)
        with autocast:
            x, v = solve(task.guided_velocity(chosen, guidance_scale), noise, sigmas, keep)
        states.append(x.cpu())
        labels.append(chosen.cpu())
        if v is not None:
            velocities.append(v.cpu())
    return torch.cat(states, dim=1), torch.cat(labels), (torch.cat(velocities, dim=1) if velocities else None)


def plan(task, config: DistillConfig, seed: int, device) -> tuple[SegmentSchedule, list[list[str]], dict]:
    """The student's schedule and each segment's blocks, from one calibration solve; returns what it measured."""
    fine = uniform_sigmas(config.fine_steps)
    num_steps = config.segments * config.steps_per_segment
    report: dict = {}
    needs_calibration = config.grid == "optimal" or config.blocks == "calibration"
    if needs_calibration:
        states, labels, velocities = teacher_flow(
            task, CALIBRATION_SAMPLES, fine, None, config.guidance_scale, config.generation_batch, seed + 7919, device
        )
    if config.grid == "optimal":
        defects = euler_defects(states, velocities, fine)
        indices = optimal_grid(defects, num_steps)
        sigmas = tuple(fine[i] for i in indices)
        report["euler_defect"] = float(sum(defects[a, b] for a, b in zip(indices, indices[1:])))
    elif config.grid == "uniform":
        if config.fine_steps % num_steps:
            raise ValueError(
                f"--fine-steps ({config.fine_steps}) must be a multiple of the student's {num_steps} steps, so that "
                f"the teacher's solve passes through every student grid point"
            )
        sigmas = uniform_sigmas(num_steps)
    else:
        raise ValueError(f"grid must be 'uniform' or 'optimal', got {config.grid!r}")
    schedule = SegmentSchedule(sigmas, split_steps(num_steps, config.segments))

    names = block_names(task.transformer)
    keep = len(names) if config.keep is None else config.keep
    if config.blocks == "all":
        blocks = [names] * config.segments
    elif config.blocks == "first":
        blocks = [choose_blocks(names, keep)] * config.segments
    elif config.blocks == "weights":
        blocks = [choose_blocks(names, keep, weight_scores(task.transformer))] * config.segments
    elif config.blocks == "calibration":
        blocks, report["calibration_scores"] = [], []
        fine_index = {round(s, 6): i for i, s in enumerate(fine)}
        for k in range(config.segments):
            start, end = schedule.boundaries[k], schedule.boundaries[k + 1]
            points = [i for s, i in fine_index.items() if end < s <= start + 1e-9]

            def run(points=points):
                for i in points:
                    sigma = torch.full((len(labels),), fine[i], device=device)
                    chosen = labels.to(device)
                    transformer_velocity(task.transformer, states[i].to(device), sigma, task.conditioning(chosen))

            scores = calibration_scores(task.transformer, run)
            report["calibration_scores"].append(scores)
            blocks.append(choose_blocks(names, keep, scores))
    else:
        raise ValueError(f"blocks must be one of all, first, weights, calibration; got {config.blocks!r}")
    return schedule, blocks, report


def distill(task, out: str | Path, config: DistillConfig, train_config: TrainConfig) -> Path:
    """Plan, generate the teacher's trajectories, train the students; saves a :class:`BlockwiseFlowModel` (bf16).

    ``task`` is what :class:`DigitsTask` is for the shipped models: ``transformer`` (the teacher), ``latent_shape``,
    ``sample_labels(n, generator)``, ``conditioning(labels, null=False)`` and ``guided_velocity(labels, scale)``.
    """
    device = next(task.transformer.parameters()).device
    if config.init_student is not None:
        flow = load(config.init_student).to(device, torch.float32)
        flow = flow.with_residual_trunk(task.transformer, config.residual_trunk, config.residual_width)
        schedule, blocks, report = flow.schedule, flow.config.blocks, {"init_student": str(config.init_student)}
    else:
        schedule, blocks, report = plan(task, config, train_config.seed, device)
        residual = {"residual_trunk": config.residual_trunk, "residual_width": config.residual_width}
        flow = BlockwiseFlowModel.for_teacher(
            task.transformer, schedule, blocks, config.rank, config.guidance_scale, **residual
        )
    flow.to(device)  # the students' parametrizations read these factors beside the teacher's weights
    grid = [round(s, 6) for s in uniform_sigmas(config.fine_steps)]
    off_grid = [s for s in schedule.sigmas if round(s, 6) not in grid]
    if off_grid:
        raise ValueError(
            f"the student's sigmas {off_grid} are not on the teacher's uniform grid of --fine-steps "
            f"{config.fine_steps}: pick --fine-steps so that its grid passes through every sigma of the student"
        )
    keep = [grid.index(round(s, 6)) for s in schedule.sigmas]
    trains_residual = config.residual_trunk is not None and config.residual_steps > 0
    if train_config.steps > 0 or trains_residual:  # else (--steps 0, nothing to train): saved as it is
        states, labels, _ = teacher_flow(
            task,
            config.trajectories,
            grid,
            keep,
            config.guidance_scale,
            config.generation_batch,
            train_config.seed,
            device,
        )
    objective = TrajectoryObjective(flow, flow.build_students(task.transformer, trainable=True))
    if train_config.steps > 0:
        critic = None
        if config.distribution_matching.enabled:
            critic = distribution_matching.attach(objective, task, config.guidance_scale, config.distribution_matching)
        batches = _batches(task, schedule, states, labels, train_config)
        objective = train(objective, batches, _loss, train_config, auxiliary=critic)
    if trains_residual:
        steps = config.residual_steps
        stage = replace(
            train_config,
            output_dir=str(Path(train_config.output_dir) / "residual"),
            steps=steps,
            warmup_steps=min(200, steps // 10),
            checkpoint_every=max(steps // 4, 1),
        )
        residual = TrunkResidualObjective(objective.flow, objective.flow.build_students(task.transformer))
        train(residual, pair_batches(task, schedule, states, labels, stage), _loss, stage)
    out = Path(out)
    state = _process_state()
    if state.is_main_process:  # under accelerate launch every process holds the same trained students
        objective.flow.to("cpu", torch.bfloat16).save_pretrained(out)
        record = {"distill": asdict(config), "train": asdict(train_config), "blocks": blocks, **report}
        (out / "distill.json").write_text(json.dumps(record, indent=1))
    state.wait_for_everyone()
    return out


def _process_state():
    """accelerate's view of the processes of this run (one, or those of ``accelerate launch`` / torchrun); only
    once the training loop's Accelerator exists (a PartialState made first would not know ``--cpu`` runs)."""
    from accelerate import PartialState

    return PartialState()


def _batches(task, schedule: SegmentSchedule, states: torch.Tensor, labels: torch.Tensor, config: TrainConfig):
    """sample_batch(step, rank, device): per segment, a share of the batch at random steps of that segment.

    ``batch_size`` is the global batch: each step draws the same batch whatever the number of processes, and
    process ``rank`` of N trains on its N-th of each segment's share. Data-parallel training (gradients averaged
    over equal shards) then follows the one-process run, and a checkpoint resumes on another process count."""
    sigmas = torch.tensor(schedule.sigmas)
    first_step = [sum(schedule.steps_per_segment[:k]) for k in range(schedule.num_segments)]
    share = max(config.batch_size // schedule.num_segments, 1)
    rows_of = process_rows(share, config.batch_size, schedule.num_segments)

    @functools.cache  # one copy per device: copying the trajectories every step made training transfer-bound
    def on_device(device):
        return states.to(device), labels.to(device), sigmas.to(device)

    def sample_batch(step: int, rank: int, device) -> list[dict]:
        x_all, y_all, s_all = on_device(device)
        generator = generator_for_step(step, 0, config.seed, device)  # the global batch, on every process
        rows = rows_of(rank)
        batch = []
        for k, n in enumerate(schedule.steps_per_segment):
            index = torch.randint(0, x_all.shape[1], (share,), generator=generator, device=device)[rows]
            j = first_step[k] + torch.randint(0, n, (share,), generator=generator, device=device)[rows]
            x, x_next = x_all[j, index], x_all[j + 1, index]
            span = (s_all[j + 1] - s_all[j]).view(-1, *([1] * (x.ndim - 1)))
            batch.append(
                {
                    "x": x,
                    "sigma": s_all[j],
                    "sigma_next": s_all[j + 1],
                    "target": (x_next - x) / span,
                    "labels": y_all[index],
                    "inputs": task.conditioning(y_all[index]),
                }
            )
        return batch

    return sample_batch


class TrajectoryObjective(nn.Module):
    """The students' loss on a batch: mean over segments of the MSE between each student's velocity and the
    teacher's average velocity over the step.

    Only the low-rank factors (``flow``) are registered: the students' frozen teacher weights stay out of the
    optimizer, the EMA and the checkpoints. The loss is this module's forward, so data-parallel training wraps it.
    With ``distribution_matching`` set (:func:`distribution_matching.attach`, ``--dmd-weight``), its DMD term is
    added and the loss's terms are returned for the log.
    """

    def __init__(self, flow: BlockwiseFlowModel, students: nn.ModuleList) -> None:
        super().__init__()
        self.flow = flow
        object.__setattr__(self, "students", students)  # not a submodule (see above)
        self.distribution_matching = None

    def velocities(self, batch: list[dict]) -> list[torch.Tensor]:
        """Each segment's student velocity on its share of the batch."""
        return [
            transformer_velocity(student, b["x"], b["sigma"], b["inputs"]).float()
            for student, b in zip(self.students, batch)
        ]

    def forward(self, batch: list[dict]) -> torch.Tensor | tuple[torch.Tensor, dict]:
        velocities = self.velocities(batch)
        loss = torch.stack([F.mse_loss(v, b["target"].float()) for v, b in zip(velocities, batch)]).mean()
        if self.distribution_matching is None:
            return loss
        term, logged = self.distribution_matching.generator_loss(batch, velocities)
        return loss + term, {"trajectory": loss.detach(), **logged}


def _loss(objective: nn.Module, batch) -> torch.Tensor:
    """The training loop's loss of both stages: each objective's forward is its loss, so data-parallel training
    (which wraps the module) covers it."""
    return objective(batch)


def add_arguments(parser) -> None:
    defaults = DistillConfig()
    parser.add_argument("--teacher", required=True, help="a flow-matching digits pipeline folder (models/digits-*)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--segments", type=int, default=defaults.segments)
    parser.add_argument("--steps-per-segment", type=int, default=defaults.steps_per_segment)
    parser.add_argument("--grid", choices=["uniform", "optimal"], default=defaults.grid)
    parser.add_argument("--blocks", choices=["all", "first", "weights", "calibration"], default=defaults.blocks)
    parser.add_argument("--keep", type=int, help="blocks each student keeps (with --blocks first/weights/calibration)")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="rank of each linear's change")
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale, help="CFG folded into the students")
    parser.add_argument("--trajectories", type=int, default=defaults.trajectories)
    parser.add_argument("--fine-steps", type=int, default=defaults.fine_steps, help="teacher Euler steps per solve")
    parser.add_argument("--generation-batch", type=int, default=defaults.generation_batch)
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget of the training stage")
    parser.add_argument("--device", help="default: the GPU of this process (cuda:LOCAL_RANK) when available")
    parser.add_argument(
        "--init-student",
        help="start from this trained student (its schedule, blocks and factors; --steps 0: keep them)",
    )
    parser.add_argument(
        "--residual-trunk",
        type=int,
        help="feature residual approximation: leading blocks run at a segment's first step only",
    )
    parser.add_argument("--residual-width", type=int, default=defaults.residual_width, help="residual networks' width")
    parser.add_argument("--residual-steps", type=int, default=defaults.residual_steps, help="their training steps")
    matching = DistributionMatchingConfig()
    parser.add_argument(
        "--dmd-weight",
        type=float,
        default=matching.weight,
        help="weight of a distribution-matching (DMD) term beside the trajectory loss (0: off)",
    )
    parser.add_argument("--critic-steps", type=int, default=matching.critic_steps, help="critic updates per step")
    parser.add_argument("--critic-rank", type=int, default=matching.critic_rank, help="rank of the critic's deltas")
    parser.add_argument("--critic-lr", type=float, default=matching.critic_lr, help="the critic's learning rate")


def run(args) -> Path:
    config = DistillConfig(
        segments=args.segments,
        steps_per_segment=args.steps_per_segment,
        grid=args.grid,
        blocks=args.blocks,
        keep=args.keep,
        rank=args.rank,
        guidance_scale=args.guidance,
        trajectories=args.trajectories,
        fine_steps=args.fine_steps,
        generation_batch=args.generation_batch,
        init_student=args.init_student,
        residual_trunk=args.residual_trunk,
        residual_width=args.residual_width,
        residual_steps=args.residual_steps,
        distribution_matching=DistributionMatchingConfig(
            weight=args.dmd_weight,
            critic_steps=args.critic_steps,
            critic_rank=args.critic_rank,
            critic_lr=args.critic_lr,
        ),
    )
    train_config = TrainConfig(
        output_dir=str(Path(args.out) / "runs"),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(200, args.steps // 10),
        seed=args.seed,
        checkpoint_every=max(args.steps // 4, 1),
        max_minutes=args.max_minutes,
    )
    return distill(DigitsTask(args.teacher, args.device or process_device()), args.out, config, train_config)
