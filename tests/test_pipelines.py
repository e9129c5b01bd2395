"""Block caching through stock diffusers pipelines: the pipe.enable_block_cache() methods end to end."""

import pytest
import torch
from tiny_models import build_unet
from tiny_pipelines import PIPELINES, build_pipeline, call_kwargs
from torch._dynamo.utils import counters

import diffusers_block as db
from diffusers_block.cache.apply import default_cache_config

PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=1)
SEPARATE_CFG = {"flux", "wan", "wan22"}  # cond and uncond are two transformer calls per step


def generate(pipe, name, device=None, **kwargs):
    call = call_kwargs(name, **kwargs)
    if device is not None:  # prompt embeddings where the offloaded pipeline computes
        call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with torch.no_grad():
        return pipe(**call)[0]


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_enable_summary_disable(name):
    pipe = build_pipeline(name)
    reference = generate(pipe, name)

    pipe.enable_block_cache(db.StaticScheduleConfig(interval=1))
    assert torch.equal(generate(pipe, name), reference)

    pipe.enable_block_cache(PERMISSIVE)
    cached = generate(pipe, name)
    assert not torch.equal(cached, reference)
    assert float((cached - reference).norm() / reference.norm()) < 0.3
    summary = pipe.block_cache_summary()
    assert summary.num_steps == 6
    assert summary.branches == (["cond", "uncond"] if name in SEPARATE_CFG else [0])
    if name == "wan22":  # each transformer runs part of the steps; the other part is "not run" (-1)
        assert {n.split("/")[0] for n in summary.unit_names} == {"transformer", "transformer_2"}
        assert (summary.computed == -1).any()
    # warm-up 0; steps 1 and 3 by the interval; cool-down 5. Wan 2.2's transformer_2 starts at step 2 with an empty
    # cache, so it computes there although the schedule says reuse.
    assert summary.fraction_computed == pytest.approx(5 / 6 if name == "wan22" else 4 / 6)

    assert torch.equal(generate(pipe, name), cached)  # a new call starts from an empty cache

    pipe.disable_block_cache()
    assert torch.equal(generate(pipe, name), reference)


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_default_policy_and_changed_shapes_between_calls(name):
    pipe = build_pipeline(name)
    pipe.enable_block_cache()
    generate(pipe, name, steps=8)
    changed = generate(pipe, name, steps=8, batch_size=2, height=12, width=12)
    fresh = build_pipeline(name)
    fresh.enable_block_cache()
    assert torch.equal(changed, generate(fresh, name, steps=8, batch_size=2, height=12, width=12))


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_default_policy_is_the_measured_winner(name):
    """enable_block_cache() without a config: per-model BWCache (docs/defaults.md), so at every step all blocks
    compute or all reuse (per-block BWCache, the old default, skipped blocks one by one)."""
    assert default_cache_config() == db.BWCacheConfig(threshold=0.1, scope="model")
    pipe = build_pipeline(name)
    pipe.enable_block_cache()
    generate(pipe, name, steps=12)
    computed = pipe.block_cache_summary().computed  # (branch, step, block)
    assert (computed == computed[..., :1]).all()  # the first block decides for all


def test_scheduler_swapped_after_enabling():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build_pipeline("sd3")
    pipe.enable_block_cache(PERMISSIVE)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    swapped = generate(pipe, "sd3")
    assert pipe.block_cache_summary().num_steps == 6
    fresh = build_pipeline("sd3")
    fresh.scheduler = FlowMatchEulerDiscreteScheduler.from_config(fresh.scheduler.config, shift=1.0)
    fresh.enable_block_cache(PERMISSIVE)
    assert torch.equal(swapped, generate(fresh, "sd3"))


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_compiled_transformer_with_static_schedule(name):
    pipe = build_pipeline(name)
    pipe.enable_block_cache(PERMISSIVE)
    eager = generate(pipe, name)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer.compile(fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    assert torch.equal(generate(pipe, name), eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 8  # one per (branch, compute/reuse) pattern: within dynamo's default recompile limit
    assert torch.equal(generate(pipe, name), eager)
    assert counters["stats"]["unique_graphs"] == graphs  # a second generation compiles nothing new
    assert pipe.block_cache_summary().fraction_computed == pytest.approx(4 / 6)


def test_lora_loaded_transformer():
    peft = pytest.importorskip("peft")
    pipe = build_pipeline("wan")
    if not hasattr(pipe.transformer, "add_adapter"):
        pytest.skip("diffusers' PEFT integration is off (peft missing or too old)")
    pipe.transformer.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    reference = generate(pipe, "wan")
    pipe.enable_block_cache(db.StaticScheduleConfig(interval=1))
    assert torch.equal(generate(pipe, "wan"), reference)
    pipe.enable_block_cache(PERMISSIVE)
    cached = generate(pipe, "wan")
    assert pipe.block_cache_summary().fraction_saved > 0
    pipe.disable_block_cache()
    assert torch.equal(generate(pipe, "wan"), reference)
    assert not torch.equal(cached, reference)


def test_unet_pipeline_is_refused():
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = build_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(db.UnsupportedModelError, match="DDPMPipeline has no transformer component.*not UNets"):
        pipe.enable_block_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["pixart", "wan"])
def test_model_cpu_offload(name):
    pipe = build_pipeline(name)
    reference = generate(pipe, name)
    pipe.enable_model_cpu_offload()
    uncached_offloaded = generate(pipe, name, device="cuda")
    pipe.enable_block_cache(PERMISSIVE)
    offloaded = generate(pipe, name, device="cuda")
    assert pipe.block_cache_summary().fraction_saved > 0
    pipe.disable_block_cache()
    assert torch.equal(generate(pipe, name, device="cuda"), uncached_offloaded)
    assert float((uncached_offloaded.cpu() - reference).norm() / reference.norm()) < 1e-2  # GPU vs CPU arithmetic
    assert float((offloaded - uncached_offloaded).norm() / uncached_offloaded.norm()) < 0.3
    assert offloaded.isfinite().all()
