"""Feature residual approximation of blockwise-flow students: a segment's trunk runs at its first step only."""

from __future__ import annotations

import pytest
import torch
from test_distill import _ToyTask
from tiny_pipelines import build_pipeline, call_kwargs

from diffusers_block.distill import BlockwiseFlowModel, SegmentSchedule, load
from diffusers_block.distill.residual import trunk_blocks
from diffusers_block.distill.schedule import uniform_sigmas
from diffusers_block.models import SELF_ATTN, resolve_adapter

SCHEDULE = SegmentSchedule(uniform_sigmas(6), (3, 3))  # sigmas 1, 5/6, ..., 0; two segments of three steps
STEPS = SCHEDULE.num_steps


def _flow(pipe, trunk=1, residual=False, seed=0, **kwargs) -> BlockwiseFlowModel:
    """Students with random low-rank changes (each segment computes differently), and random residual networks
    when ``residual`` (an untrained one is a plain trunk cache)."""
    flow = BlockwiseFlowModel.for_teacher(
        pipe.transformer, SCHEDULE, rank=2, guidance_scale=2.0, residual_trunk=trunk, residual_width=8, **kwargs
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in flow.named_parameters():
            if name.startswith("deltas") and name.endswith(".up"):
                param.normal_(0, 0.05)
            if residual and name.startswith("residuals") and (".up." in name or name.endswith("gate")):
                param.normal_(0, 0.05)
    return flow


def _plain(flow: BlockwiseFlowModel, teacher) -> BlockwiseFlowModel:
    """The same students without feature residual approximation."""
    return flow.with_residual_trunk(teacher, None)


def _record_calls(pipe) -> list[dict]:
    """Every call of each serving student: its segment, timestep, inputs and output."""
    calls = []
    for key, student in pipe._diffusers_block_serving.items():

        def record(module, args, kwargs, output, key=key):
            calls.append(
                {
                    "segment": key,
                    "kwargs": dict(kwargs),
                    "output": output[0] if isinstance(output, tuple) else output.sample,
                }
            )

        student.register_forward_hook(record, with_kwargs=True)
    return calls


def _trunk_cache(students, trunk: int) -> None:
    """An independent plain trunk cache (torch forward hooks): at a segment's first step the trunk's output is
    recorded, at its later steps the last trunk block returns it (the trunk still computes; its output is replaced)."""
    for k, student in enumerate(students):
        first = sum(SCHEDULE.steps_per_segment[:k])
        recorded = {}

        def timestep(module, args, kwargs, recorded=recorded, first=first):
            recorded["step"] = SCHEDULE.step_at(float(kwargs["timestep"].max()) / 1000) - first

        def replace(module, args, kwargs, output, recorded=recorded):
            if recorded["step"] == 0:
                recorded["output"] = output
                return output
            return recorded["output"]

        student.register_forward_pre_hook(timestep, with_kwargs=True)
        trunk_blocks(student, trunk)[-1].module.register_forward_hook(replace, with_kwargs=True)


@pytest.mark.parametrize("name, trunk", [("sd3", 1), ("sd3", 2), ("wan", 2)])
def test_untrained_residual_is_a_trunk_cache(name, trunk):
    pipe = build_pipeline(name)
    flow = _flow(pipe, trunk)
    pipe.enable_blockwise_flow(_plain(flow, pipe.transformer))
    _trunk_cache(pipe._diffusers_block_serving.values(), trunk)
    expected = pipe(**call_kwargs(name, steps=STEPS))[0]
    full = pipe(**call_kwargs(name, steps=STEPS, guidance=False))[0]
    pipe.disable_blockwise_flow()
    pipe.enable_blockwise_flow(flow)
    assert torch.equal(pipe(**call_kwargs(name, steps=STEPS))[0], expected)  # CFG batch: the student on one half
    assert torch.equal(pipe(**call_kwargs(name, steps=STEPS, guidance=False))[0], full)


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_first_step_of_each_segment_is_the_full_student_and_later_steps_are_not(name):
    pipe = build_pipeline(name)
    flow = _flow(pipe, trunk=1, residual=True)
    pipe.enable_blockwise_flow(flow)
    calls = _record_calls(pipe)
    pipe(**call_kwargs(name, steps=STEPS, guidance=False))
    plain = _plain(flow, pipe.transformer).build_students(pipe.transformer)
    assert len(calls) == STEPS
    for step, call in enumerate(calls):
        k = SCHEDULE.segment_of_step[step]
        with torch.no_grad():
            exact = plain[k](**call["kwargs"])
        exact = exact[0] if isinstance(exact, tuple) else exact.sample
        first_of_segment = step == sum(SCHEDULE.steps_per_segment[:k])
        assert torch.equal(call["output"], exact) == first_of_segment, step


def test_later_steps_skip_the_trunk_blocks():
    pipe = build_pipeline("sd3")
    pipe.enable_blockwise_flow(_flow(pipe, trunk=2, residual=True))
    counts = {}
    for key, student in pipe._diffusers_block_serving.items():
        for block in resolve_adapter(student).blocks:
            attention = dict((role, module) for _, role, module in block.sub_blocks())[SELF_ATTN]
            counts[(key, block.name)] = 0

            def count(module, args, key=(key, block.name)):
                counts[key] += 1

            attention.register_forward_pre_hook(count)
    pipe(**call_kwargs("sd3", steps=STEPS))
    for segment in ("segment_0", "segment_1"):  # three steps each: the trunk (two blocks) runs at the first only
        assert [counts[(segment, f"transformer_blocks.{i}")] for i in range(3)] == [1, 1, 3]
    pipe(**call_kwargs("sd3", steps=STEPS))  # a second run starts clean: its first steps run the trunk again
    assert counts[("segment_0", "transformer_blocks.0")] == 2


def test_save_load_round_trip_and_disable_restores_the_teacher(tmp_path):
    pipe = build_pipeline("wan")
    kwargs = call_kwargs("wan", steps=STEPS)
    teacher = pipe(**call_kwargs("wan", steps=STEPS))[0]
    flow = _flow(pipe, trunk=2, residual=True).to(torch.bfloat16)
    pipe.enable_blockwise_flow(flow)
    expected = pipe(**kwargs)[0]
    pipe.disable_blockwise_flow()
    assert torch.equal(pipe(**call_kwargs("wan", steps=STEPS))[0], teacher)
    flow.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert (loaded.config.residual_trunk, loaded.config.residual_width) == (2, 8)
    assert loaded.config.residual_streams == {"hidden": flow.config.residual_streams["hidden"]}
    assert (
        flow.config.residual_streams["hidden"]
        == pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    )
    saved = flow.state_dict()
    assert any(key.startswith("residuals.1.streams.hidden") for key in saved)
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())
    pipe.enable_blockwise_flow(loaded)
    assert torch.equal(pipe(**call_kwargs("wan", steps=STEPS))[0], expected)
    pipe.disable_blockwise_flow()
    assert torch.equal(pipe(**call_kwargs("wan", steps=STEPS))[0], teacher)


def test_a_changed_batch_or_a_run_that_starts_mid_segment_runs_the_trunk():
    pipe = build_pipeline("sd3")
    flow = _flow(pipe, trunk=1, residual=True)
    pipe.enable_blockwise_flow(flow)
    calls = _record_calls(pipe)
    pipe(**call_kwargs("sd3", steps=STEPS, guidance=False, batch_size=2))
    student = pipe._diffusers_block_serving["segment_0"]
    plain = _plain(flow, pipe.transformer).build_students(pipe.transformer)[0]
    step1, step2 = calls[1]["kwargs"], calls[2]["kwargs"]
    with torch.no_grad():
        # a new run entering segment 0 at its second step (the last run ended at its third): no valid record
        assert torch.equal(student(**step1)[0], plain(**step1)[0])
        assert torch.equal(student(**step2)[0], plain(**step2)[0])
        student(**calls[0]["kwargs"])  # a run's first step (batch 2) records the trunk
        assert not torch.equal(student(**step1)[0], plain(**step1)[0])  # approximated
        one = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim and len(v) == 2 else v) for k, v in step2.items()}
        assert torch.equal(student(**one)[0], plain(**one)[0])  # batch 1 after a record of batch 2: the trunk runs


def test_tiny_training_lowers_the_feature_error_below_the_trunk_cache(tmp_path):
    from diffusers_block.train.distill import DistillConfig, distill, teacher_flow
    from diffusers_block.train.loop import TrainConfig
    from diffusers_block.train.trunk_residual import TrunkResidualObjective, pair_batches

    task = _ToyTask()
    schedule = SegmentSchedule(uniform_sigmas(6), (3, 3))
    start = BlockwiseFlowModel.for_teacher(task.transformer, schedule, rank=2, guidance_scale=2.0)
    start.save_pretrained(tmp_path / "start")
    config = DistillConfig(
        guidance_scale=2.0,
        trajectories=48,
        fine_steps=6,
        init_student=str(tmp_path / "start"),
        residual_trunk=1,
        residual_width=16,
        residual_steps=40,
    )
    train_config = TrainConfig(
        output_dir=str(tmp_path / "runs"), steps=0, batch_size=16, lr=3e-3, warmup_steps=0, ema_decay=0.8, log_every=10
    )
    trained = load(distill(task, tmp_path / "student", config, train_config))
    assert trained.config.residual_trunk == 1 and trained.num_steps == 6
    factors = start.deltas.state_dict()
    assert all(torch.equal(v, factors[k].bfloat16()) for k, v in trained.deltas.state_dict().items())  # --steps 0

    # held-out trajectories: the trained networks against the untrained ones (a plain trunk cache)
    states, labels, _ = teacher_flow(task, 32, uniform_sigmas(6), None, 2.0, 32, seed=99, device="cpu")
    batch = pair_batches(task, schedule, states, labels, TrainConfig(output_dir="", steps=1, batch_size=64, seed=5))(
        0, 0, "cpu"
    )
    students = trained.build_students(task.transformer)
    with torch.no_grad():
        learned, cache = TrunkResidualObjective(trained.float(), students).errors(batch)
    assert learned.sum() < 0.8 * cache.sum()


def test_the_residual_stage_splits_one_global_batch_over_processes(monkeypatch):
    """Like the trajectory stage: each of N processes trains on its N-th of the same global batch (a batch drawn per
    process would grow with the GPU count and change what a resumed run sees)."""
    import types

    import diffusers_block.train.loop as loop
    from diffusers_block.train.distill import teacher_flow
    from diffusers_block.train.loop import TrainConfig
    from diffusers_block.train.trunk_residual import pair_batches

    task = _ToyTask()
    schedule = SegmentSchedule(uniform_sigmas(6), (3, 3))
    states, labels, _ = teacher_flow(task, 8, uniform_sigmas(6), None, 2.0, 8, seed=1, device="cpu")
    config = TrainConfig(output_dir="", steps=1, batch_size=16, seed=5)

    def batch(processes: int, rank: int):
        monkeypatch.setattr(loop, "PartialState", lambda: types.SimpleNamespace(num_processes=processes))
        return pair_batches(task, schedule, states, labels, config)(3, rank, "cpu")

    whole, halves = batch(1, 0), [batch(2, 0), batch(2, 1)]
    for k in whole:
        assert len(whole[k]["step"]) == 8 and [len(h[k]["step"]) for h in halves] == [4, 4]
        for name in ("first", "later"):
            for i in range(2):
                torch.testing.assert_close(
                    whole[k][name][i], torch.cat([h[k][name][i] for h in halves]), rtol=0, atol=0
                )
        torch.testing.assert_close(whole[k]["step"], torch.cat([h[k]["step"] for h in halves]), rtol=0, atol=0)


def test_bad_trunks_get_errors_naming_the_fix():
    pipe = build_pipeline("sd3")  # three blocks
    teacher = pipe.transformer
    for trunk, message in ((0, "positive number"), (-1, "positive number"), (3, "at most 2")):
        with pytest.raises(ValueError, match=message):
            BlockwiseFlowModel.for_teacher(teacher, SCHEDULE, residual_trunk=trunk)
    later = [["transformer_blocks.1", "transformer_blocks.2"]] * 2
    with pytest.raises(ValueError, match=r"keep the teacher's first 1 blocks.*--blocks first"):
        BlockwiseFlowModel.for_teacher(teacher, SCHEDULE, blocks=later, residual_trunk=1)
    two = [["transformer_blocks.0", "transformer_blocks.1"]] * 2
    with pytest.raises(ValueError, match="segment 0, which keeps 2 blocks: use a trunk of at most 1"):
        BlockwiseFlowModel.for_teacher(teacher, SCHEDULE, blocks=two, residual_trunk=2)
    plain = BlockwiseFlowModel.for_teacher(teacher, SCHEDULE)
    assert plain.residuals is None and plain.with_residual_trunk(teacher, 1).residuals is not None


def test_composes_with_the_block_cache():
    """The block cache's hooks sit on the FRA students' blocks like on any student's: computing every step gives
    the FRA students exactly, a reusing schedule skips block work, and disabling it gives them back."""
    from diffusers_block import StaticScheduleConfig

    pipe = build_pipeline("wan")
    pipe.enable_blockwise_flow(_flow(pipe, trunk=1, residual=True))
    fra = pipe(**call_kwargs("wan", steps=STEPS))[0]
    pipe.enable_block_cache(StaticScheduleConfig(interval=1))
    assert torch.equal(pipe(**call_kwargs("wan", steps=STEPS))[0], fra)
    pipe.enable_block_cache(StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=0))
    cached = pipe(**call_kwargs("wan", steps=STEPS))[0]
    assert 0 < pipe.block_cache_summary().fraction_computed < 1
    assert torch.isfinite(cached).all() and not torch.equal(cached, fra)
    pipe.disable_block_cache()
    assert torch.equal(pipe(**call_kwargs("wan", steps=STEPS))[0], fra)
