"""One training loop for every model this repo trains: accelerate, EMA, checkpoint/resume, a loss log.

The same script runs on a CPU, one GPU, or several GPUs under ``accelerate launch``: accelerate owns devices,
mixed precision and gradient synchronisation. Batches come from a function of (step, process index), seeded from
both, so a resumed run sees exactly the batches it would have seen, and each process sees different ones.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    output_dir: str
    steps: int
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    mixed_precision: str | None = None  # None: bf16 on GPU, no on CPU
    # Stop early (keeping the EMA weights) when the wall-clock budget is spent; the cosine schedule then anneals over
    # whichever budget, steps or minutes, ends first, so a run the clock stops still ends at a learning rate near 0.
    max_minutes: float | None = None


@dataclass
class Auxiliary:
    """A second model trained in alternation with the main one (a distribution-matching critic): ``steps`` updates
    of ``loss_fn(model, batch)`` on each batch before the main model's update, with its own AdamW at a constant
    ``lr``. The Accelerator prepares it beside the main model (wrapped for data-parallel training like it), and
    checkpoints and resumes it with it; it gets no EMA (it is a training aid, not an output). Its mean loss is
    logged as ``{name}_loss``."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor]
    steps: int = 1
    lr: float = 1e-4
    name: str = "auxiliary"


def _latest_checkpoint(directory: Path) -> tuple[Path | None, int]:
    checkpoints = sorted(directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return (checkpoints[-1], int(checkpoints[-1].name.split("-")[1])) if checkpoints else (None, 0)


def train(
    model: torch.nn.Module,
    sample_batch: Callable[[int, int, torch.device], dict],
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    config: TrainConfig,
    auxiliary: Auxiliary | None = None,
) -> torch.nn.Module:
    """Train ``model`` for ``config.steps`` steps; returns the unwrapped model holding the EMA weights.

    ``sample_batch(step, process_index, device)`` returns the batch of that step; ``loss_fn(model, batch)`` its
    scalar loss, or ``(loss, {name: scalar})`` to log the loss's terms too. Resumes from the latest checkpoint under
    ``output_dir/checkpoints`` if there is one. ``auxiliary``: a second model trained in alternation (see
    :class:`Auxiliary`).
    """
    mixed = config.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    # Every process runs all config.steps steps (batches come from sample_batch, not a sharded dataloader), so the
    # LR schedule steps once per step; accelerate's default steps it once per process per step.
    accelerator = Accelerator(mixed_precision=mixed, step_scheduler_with_optimizer=False)
    set_seed(config.seed)
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    clock = _BudgetClock(config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, clock.lr_factor)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=config.ema_decay, foreach=True)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    if auxiliary is not None:  # prepared second: its state is model_1 / optimizer_1 in every checkpoint
        aux_optimizer = torch.optim.AdamW(auxiliary.model.parameters(), lr=auxiliary.lr, weight_decay=0.0)
        aux_model, aux_optimizer = accelerator.prepare(auxiliary.model, aux_optimizer)

    latest, start = _latest_checkpoint(checkpoints)
    if latest is not None:
        accelerator.load_state(str(latest))
        accelerator.print(f"resumed from {latest}")
    log_path = output / "train_log.jsonl"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "train_config.json").write_text(json.dumps(asdict(config), indent=1))

    model.train()
    clock.start()
    running, count = torch.zeros((), device=accelerator.device), 0
    terms: dict[str, torch.Tensor] = {}  # running sums of the logged terms, like ``running``
    progress = tqdm(
        range(start, config.steps), initial=start, total=config.steps, disable=not accelerator.is_main_process
    )
    for step in progress:
        batch = sample_batch(step, accelerator.process_index, accelerator.device)
        if auxiliary is not None:
            for _ in range(auxiliary.steps):
                with accelerator.autocast():
                    aux_loss = auxiliary.loss_fn(aux_model, batch)
                _update(accelerator, aux_model, aux_optimizer, aux_loss, config.grad_clip)
                _accumulate(terms, f"{auxiliary.name}_loss", aux_loss.detach() / auxiliary.steps)
        with accelerator.autocast():
            loss = loss_fn(model, batch)
        if isinstance(loss, tuple):
            loss, logged = loss
            for name, value in logged.items():
                _accumulate(terms, name, value.detach())
        _update(accelerator, model, optimizer, loss, config.grad_clip)
        schedule.step()
        ema.step(accelerator.unwrap_model(model).parameters())
        running += loss.detach().float()  # read back only when logging: no host sync per step
        count += 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            # the mean over every process's batch: with equal shards, the loss of the whole (global) batch
            mean = accelerator.reduce(running, reduction="mean").item() / count
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss became {mean} before step {step + 1}; lower the learning rate")
            record = {
                "step": step + 1,
                "loss": mean,
                **{name: accelerator.reduce(total, reduction="mean").item() / count for name, total in terms.items()},
                "lr": schedule.get_last_lr()[0],
                "elapsed_s": round(clock.elapsed(), 1),
            }
            running.zero_()
            terms.clear()
            count = 0
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            accelerator.save_state(str(checkpoints / f"step-{step + 1}"))
        if clock.spent():
            accelerator.print(f"time budget of {config.max_minutes} min spent: stopping after step {step + 1}")
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    record = {"step": step + 1, "stopped_early": True, "lr": schedule.get_last_lr()[0]}
                    log.write(json.dumps(record) + "\n")
            break

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(model)
    ema.copy_to(trained.parameters())
    trained.eval()
    return trained


class _BudgetClock:
    """Linear warmup, then a cosine decay to 0 over the training's progress: the larger of the fraction of steps
    done and, with ``max_minutes``, the fraction of the time left after warmup that is spent. A time budget that
    stops the run before ``steps`` would otherwise leave it at a high learning rate, its weights never annealed.
    The clock counts from this process's start (a resumed run has its own budget, as ``max_minutes`` says)."""

    def __init__(self, config: TrainConfig):
        self.steps, self.warmup = config.steps, config.warmup_steps
        self.budget = None if config.max_minutes is None else 60.0 * config.max_minutes
        self.started = self.warm_at = None

    def start(self) -> None:
        self.started = time.time()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.time() - self.started

    def spent(self) -> bool:
        return self.budget is not None and self.elapsed() > self.budget

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.budget is not None and self.started is not None:
            if self.warm_at is None:  # the first step after warmup: the time left from here is what decays
                self.warm_at = self.elapsed()
            left = self.budget - self.warm_at
            progress = max(progress, (self.elapsed() - self.warm_at) / left if left > 0 else 1.0)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _update(accelerator: Accelerator, model, optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """One optimizer step on ``loss``: backward, gradients clipped once they are synchronised, step, zero."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _accumulate(totals: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add to a running sum on the device (read back only when logging: no host sync per step)."""
    value = value.float()
    totals[name] = totals[name] + value if name in totals else value


def process_device() -> str:
    """This process's device: the GPU of its local rank under ``accelerate launch`` / torchrun (the one accelerate
    trains on; whatever a process loads beside the trained model, a teacher or a VAE, must be there too, not on
    cuda:0), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def process_rows(share: int, batch_size: int, groups: int):
    """rows(rank): the slice of each group's ``share`` of the global batch that process ``rank`` trains on.

    For the ``sample_batch(step, rank, device)`` of :func:`train`: every process draws the whole global batch from
    the same generator and keeps its rows, so a step's batch does not depend on the number of processes (and a
    checkpoint resumes on another count). The count is asked once the training loop's Accelerator has set them up."""

    @functools.cache
    def processes() -> int:
        count = PartialState().num_processes
        if share % count:
            raise ValueError(
                f"the batch of {batch_size} gives each of its {groups} segments {share} samples, which {count} "
                f"processes cannot split evenly: make --batch-size a multiple of {groups * count}"
            )
        return count

    def rows(rank: int) -> slice:
        return slice(rank * share // processes(), (rank + 1) * share // processes())

    return rows
