"""`bench distill` end to end on CPU: every row it promises, on the shipped image model and the video model.

Small sizes (4 reference steps, a few samples); what is checked is that the rows exist, count what they claim
(forwards, FLOPs) and carry finite quality numbers, not the numbers themselves.
"""

import json
import math

import pytest
import torch

from diffusers_block.bench import distill as bench_distill
from diffusers_block.bench import distill_timing
from diffusers_block.bench.__main__ import main
from diffusers_block.distill import BlockwiseFlowModel, SegmentSchedule
from diffusers_block.distill.schedule import split_steps, uniform_sigmas
from diffusers_block.zoo import load_digits_video_pipeline


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy models gain nothing from threads, and OpenMP stalls on a busy CPU
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *args, repeats: int = 1) -> dict:
    small = ["--reference-steps", "4", "--repeats", str(repeats), "--device", "cpu", "--out", str(tmp_path)]
    main(["distill", *args, *small])
    [path] = tmp_path.glob("distill-*.json")
    return json.loads(path.read_text())


def _check_rows(result: dict, student_forwards: int) -> dict:
    rows = {row["name"]: row for row in result["results"]}
    reference = rows["teacher-4-cfg"]
    assert reference["forwards"] == pytest.approx(8)  # 4 steps, two forwards each (CFG)
    assert reference["flops_ratio"] == pytest.approx(1.0)
    [student] = [row for name, row in rows.items() if name.startswith("student-")]
    assert student["forwards"] == pytest.approx(student_forwards)  # CFG folded: one forward a step
    steps = student_forwards // 2  # the baselines spend the student's forwards with CFG
    for name in bench_distill.SOLVERS:
        assert rows[f"teacher-{name}-{steps}-cfg"]["forwards"] == pytest.approx(student_forwards)
    cached = rows[f"teacher-cache-static2-{student_forwards}-cfg"]
    assert cached["forwards"] < 2 * student_forwards  # every other step's blocks reused
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert math.isfinite(row["fid"]) and row["fid"] >= 0
        assert row["seconds"] > 0
    assert reference["psnr_db"] > 60  # the reference against itself: identical outputs
    return rows


def test_bench_distill_image(tmp_path, one_thread):
    result = _run(tmp_path, "--model", "digits-image", "--per-class", "1")
    assert result["samples"] == 10
    _check_rows(result, student_forwards=8)  # the shipped student: 2 segments x 4 steps


def test_bench_distill_video(tmp_path, one_thread, monkeypatch):
    pipe, _ = load_digits_video_pipeline()
    schedule = SegmentSchedule(uniform_sigmas(4), split_steps(4, 2))
    student = tmp_path / "student"
    BlockwiseFlowModel.for_teacher(pipe.transformer, schedule, guidance_scale=5.0).save_pretrained(student)
    few = lambda per_class: (torch.tensor([1, 7]), torch.tensor([0, 3]))  # noqa: E731 (two clips: digit, motion)
    monkeypatch.setattr(bench_distill, "balanced_clip_labels", few)
    result = _run(tmp_path / "out", "--model", "digits-video", "--students", str(student))
    assert result["samples"] == 2
    rows = _check_rows(result, student_forwards=4)
    assert all(0.0 <= row["motion_accuracy"] <= 1.0 for row in rows.values())


def test_bench_distill_counts_the_trunk_a_residual_student_skips(tmp_path, one_thread):
    from diffusers_block.distill import load
    from diffusers_block.zoo import load_digits_image_pipeline, model_path

    pipe, _ = load_digits_image_pipeline()
    student = tmp_path / "fra"
    shipped = load(model_path("digits-image-distilled"))
    shipped.with_residual_trunk(pipe.transformer, 2).save_pretrained(student)
    result = _run(
        tmp_path / "out", "--model", "digits-image", "--per-class", "1", "--students", str(student), repeats=0
    )
    rows = {row["name"]: row for row in result["results"]}
    assert all(row["seconds"] is None and row["speedup"] is None for row in rows.values())  # quality only: untimed
    # 2 segments x 4 steps; the trunk (2 of the 10 blocks) runs at each segment's first step only: the 6 later
    # steps each skip a fifth of the block work, a bit less of the whole forward (embedding and output layers)
    assert 8 - 6 * 0.2 < rows["student-fra"]["forwards"] < 8 - 6 * 0.15
    assert {"teacher-euler-3-cfg", "teacher-cache-static2-7-cfg"} <= set(rows)  # baselines at its whole steps


@pytest.mark.parametrize("extra", [["--repeats", "-1"], ["--repeats", "0", "--architecture", "wan2.1-1.3b"]])
def test_bench_distill_rejects_a_repeat_count_it_cannot_honour(extra):
    with pytest.raises(SystemExit, match="--repeats"):
        main(["distill", *extra, "--device", "cpu"])


def test_bench_distill_architecture_timing_rows(tmp_path, one_thread):
    main(["distill", "--architecture", "tiny-wan", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)])
    [path] = tmp_path.glob("distill-timing-*.json")
    result = json.loads(path.read_text())
    assert result["residual_trunk"] == 1  # a quarter of the 2 kept blocks, at least one
    rows = {row["name"]: row for row in result["results"]}
    expected = {"teacher-50-cfg-dense"}
    for schedule in distill_timing.STUDENT_SCHEDULES:
        for trunk in ("", "+residual-trunk1"):
            plain = f"students-{schedule}-2of3-blocks{trunk}"
            expected |= {plain, f"{plain}+sparse+cache"}
    assert set(rows) == expected
    assert all(row["seconds"] > 0 and row["speedup"] > 0 for row in rows.values())


def test_timed_residual_trunk_students_run_their_trunk_at_each_segment_first_step_only():
    from diffusers_block.bench.architectures import ARCHITECTURES, build, conditioning, noise
    from diffusers_block.distill.apply import serving_students
    from diffusers_block.distill.model import block_names

    arch = ARCHITECTURES["tiny-wan"]
    torch.manual_seed(0)
    teacher = build(arch, torch.device("cpu"), torch.float32)
    schedule = SegmentSchedule(uniform_sigmas(8), split_steps(8, 2))
    names = block_names(teacher)
    flow = BlockwiseFlowModel.for_teacher(teacher, schedule, [names] * 2).with_residual_trunk(teacher, 1)
    students = serving_students(flow, teacher)
    calls = {"trunk": 0, "after": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    for student in students:  # a skipped block is still called (its hook returns the approximation): count its work
        student.blocks[0].ffn.register_forward_hook(count("trunk"))
        student.blocks[1].ffn.register_forward_hook(count("after"))
    prompt = conditioning(arch, torch.device("cpu"), torch.float32, 1)
    with torch.inference_mode():
        out = distill_timing.sample_students(students, schedule, noise(arch, torch.device("cpu"), 0), prompt)
    assert torch.isfinite(out).all()
    assert calls == {"trunk": 2, "after": 8}  # the trunk at the 2 segments' first steps; the rest at all 8 steps


def test_rows_are_timed_in_turns_each_inside_its_own_setting():
    from contextlib import contextmanager
    from functools import partial
    from types import SimpleNamespace

    log = []

    @contextmanager
    def active(name):
        log.append(f"enter {name}")
        yield
        log.append(f"exit {name}")

    work = SimpleNamespace(pipe=SimpleNamespace(device=torch.device("cpu")))
    work.generate = lambda steps, guidance: log.append(f"generate {steps}")
    settings = [bench_distill._Setting(n, steps, 1.0, partial(active, n)) for n, steps in (("a", 1), ("b", 2))]
    seconds = bench_distill._round_robin_seconds(work, settings, repeats=2)
    assert log == ["enter a", "generate 1", "exit a", "enter b", "generate 2", "exit b"] * 2
    assert set(seconds) == {"a", "b"} and all(t > 0 for t in seconds.values())
    assert bench_distill._round_robin_seconds(work, settings, repeats=0) == {"a": None, "b": None}


def test_seed_draws_other_noise_for_every_row(tmp_path, one_thread):
    runs = {}
    for seed in (0, 1000):
        result = _run(
            tmp_path / str(seed), "--model", "digits-image", "--per-class", "1", "--seed", str(seed), repeats=0
        )
        assert result["args"]["seed"] == seed
        runs[seed] = {row["name"]: row for row in result["results"]}
    assert runs[0].keys() == runs[1000].keys()
    for name in runs[0]:  # other samples: another distance to the real digits
        assert runs[0][name]["fid"] != runs[1000][name]["fid"], name
