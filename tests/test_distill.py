"""Blockwise flow: segment schedule, segment students bound to their teacher, routing through stock pipelines,
CFG folding, save/load, composition with caching and sparse attention, and a tiny distillation run."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_pipelines import build_pipeline, call_kwargs

import diffusers_block
from diffusers_block import StaticScheduleConfig
from diffusers_block.distill import BlockwiseFlowModel, SegmentSchedule, StudentMismatchError, load
from diffusers_block.distill.schedule import euler_defects, optimal_grid, split_steps, uniform_sigmas

SCHEDULE = SegmentSchedule(uniform_sigmas(4), split_steps(4, 2))  # sigmas 1, .75, .5, .25, 0; segments 2 + 2


def _flow(pipe, schedule=SCHEDULE, blocks=None, seed=0) -> BlockwiseFlowModel:
    """Students of ``pipe.transformer`` whose low-rank changes are random (so each segment computes differently)."""
    flow = BlockwiseFlowModel.for_teacher(pipe.transformer, schedule, blocks=blocks, rank=2, guidance_scale=2.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for delta in flow.deltas.modules():
            if hasattr(delta, "up"):
                delta.up.normal_(0, 0.05)
    return flow


def _run(pipe, name, **overrides):
    kwargs = {**call_kwargs(name, steps=SCHEDULE.num_steps), **overrides}
    return pipe(**kwargs)[0]


# -- schedule -----------------------------------------------------------------------------------------------------
def test_schedule_segments_and_lookup():
    assert SCHEDULE.boundaries == (1.0, 0.5, 0.0)
    assert SCHEDULE.segment_of_step == (0, 0, 1, 1)
    assert [SCHEDULE.segment_at(s) for s in (1.0, 0.75, 0.5, 0.25)] == [0, 0, 1, 1]
    assert SCHEDULE.segment_at(0.5 + 1e-4) == 1  # timesteps travel as bf16 * 1000
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        SCHEDULE.step_at(0.6)
    assert split_steps(7, 3) == (3, 2, 2)


@pytest.mark.parametrize(
    "sigmas, steps, message",
    [
        ((1.0, 0.5, 0.6, 0.0), (3,), "descending"),
        ((1.5, 0.5, 0.0), (2,), r"\[0, 1\]"),
        ((1.0, 0.5, 0.1), (2,), "last sigma must be 0"),
        ((1.0, 0.5, 0.0), (1,), "sum to the number of steps"),
        ((1.0, 0.5, 0.0), (2, 0), "positive"),
    ],
)
def test_schedule_rejects_bad_boundaries(sigmas, steps, message):
    with pytest.raises(ValueError, match=message):
        SegmentSchedule(sigmas, steps)


def test_optimal_grid_is_the_brute_force_optimum():
    torch.manual_seed(0)
    cost = torch.rand(7, 7).double().triu(1) + torch.full((7, 7), float("inf")).double().tril()
    best = min(
        (sum(cost[a, b] for a, b in zip((0, *inner), (*inner, 6))), (0, *inner, 6))
        for inner in itertools.combinations(range(1, 6), 2)
    )
    assert tuple(optimal_grid(cost, 3)) == best[1]


def test_euler_defects_vanish_on_straight_paths_and_grow_on_curved_ones():
    sigmas = uniform_sigmas(8)
    s = torch.tensor(sigmas).view(-1, 1, 1, 1)
    x0, noise = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    straight = (1 - s) * x0 + s * noise  # velocity noise - x0 everywhere
    defects = euler_defects(straight, (noise - x0).expand(8, -1, -1, -1), sigmas)
    assert defects[torch.isfinite(defects)].abs().max() < 1e-12
    curved = straight + (s * (1 - s)) * noise  # velocity depends on s: long jumps miss
    velocity = (noise - x0) + (1 - 2 * s[:-1]) * noise
    defects = euler_defects(curved, velocity, sigmas)
    assert defects[0, 8] > defects[0, 4] > defects[0, 1] > 0


# -- runtime on stock pipelines -----------------------------------------------------------------------------------
def test_untrained_students_are_the_teacher_and_disable_restores_it_exactly():
    pipe = build_pipeline("sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the tiny pipeline's shift 3 would move our sigmas
    teacher_sigmas = list(SCHEDULE.sigmas[:-1])
    before = _run(pipe, "sd3", guidance_scale=1.0, sigmas=teacher_sigmas)
    untrained = BlockwiseFlowModel.for_teacher(pipe.transformer, SCHEDULE, rank=2)
    pipe.enable_blockwise_flow(untrained)
    assert torch.equal(_run(pipe, "sd3", guidance_scale=1.0), before)
    pipe.disable_blockwise_flow()
    pipe.enable_blockwise_flow(_flow(pipe))
    assert not torch.equal(_run(pipe, "sd3", guidance_scale=1.0), before)
    pipe.disable_blockwise_flow()
    assert torch.equal(_run(pipe, "sd3", guidance_scale=1.0, sigmas=teacher_sigmas), before)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_each_timestep_reaches_its_segment_student_with_cfg_folded(name):
    pipe = build_pipeline(name)
    pipe.enable_blockwise_flow(_flow(pipe))
    students = pipe._diffusers_block_serving
    calls = {key: [] for key in students}
    for key, student in students.items():
        student.register_forward_pre_hook(
            lambda m, a, kw, key=key: calls[key].append(
                (round(float(kw["timestep"].max()) / 1000, 3), len(kw["hidden_states"]))
            ),
            with_kwargs=True,
        )
    guided = _run(pipe, name)  # CFG on: served by one forward a step on the conditional batch
    assert calls == {"segment_0": [(1.0, 1), (0.75, 1)], "segment_1": [(0.5, 1), (0.25, 1)]}
    unguided = pipe(**call_kwargs(name, steps=SCHEDULE.num_steps, guidance=False))[0]
    assert torch.equal(guided, unguided)


def test_save_load_round_trip(tmp_path):
    pipe = build_pipeline("sd3")
    flow = _flow(pipe, blocks=[["transformer_blocks.0"], ["transformer_blocks.1"]]).to(torch.bfloat16)
    pipe.enable_blockwise_flow(flow)
    expected = _run(pipe, "sd3", guidance_scale=1.0)
    pipe.disable_blockwise_flow()
    flow.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.config.blocks == [["transformer_blocks.0"], ["transformer_blocks.1"]]
    assert loaded.num_steps == 4 and loaded.config.guidance_scale == 2.0
    pipe.enable_blockwise_flow(loaded)
    assert torch.equal(_run(pipe, "sd3", guidance_scale=1.0), expected)
    assert len(pipe._diffusers_block_serving["segment_0"].transformer_blocks) == 1


def test_bad_input_gets_errors_naming_the_fix(tmp_path):
    sd3, wan = build_pipeline("sd3"), build_pipeline("wan")
    flow = _flow(sd3)
    with pytest.raises(StudentMismatchError, match="distilled from a SD3Transformer2DModel"):
        wan.enable_blockwise_flow(flow)
    other = build_pipeline("sd3", seed=1)
    with pytest.raises(StudentMismatchError, match="other weights"):
        other.enable_blockwise_flow(flow)
    with pytest.raises(TypeError, match="BlockwiseFlowModel"):
        sd3.enable_blockwise_flow(sd3.transformer)
    with pytest.raises(ValueError, match="teacher's blocks"):
        BlockwiseFlowModel.for_teacher(sd3.transformer, SCHEDULE, blocks=[["blocks.9"], ["transformer_blocks.0"]])
    with pytest.raises(FileNotFoundError, match="train distill"):
        load(tmp_path)
    sd3.enable_blockwise_flow(flow)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        sd3(**call_kwargs("sd3", steps=6))
    with pytest.raises(ValueError, match="without `sigmas`"):
        _run(sd3, "sd3", sigmas=[1.0, 0.5, 0.2, 0.1])
    sd3.disable_blockwise_flow()
    sd3.enable_block_cache()
    with pytest.raises(ValueError, match="enable blockwise flow first"):
        sd3.enable_blockwise_flow(flow)
    dit = build_pipeline("dit")
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        dit.enable_blockwise_flow(flow)


def test_controlnet_residuals_reach_a_full_student_and_are_refused_by_a_pruned_one():
    """SD3 adds ControlNet residuals by block index inside its forward: a student keeping every block takes them
    (halved with the CFG batch like every per-sample input); one that drops blocks, or skips its trunk, refuses them
    naming the fix."""
    pipe = build_pipeline("sd3")
    config = pipe.transformer.config
    width, tokens = config.num_attention_heads * config.attention_head_dim, (config.sample_size // 2) ** 2

    def call(batch: int, controlnet: bool):
        torch.manual_seed(0)
        kwargs = dict(
            hidden_states=torch.randn(batch, config.in_channels, config.sample_size, config.sample_size),
            encoder_hidden_states=torch.randn(batch, 5, config.joint_attention_dim),
            pooled_projections=torch.randn(batch, config.pooled_projection_dim),
            timestep=torch.full((batch,), 750.0),  # a step of the first segment
        )
        residuals = [torch.randn(batch, tokens, width) for _ in range(config.num_layers)]
        with torch.no_grad():
            return pipe.transformer(**kwargs, block_controlnet_hidden_states=residuals if controlnet else None)[0]

    pipe.enable_blockwise_flow(_flow(pipe))  # every block kept
    pipe._guidance_scale = 2.0  # as inside a CFG call: the batch is (uncond, cond)
    guided, plain = call(2, controlnet=True), call(2, controlnet=False)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)  # the residuals were added
    pipe.disable_blockwise_flow()
    pipe.enable_blockwise_flow(_flow(pipe, blocks=[["transformer_blocks.0"], ["transformer_blocks.1"]]))
    call(2, controlnet=False)
    with pytest.raises(ValueError, match="drops some of the teacher's blocks.*--blocks all"):
        call(2, controlnet=True)
    pipe.disable_blockwise_flow()  # feature residual approximation skips the trunk, and the residuals added in it
    pipe.enable_blockwise_flow(_flow(pipe).with_residual_trunk(pipe.transformer, 1))
    with pytest.raises(ValueError, match="skips its first 1 blocks.*without --residual-trunk"):
        call(2, controlnet=True)


def test_only_controlnet_residuals_count_as_controlnet_input():
    from diffusers_block.distill.apply import carries_controlnet_residuals

    residual = torch.zeros(1, 4, 8)
    assert not carries_controlnet_residuals({"controlnet_blocks_repeat": False, "controlnet_block_samples": None})
    assert not carries_controlnet_residuals({"hidden_states": residual})
    assert carries_controlnet_residuals({"controlnet_block_samples": [residual, residual]})  # Flux
    assert carries_controlnet_residuals({"block_controlnet_hidden_states": (residual,)})  # SD3
    assert carries_controlnet_residuals({"controlnet_residual": residual})


def test_composes_with_block_cache_and_sparse_attention():
    pipe = build_pipeline("wan")
    pipe.enable_blockwise_flow(_flow(pipe, schedule=SegmentSchedule(uniform_sigmas(6), (3, 3))))
    kwargs = call_kwargs("wan", steps=6)
    plain = pipe(**kwargs)[0]
    pipe.enable_block_cache(StaticScheduleConfig(interval=1))  # computes every step: exactly the students
    assert torch.equal(pipe(**call_kwargs("wan", steps=6))[0], plain)
    pipe.enable_block_cache(StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=0))
    cached = pipe(**call_kwargs("wan", steps=6))[0]
    summary = pipe.block_cache_summary()
    assert 0 < summary.fraction_computed < 1
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    pipe.disable_block_cache()
    pipe.enable_sparse_attention(diffusers_block.SparseAttentionConfig(dense_steps=0, block_size=8))
    sparse = pipe(**call_kwargs("wan", steps=6))[0]
    assert torch.isfinite(sparse).all() and pipe.sparse_attention_summary() is not None
    pipe.disable_blockwise_flow()  # takes the students' cache and sparse attention with it
    assert not hasattr(pipe, "_diffusers_block_sparse_attention")


# -- training -----------------------------------------------------------------------------------------------------
class _ToyTask:
    """A random-weight tiny SD3 transformer as the teacher of a guided flow over two "labels"."""

    latent_shape = (4, 8, 8)

    def __init__(self):
        pipe = build_pipeline("sd3")
        self.transformer = pipe.transformer.requires_grad_(False)
        torch.manual_seed(0)
        self.tokens = torch.randn(3, 5, self.transformer.config.joint_attention_dim)
        self.pooled = torch.randn(3, self.transformer.config.pooled_projection_dim)

    def sample_labels(self, n, generator):
        return torch.randint(0, 2, (n,), generator=generator, device=generator.device)

    def conditioning(self, labels, null=False):
        labels = torch.full_like(labels, 2) if null else labels
        return {"encoder_hidden_states": self.tokens[labels], "pooled_projections": self.pooled[labels]}

    def guided_velocity(self, labels, guidance_scale):
        from diffusers_block.distill.trajectories import GuidedVelocity

        return GuidedVelocity(
            self.transformer, self.conditioning(labels), self.conditioning(labels, True), guidance_scale
        )


def toy_distillation(folder, name: str, steps: int, checkpoint_every: int, batch_size: int, **config):
    """Distil ``_ToyTask`` into ``folder/name/student`` (2 segments x 1 step; its log and checkpoints under
    ``folder/name/runs``): the short run the resume and multi-process tests compare."""
    from diffusers_block.train.distill import DistillConfig, distill
    from diffusers_block.train.loop import TrainConfig

    distill_config = DistillConfig(
        segments=2, steps_per_segment=1, rank=4, guidance_scale=2.0, trajectories=64, fine_steps=8, **config
    )
    train_config = TrainConfig(
        output_dir=str(folder / name / "runs"),
        steps=steps,
        batch_size=batch_size,
        lr=3e-3,
        warmup_steps=2,
        ema_decay=0.5,
        log_every=1,
        checkpoint_every=checkpoint_every,
    )
    return distill(_ToyTask(), folder / name / "student", distill_config, train_config)


def test_tiny_distillation_lowers_its_loss_and_beats_the_teacher_at_its_step_count(tmp_path):
    import json

    from diffusers_block.train.distill import DistillConfig, distill, teacher_flow
    from diffusers_block.train.loop import TrainConfig

    task = _ToyTask()
    config = DistillConfig(segments=2, steps_per_segment=1, rank=4, guidance_scale=2.0, trajectories=128, fine_steps=16)
    train_config = TrainConfig(
        output_dir=str(tmp_path / "runs"),
        steps=60,
        batch_size=32,
        lr=3e-3,
        warmup_steps=5,
        ema_decay=0.9,
        log_every=20,
        checkpoint_every=1000,
    )
    out = distill(task, tmp_path / "student", config, train_config)
    log = [json.loads(line) for line in (tmp_path / "runs" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]

    # held-out noises and labels: the teacher's fine solve, its own 2-step Euler, and the 2-step students
    fine = uniform_sigmas(16)
    truth, labels, _ = teacher_flow(task, 64, fine, [16], 2.0, 64, seed=123, device="cpu")
    generator = torch.Generator().manual_seed(123)
    labels = task.sample_labels(64, generator)
    noise = torch.randn((64, *task.latent_shape), generator=generator)
    from diffusers_block.distill.trajectories import solve, transformer_velocity

    coarse, _ = solve(task.guided_velocity(labels, 2.0), noise, uniform_sigmas(2), [2])
    students = load(out).build_students(task.transformer)
    x = noise
    for k, (s, s_next) in enumerate(zip((1.0, 0.5), (0.5, 0.0))):
        with torch.no_grad():
            x = x + (s_next - s) * transformer_velocity(students[k], x, torch.full((64,), s), task.conditioning(labels))
    student_error = (x - truth[0]).square().mean()
    teacher_error = (coarse[0] - truth[0]).square().mean()
    assert student_error < 0.5 * teacher_error
