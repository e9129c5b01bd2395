"""Distillation training data-parallel on 2 CPU processes (what ``accelerate launch --num_processes 2`` runs), and a
checkpoint of it resumed on 1 process: both must follow the 1-process run."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from distributed import run
from test_distill import toy_distillation
from test_distill_dmd import _distill as distill_with_dmd

from diffusers_block.distill import BlockwiseFlowModel

STEPS, CHECKPOINT = 6, 3


def _distill(folder, name: str) -> None:
    toy_distillation(folder, name, STEPS, CHECKPOINT, batch_size=16)


def _two_processes(rank: int, world_size: int, folder) -> None:
    _distill(folder, "two")


def _factors(folder, name: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in BlockwiseFlowModel.from_pretrained(folder / name / "student").state_dict().items()}


@pytest.mark.slow
def test_two_process_training_and_a_resume_on_one_process_follow_the_one_process_run(tmp_path):
    run(_two_processes, tmp_path, world_size=2, timeout=600)
    _distill(tmp_path, "one")
    # the 2-process run's checkpoint at step 3, finished on one process
    (tmp_path / "resumed" / "runs" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "two" / "runs" / "checkpoints" / f"step-{CHECKPOINT}",
        tmp_path / "resumed" / "runs" / "checkpoints" / f"step-{CHECKPOINT}",
    )
    _distill(tmp_path, "resumed")
    one, two, resumed = (_factors(tmp_path, name) for name in ("one", "two", "resumed"))
    for name, other in (("two processes", two), ("resumed on one", resumed)):
        for key in one:
            error = float((other[key] - one[key]).norm() / one[key].norm().clamp_min(1e-12))
            assert error < 1e-2, f"{name}: {key} differs from the one-process run by {error:.2e}"
    # the LR schedule steps once per step whatever the process count (accelerate's default steps it N times)
    logs = {name: _log(tmp_path, name) for name in ("one", "two")}
    assert [r["lr"] for r in logs["two"]] == [r["lr"] for r in logs["one"]]
    # the logged loss is the mean over the processes' shards: the 1-process curve
    assert [r["loss"] for r in logs["two"]] == pytest.approx([r["loss"] for r in logs["one"]], rel=1e-4)
    assert len(logs["one"]) == STEPS


def _log(folder, name: str) -> list[dict]:
    import json

    return [json.loads(line) for line in (folder / name / "runs" / "train_log.jsonl").read_text().splitlines()]


def test_a_launched_process_loads_what_it_trains_beside_on_its_own_gpu(monkeypatch):
    """Under ``accelerate launch`` every process trains on cuda:LOCAL_RANK: the teacher (distillation) and the VAE
    (video) must be loaded there, not all on cuda:0."""
    from diffusers_block.train.loop import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_device() == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device() == "cuda:0"


def _two_processes_with_distribution_matching(rank: int, world_size: int, folder) -> None:
    distill_with_dmd(folder, "two")


@pytest.mark.slow
def test_distribution_matching_trains_its_critic_data_parallel(tmp_path):
    """The critic is the loop's second prepared model: under 2 processes it trains beside the students (each critic
    loss calls it once per segment before one backward), and every step's terms are the mean over both shards."""
    run(_two_processes_with_distribution_matching, tmp_path, world_size=2, timeout=600)
    distill_with_dmd(tmp_path, "one")
    logs = {name: _log(tmp_path, name) for name in ("one", "two")}
    assert len(logs["two"]) == len(logs["one"])
    for record in logs["two"]:
        assert all(math.isfinite(record[key]) for key in ("loss", "trajectory", "dmd", "critic_loss"))
    # before any update the trajectory term depends on the batch alone: the two shards make the one-process batch
    assert logs["two"][0]["trajectory"] == pytest.approx(logs["one"][0]["trajectory"], rel=1e-4)
    checkpoint = tmp_path / "two" / "runs" / "checkpoints" / f"step-{CHECKPOINT}"
    assert (checkpoint / "model_1.safetensors").is_file()  # the critic, saved with the students
