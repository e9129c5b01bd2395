"""The diffusion policy: model save/load, pipeline shapes and errors, block caching (BAC) on its sub-blocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

import diffusers_block as db
from diffusers_block.eval.harness import BlockWorkCounter
from diffusers_block.models import resolve_adapter
from diffusers_block.pipelines.policy import (
    DiffusionPolicyPipeline,
    PolicyInputError,
    PolicyNormalizer,
    PolicyTransformer,
)
from diffusers_block.pipelines.policy.data import DemoDataset
from diffusers_block.pipelines.policy.ddpm_step import DDPMStepCoefficients, ddpm_step
from diffusers_block.train.policy import ddpm_scheduler, policy_loss

TASKS = ("reach-v3", "push-v3")
STEPS = 12


def tiny_pipeline(prediction_type="epsilon", seed=0) -> DiffusionPolicyPipeline:
    torch.manual_seed(seed)
    model = PolicyTransformer(
        num_layers=2, hidden_size=32, num_attention_heads=2, task_names=TASKS, prediction_type=prediction_type
    )
    for p in model.parameters():  # random weights large enough that every branch matters
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(seed)
    normalizer = PolicyNormalizer.fit(torch.randn(64, 39, generator=g), torch.rand(64, 4, generator=g) * 2 - 1)
    scheduler = FlowMatchEulerDiscreteScheduler() if prediction_type == "flow" else ddpm_scheduler()
    pipe = DiffusionPolicyPipeline(model, scheduler, normalizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def observations(batch=3, steps=2, dim=39, seed=1):
    return torch.randn(batch, steps, dim, generator=torch.Generator().manual_seed(seed))


def act(pipe, obs=None, steps=STEPS, seed=0, **kwargs):
    obs = observations() if obs is None else obs
    return pipe(
        obs,
        task="reach-v3",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    )


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline()
    reference = act(pipe).actions
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPolicyPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.transformer, PolicyTransformer) and isinstance(loaded.normalizer, PolicyNormalizer)
    assert list(loaded.transformer.config.task_names) == list(TASKS)
    torch.testing.assert_close(loaded.normalizer.obs_scale, pipe.normalizer.obs_scale, rtol=0, atol=0)
    assert torch.equal(act(loaded).actions, reference)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_shapes_batch_and_single_env():
    pipe = tiny_pipeline()
    out = act(pipe)
    assert out.actions.shape == (3, 8, 4) and out.action_pred.shape == (3, 16, 4)
    assert torch.equal(out.actions, out.action_pred[:, 1:9])  # executed from the current step (n_obs_steps - 1)
    single = pipe(observations(1)[0], task="push-v3", num_inference_steps=4)
    assert isinstance(single.actions, np.ndarray) and single.actions.shape == (1, 8, 4)
    longer = act(pipe, torch.cat([observations(3, 3, seed=5)[:, :1], observations()], dim=1))
    assert torch.equal(longer.actions, act(pipe).actions)  # a longer history is cut to the last n_obs_steps
    per_env = pipe(observations(), task=["reach-v3", "push-v3", "reach-v3"], num_inference_steps=4, output_type="pt")
    assert per_env.actions.shape == (3, 8, 4)


def test_batched_equals_one_by_one():
    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic sampler, same weights
    obs = observations()
    noise = pipe.initial_noise(3, torch.Generator().manual_seed(0))
    inputs = pipe.prepare_inputs(obs, "reach-v3")
    t = pipe.set_timesteps(6)
    batched = pipe.denoise(noise, inputs, t, pipe.time_tokens(t))
    for i in range(3):
        one = pipe.prepare_inputs(obs[i : i + 1], "reach-v3")
        t = pipe.set_timesteps(6)
        torch.testing.assert_close(pipe.denoise(noise[i : i + 1], one, t, pipe.time_tokens(t))[0], batched[i])


def test_errors_name_the_problem():
    pipe = tiny_pipeline()
    with pytest.raises(PolicyInputError, match="38 values per step.*39-d"):
        pipe(observations(dim=38), task="reach-v3", num_inference_steps=2)
    with pytest.raises(PolicyInputError, match=r"not trained for task\(s\) \['door-open-v3'\]"):
        pipe(observations(), task="door-open-v3", num_inference_steps=2)
    with pytest.raises(PolicyInputError, match="pass task= one of"):
        pipe(observations(), num_inference_steps=2)
    with pytest.raises(PolicyInputError, match="needs the last 2 observations"):
        pipe(observations(steps=1), task="reach-v3", num_inference_steps=2)
    with pytest.raises(PolicyInputError, match="2 task names for a batch of 3"):
        pipe(observations(), task=["reach-v3", "push-v3"], num_inference_steps=2)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler cannot sample.*'epsilon'"):
        pipe(observations(), task="reach-v3", num_inference_steps=2)


def test_schedulers_ddim_and_flow_matching():
    pipe = tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    first, again = act(pipe, steps=10, seed=0).actions, act(pipe, steps=10, seed=1).actions
    assert first.shape == (3, 8, 4) and torch.isfinite(first).all()
    assert not torch.equal(first, act(pipe, observations(seed=2), steps=10).actions)
    assert not torch.equal(first, again)  # different initial noise
    flow = tiny_pipeline("flow")
    assert act(flow, steps=5).actions.shape == (3, 8, 4)


def test_normalizer_maps_to_unit_range_and_keeps_constant_dims_finite():
    obs = torch.cat([torch.rand(50, 3) * 10, torch.zeros(50, 1)], dim=1)
    actions = torch.rand(50, 2) * 4 - 2
    norm = PolicyNormalizer.fit(obs, actions)
    scaled = norm.normalize_obs(obs)
    assert scaled[:, :3].min() == pytest.approx(-1, abs=1e-5) and scaled[:, :3].max() == pytest.approx(1, abs=1e-5)
    assert torch.equal(scaled[:, 3], torch.zeros(50))
    torch.testing.assert_close(norm.unnormalize_action(norm.normalize_action(actions)), actions)


def test_adapter_finds_sub_blocks():
    pipe = tiny_pipeline()
    adapter = resolve_adapter(pipe.transformer)
    assert adapter.family == "policy"
    assert [name for name, _, _ in adapter.blocks[1].sub_blocks()] == [
        "transformer_blocks.1.attn1",
        "transformer_blocks.1.attn2",
        "transformer_blocks.1.ff",
    ]


def test_schedule_updating_every_step_reproduces_uncached_actions():
    pipe = tiny_pipeline()
    reference = act(pipe).actions
    config = db.calibrate_schedule(pipe, lambda p: act(p, seed=7), updates=1.0, granularity="sub_block")
    assert all(len(steps) == STEPS for steps in config.update_steps.values())
    pipe.enable_block_cache(config)
    assert torch.equal(act(pipe).actions, reference)
    pipe.disable_block_cache()


def test_bac_schedule_skips_work_on_sub_blocks_and_disable_restores():
    pipe = tiny_pipeline()
    reference = act(pipe).actions
    config = db.calibrate_schedule(
        pipe, lambda p: act(p, seed=7), updates=3, granularity="sub_block", bubbling_union_top=1
    )
    assert len(config.update_steps) == 6 and all(s[0] == 0 for s in config.update_steps.values())
    assert sum(len(s) > 3 for s in config.update_steps.values()) <= 1  # only the top-1 block bubbles up
    counter = BlockWorkCounter(pipe.transformer)
    act(pipe)
    full, counter.calls = counter.calls, 0
    pipe.enable_block_cache(config)
    cached = act(pipe).actions
    summary = pipe.block_cache_summary()
    assert counter.calls < 0.5 * full
    assert summary.fraction_computed == pytest.approx(sum(map(len, config.update_steps.values())) / (6 * STEPS))
    assert "transformer_blocks.0.ff" in summary.unit_names
    assert not torch.equal(cached, reference)
    pipe.disable_block_cache()
    counter.remove()
    assert torch.equal(act(pipe).actions, reference)


def test_block_granularity_and_bwcache_run():
    pipe = tiny_pipeline()
    pipe.enable_block_cache(db.StaticScheduleConfig(interval=3, granularity="block"))
    act(pipe)
    assert pipe.block_cache_summary().fraction_computed == pytest.approx(4 / STEPS)
    pipe.enable_block_cache(db.BWCacheConfig(threshold=0.5, granularity="sub_block"))
    assert act(pipe).actions.shape == (3, 8, 4)
    pipe.disable_block_cache()


def test_skipping_whole_steps_calls_the_denoiser_less():
    pipe = tiny_pipeline()
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    skipped = act(pipe, denoiser_steps=[0, 4, 8]).actions
    handle.remove()
    assert len(calls) == 3 and not torch.equal(skipped, act(pipe).actions)


def test_training_windows_and_loss_decrease():
    # Two episodes of lengths 5 and 7: windows start n_obs_steps - 1 before and end n_action_steps - 1 after.
    obs = torch.arange(12, dtype=torch.float32)[:, None].expand(12, 39).clone()
    data = {
        "obs": obs.numpy(),
        "actions": obs[:, :4].numpy(),
        "episode_ends": np.array([5, 12]),
        "episode_task": np.array([0, 1]),
        "task_names": np.array(TASKS),
    }
    dataset = DemoDataset(data, horizon=4, n_obs_steps=2, n_action_steps=2)
    assert len(dataset) == (5 - 4 + 1 + 1 + 1) + (7 - 4 + 1 + 1 + 1)
    assert dataset.windows[0].tolist() == [0, 0, 1, 2] and dataset.windows[3].tolist() == [2, 3, 4, 4]
    assert dataset.windows[4].tolist() == [5, 5, 6, 7] and dataset.window_task[4] == 1
    batch = dataset.sample(8, torch.Generator().manual_seed(0))
    assert batch["obs"].shape == (8, 2, 39) and batch["actions"].shape == (8, 4, 4)

    torch.manual_seed(0)
    model = PolicyTransformer(
        num_layers=1, hidden_size=32, num_attention_heads=2, horizon=4, n_action_steps=2, task_names=TASKS
    )
    scheduler, opt = ddpm_scheduler(), torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    batch = dataset.sample(32, g)
    batch["obs"], batch["actions"] = batch["obs"] / 12, batch["actions"] / 12
    batch["noise"], batch["t"] = torch.randn(32, 4, 4, generator=g), torch.randint(0, 100, (32,), generator=g)
    losses = []
    for _ in range(30):
        loss = policy_loss(model, batch, scheduler, "epsilon")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ddpm_default_is_100_steps():
    pipe = tiny_pipeline()
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.num_train_timesteps == 100
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe(observations(1), task="reach-v3")
    handle.remove()
    assert len(calls) == 100


DDPM_VARIANTS = [
    {},  # the policy's: epsilon, clip to [-1, 1], fixed_small
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction", "clip_sample": False},
    {"variance_type": "fixed_large", "clip_sample_range": 0.5},
]


@pytest.mark.parametrize("variant", DDPM_VARIANTS)
@pytest.mark.parametrize("steps", [100, 7])
def test_fused_ddpm_step_matches_the_scheduler(variant, steps):
    scheduler = DDPMScheduler.from_config(ddpm_scheduler().config, **variant)
    assert all(scheduler.config[key] == value for key, value in variant.items())
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    coeffs = DDPMStepCoefficients.from_scheduler(scheduler, timesteps)
    assert len(coeffs) == steps and coeffs.std[-1] == 0 and coeffs.noisy_steps() == steps - 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 4, generator=g)
    for i, t in enumerate(timesteps):
        e = torch.randn(4, 16, 4, generator=g) * 2  # large enough that the clip matters
        state = g.get_state()
        expected = scheduler.step(e, t, x, generator=g).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().set_state(state)) if coeffs.std[i] > 0 else None
        fused = ddpm_step(e, x, noise, coeffs, i)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_fused_step_covers_only_what_it_reproduces():
    config = ddpm_scheduler().config
    for scheduler in (
        DDIMScheduler.from_config(config),
        DDPMScheduler.from_config(config, variance_type="fixed_small_log"),
        DDPMScheduler.from_config(config, thresholding=True),
    ):
        scheduler.set_timesteps(10)
        assert DDPMStepCoefficients.from_scheduler(scheduler, scheduler.timesteps.tolist()) is None
    scheduler = ddpm_scheduler()
    scheduler.set_timesteps(4)
    coeffs = DDPMStepCoefficients.from_scheduler(scheduler, scheduler.timesteps.tolist())
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="step 0 adds noise"):
        ddpm_step(x, x, None, coeffs, 0)
    with pytest.raises(ValueError, match="outside the schedule's 4 steps"):
        ddpm_step(x, x, None, coeffs, 4)


def test_pipeline_with_fused_steps_equals_the_scheduler_loop(monkeypatch):
    # Per-step draws from one generator (no step_noise): the fused loop and diffusers' scheduler.step loop consume
    # the same random numbers in the same order, so they must agree to rounding.
    pipe = tiny_pipeline()
    obs, t = observations(), pipe.set_timesteps(STEPS)
    inputs, tokens = pipe.prepare_inputs(obs, "reach-v3"), pipe.time_tokens(t)
    noise = pipe.initial_noise(3, torch.Generator().manual_seed(0))
    fused = pipe.denoise(noise, inputs, t, tokens, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(pipe, "step_coefficients", lambda timesteps: None)
    pipe.set_timesteps(STEPS)
    stepped = pipe.denoise(noise, inputs, t, tokens, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused, stepped, rtol=1e-5, atol=1e-5)


def test_chunk_noise_is_one_draw_per_environment():
    pipe = tiny_pipeline()
    t = pipe.set_timesteps(STEPS)
    coeffs = pipe.step_coefficients(t)
    noise = pipe.chunk_noise(3, coeffs, torch.Generator().manual_seed(0))
    assert noise.shape == (STEPS, 3, 16, 4) and noise.is_contiguous()  # initial + 11 noisy steps (the last adds none)
    one = pipe.chunk_noise(1, coeffs, torch.Generator().manual_seed(0))
    assert torch.equal(one[:, 0], noise[:, 0])  # environment 0 draws the same numbers in any batch size
    per_env = pipe.chunk_noise(2, coeffs, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    assert torch.equal(per_env[:, 0], per_env[:, 1]) and torch.equal(per_env[:, 0], one[:, 0])
    seeded = [act(pipe, seed=5).actions for _ in range(2)]
    assert torch.equal(*seeded) and not torch.equal(seeded[0], act(pipe, seed=6).actions)


KERNEL_CHECK = """
import json, torch
from diffusers_block.pipelines.policy import ddpm_step as m
from diffusers_block.kernels import runtime
from diffusers_block.train.policy import ddpm_scheduler
s = ddpm_scheduler(); s.set_timesteps(100)
c = m.DDPMStepCoefficients.from_scheduler(s, s.timesteps.tolist())
g = torch.Generator().manual_seed(0)
errors = []
for i in (0, 50, 99):
    x, e, z = (torch.randn(3, 16, 4, generator=g) * 2 for _ in range(3))
    errors.append((m.ddpm_step(e, x, z, c, i) - m.ddpm_step_reference(e, x, z, c, i)).abs().max().item())
print(json.dumps({"used_triton": runtime.use_triton(x), "errors": errors}))
"""


def test_ddpm_step_kernel_matches_reference_interpreted():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["used_triton"] and max(result["errors"]) < 1e-5, result


@pytest.mark.gpu
@pytest.mark.parametrize("cached", [False, True])
def test_cuda_graph_replays_the_eager_chunk(cached):
    from diffusers_block.pipelines.policy.graph import CUDAGraphPolicy

    pipe = tiny_pipeline().to("cuda")  # DDPM: fused steps with per-step noise, all drawn in the graph
    if cached:
        pipe.enable_block_cache(db.StaticScheduleConfig(interval=3, granularity="sub_block"))
    obs = observations()

    def eager(generator=None):
        return pipe(obs, task="reach-v3", num_inference_steps=STEPS, output_type="pt", generator=generator).actions

    reference = eager(torch.Generator("cuda").manual_seed(0))
    runner = CUDAGraphPolicy(pipe, 3, STEPS)
    assert runner.noise_in_graph  # PyTorch >= 2.5 registers the graph's generator
    for _ in range(2):  # replays are repeatable, and draw what the eager call drew from the same seed
        graphed = runner(obs, "reach-v3", generator=torch.Generator("cuda").manual_seed(0), output_type="pt").actions
        torch.testing.assert_close(graphed, reference, rtol=1e-4, atol=1e-5)
    generator = torch.Generator("cuda").manual_seed(0)
    first, second = (runner(obs, "reach-v3", generator=generator, output_type="pt").actions for _ in range(2))
    generator.manual_seed(0)
    eager(generator)
    eager_second = eager(generator)  # the generator advances as in the two replays
    torch.testing.assert_close(second, eager_second, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, second)
    torch.cuda.manual_seed(7)  # no generator: the default CUDA generator, as the eager pipeline
    unseeded = runner(obs, "reach-v3", output_type="pt").actions
    torch.cuda.manual_seed(7)
    torch.testing.assert_close(unseeded, eager(), rtol=1e-4, atol=1e-5)
    other = runner(observations(seed=3), "reach-v3", generator=torch.Generator("cuda").manual_seed(0)).actions
    assert not np.allclose(other, reference.cpu().numpy())  # new observations flow into the graph
    push = runner(obs, ["push-v3"] * 3, generator=torch.Generator("cuda").manual_seed(0)).actions
    assert not np.allclose(push, reference.cpu().numpy())  # and new tasks
    if cached:
        pipe.enable_block_cache(db.BWCacheConfig(granularity="sub_block"))
        with pytest.raises(ValueError, match="cannot capture"):
            CUDAGraphPolicy(pipe, 3, STEPS)
