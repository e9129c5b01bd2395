"""The demo's generate functions without a browser: numbers, cache isolation between requests, messages.

The browser test (tests/test_app_browser.py) drives the same functions through the page.
"""

import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")

from diffusers_block import block_cache_summary  # noqa: E402
from diffusers_block.demo import TABS, build_demo, render  # noqa: E402
from diffusers_block.demo.controls import CacheSettings  # noqa: E402
from diffusers_block.demo.image import DigitsImageTab, DigitsRequest  # noqa: E402
from diffusers_block.demo.pipeline import (  # noqa: E402
    AnyPipelineTab,
    PipelineLoadError,
    PipelineRequest,
    to_tensor,
)
from diffusers_block.demo.policy import PolicyRequest, PolicyTab, closest_approach  # noqa: E402
from diffusers_block.demo.sparse import SparseSettings, sparse_available  # noqa: E402
from diffusers_block.demo.student import Student  # noqa: E402
from diffusers_block.demo.video import CELL, FRAMES, DigitsVideoTab, VideoRequest  # noqa: E402

try:
    from diffusers_block import sparse_attention_summary
except ImportError:  # installs without sparse attention: its tests skip
    sparse_attention_summary = None

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
REQUEST = DigitsRequest(digits=(0, 1, 7), steps=STEPS, seed=3)
# warm-up 2, cool-down 1, every 2nd step between: steps 0, 1, 2, 4, 6, 8, 9 of 10 compute
STATIC = CacheSettings(policy="static", interval=2, static_warmup_steps=2, static_cooldown_steps=1)
STATIC_COMPUTED = 7 / 10
NO_REUSE = CacheSettings(policy="static", interval=1, static_warmup_steps=0, static_cooldown_steps=0)


@pytest.fixture(scope="module")
def digits_tab():
    return DigitsImageTab("cpu")


def _pipe(tab: DigitsImageTab):
    with tab.slot.use() as model:
        return model.pipe


def test_app_help_lists_the_launch_options():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for option in ("--host", "--port", "--device", "--share"):
        assert option in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without a GPU")
def test_app_refuses_cuda_without_a_gpu():
    out = subprocess.run([sys.executable, "app.py", "--device", "cuda"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "no CUDA GPU is visible" in out.stderr and "--device cpu" in out.stderr


def test_every_registered_tab_builds():
    demo = build_demo("cpu")
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    for tab in TABS:
        assert {f"tab-{tab.key}", f"{tab.key}-generate", f"{tab.key}-metrics", f"{tab.key}-heatmap"} <= ids


def test_digits_static_schedule_numbers(digits_tab):
    result = digits_tab.generate(REQUEST, STATIC)
    comparison = result.comparison
    assert comparison.baseline.output.shape == (3, 1, 32, 32)
    assert comparison.work_fraction == pytest.approx(STATIC_COMPUTED)  # Linear calls inside blocks
    assert comparison.summary.fraction_computed == pytest.approx(STATIC_COMPUTED)
    assert comparison.summary.computed.shape == (1, STEPS, 10)  # one call per step (CFG batched), 10 blocks
    assert comparison.baseline.transformer_calls == comparison.accelerated.transformer_calls == STEPS
    assert 20 < comparison.psnr_db < float("inf")
    assert 0.8 < comparison.ssim < 1
    assert comparison.speedup > 0 and comparison.baseline.seconds > 0
    assert 0 <= result.baseline_accuracy <= 1 and 0 <= result.accelerated_accuracy <= 1
    assert comparison.calibration_seconds is None
    pictures = result.pictures
    assert pictures.baseline.size == pictures.accelerated.size == (3 * 96, 96)
    assert pictures.heatmap.size[0] > 200
    assert "speed-up" in pictures.metrics and f"{1 - STATIC_COMPUTED:.1%} saved" in pictures.metrics


def test_cache_state_is_isolated_between_requests(digits_tab):
    cached = digits_tab.generate(REQUEST, CacheSettings(policy="bwcache", threshold=0.5, warmup_steps=1))
    assert cached.comparison.work_fraction < 1
    with pytest.raises(RuntimeError, match="not enabled"):  # nothing of the request stays on the pipeline
        block_cache_summary(_pipe(digits_tab))
    plain = digits_tab.generate(REQUEST, NO_REUSE)
    # The second request neither reuses the first one's cached residuals nor keeps its policy.
    assert plain.comparison.work_fraction == 1.0
    assert torch.equal(plain.comparison.accelerated.output, plain.comparison.baseline.output)
    assert torch.equal(plain.comparison.baseline.output, cached.comparison.baseline.output)


def test_concurrent_requests_do_not_share_cache_state(digits_tab):
    alone = digits_tab.generate(REQUEST, STATIC).comparison.accelerated.output
    results = {}

    def request(name, settings):
        results[name] = digits_tab.generate(REQUEST, settings).comparison

    threads = [threading.Thread(target=request, args=a) for a in (("static", STATIC), ("plain", NO_REUSE))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["static"].work_fraction == pytest.approx(STATIC_COMPUTED)
    assert torch.equal(results["static"].accelerated.output, alone)
    assert results["plain"].work_fraction == 1.0
    assert torch.equal(results["plain"].accelerated.output, results["plain"].baseline.output)


def test_repeated_timing_keeps_outputs_and_work(digits_tab):
    small = replace(REQUEST, digits=(5,))
    once = digits_tab.generate(small, STATIC).comparison
    twice = digits_tab.generate(replace(small, repeats=2), STATIC).comparison
    assert twice.repeats == 2 and "Fastest of 2 alternating runs" in render.metrics_table(twice, "cpu")
    assert twice.work_fraction == once.work_fraction
    assert torch.equal(twice.accelerated.output, once.accelerated.output)


def test_digits_bac_schedule_spends_its_update_budget(digits_tab):
    updates = 4
    result = digits_tab.generate(REQUEST, CacheSettings(policy="bac", bac_updates=updates, bac_shared=True))
    assert result.comparison.work_fraction == pytest.approx(updates / STEPS)
    assert result.comparison.calibration_seconds > 0
    assert "BAC" in result.pictures.metrics


def test_digits_sub_block_taylor_forecast(digits_tab):
    settings = CacheSettings(
        policy="static",
        interval=3,
        static_warmup_steps=2,
        granularity="sub_block",
        forecast="taylor1",
        static_cooldown_steps=1,
    )
    result = digits_tab.generate(REQUEST, settings)
    assert len(result.comparison.summary.unit_names) > 10  # attention and FFN of every block
    assert result.comparison.work_fraction < 1


@pytest.mark.parametrize(
    ("request_", "settings", "message"),
    [
        (DigitsRequest(digits=()), CacheSettings(), "at least one digit"),
        (DigitsRequest(steps=1), CacheSettings(), r"Steps must be an integer in \[2, 200\]"),
        (DigitsRequest(steps=2.5), CacheSettings(), "Steps must be an integer"),
        (DigitsRequest(seed=-1), CacheSettings(), "Seed must be"),
        (DigitsRequest(guidance=0.5), CacheSettings(), "Guidance scale must be in"),
        (DigitsRequest(per_digit=9), CacheSettings(), "Images per digit"),
        (DigitsRequest(repeats=0), CacheSettings(), r"Timed runs per side must be an integer in \[1, 5\]"),
        (REQUEST, CacheSettings(threshold=20.0), r"BWCacheConfig.threshold must be a number in \[0.0, 10.0\]"),
        (REQUEST, CacheSettings(policy="static", interval=0), "StaticScheduleConfig.interval must be an integer >= 1"),
        (REQUEST, CacheSettings(policy="bac", bac_updates=STEPS + 1), r"BAC updates must be in \[1, 10\]"),
        (REQUEST, CacheSettings(granularity="layer"), "granularity must be one of"),
    ],
)
def test_bad_inputs_give_messages(digits_tab, request_, settings, message):
    with pytest.raises(gr.Error, match=message):
        digits_tab.generate(request_, settings)


needs_image_student = pytest.mark.skipif(
    Student.folder_of(DigitsImageTab.student_model) is None, reason="no distilled image student in models/"
)


@needs_image_student
def test_digits_teacher_beside_distilled_student(digits_tab):
    """The student at its own steps (one forward a step, CFG folded in) beside the teacher at its steps with CFG;
    disabling it gives the teacher exactly."""
    result = digits_tab.generate(REQUEST, CacheSettings(), distilled=True)
    comparison = result.comparison
    student_steps = comparison.student.num_steps
    assert student_steps < STEPS and comparison.config is None and comparison.summary is None
    assert comparison.baseline.transformer_calls == STEPS and comparison.accelerated.transformer_calls == student_steps
    assert comparison.baseline.forwards_per_output() == 2 * STEPS  # CFG batched: 2 rows per image per step
    assert comparison.accelerated.forwards_per_output() == student_steps
    assert 15 < comparison.psnr_db < float("inf")
    assert result.accelerated_accuracy >= 2 / 3  # the shipped student draws digits the classifier reads
    metrics = result.pictures.metrics
    assert "| | teacher | distilled student |" in metrics and "PSNR vs teacher" in metrics
    assert f"| {2 * STEPS} | {student_steps} ({student_steps} steps, CFG folded in) |" in metrics
    assert result.pictures.sides == ("teacher", f"distilled student ({student_steps} steps)")
    assert result.pictures.heatmap is None
    pipe = _pipe(digits_tab)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"  # the teacher's own again
    again = digits_tab.generate(REQUEST, NO_REUSE).comparison.baseline.output
    assert torch.equal(again, comparison.baseline.output)


def test_distilled_choice_only_where_the_student_ships(monkeypatch, tmp_path):
    """The radio appears only where the tab's student folder exists (checked when the page is built); asking for a
    student that does not ship is a message."""
    import diffusers_block.demo.student as student_module
    from diffusers_block.zoo.locate import ModelNotFoundError

    def missing(name, *args, **kwargs):
        raise ModelNotFoundError(f"no {name}")

    monkeypatch.setattr(student_module, "model_path", missing)
    with gr.Blocks():
        assert student_module.acceleration_choice("t2", "digits-image-distilled") is None
    monkeypatch.setattr(student_module, "model_path", lambda name, *a, **k: tmp_path / name)
    with gr.Blocks():
        radio = student_module.acceleration_choice("t3", "digits-video-distilled")
    assert radio is not None and radio.elem_id == "t3-method" and student_module.STUDENT_CHOICE in str(radio.choices)
    with pytest.raises(gr.Error, match="No distilled student `digits-video-distilled`"):
        Student.required(None, "digits-video-distilled")


@pytest.mark.skipif(DigitsVideoTab.available() is not None, reason="no trained video model in models/")
def test_video_tab_plays_both_clips():
    from PIL import Image

    tab = DigitsVideoTab("cpu")
    # 4 steps: warm-up step 0, cool-down step 3, every 2nd step between from step 1: 3 of 4 compute
    settings = CacheSettings(policy="static", interval=2, static_warmup_steps=1, static_cooldown_steps=1)
    result = tab.generate(VideoRequest(digits=(4,), steps=4), settings)
    comparison = result.comparison
    assert comparison.baseline.output.shape == (1, FRAMES, 1, 32, 32)
    assert comparison.summary.fraction_computed == pytest.approx(3 / 4)
    assert comparison.baseline.transformer_calls == 2 * 4  # WanPipeline calls cond and uncond separately
    assert 0 < comparison.psnr_db < float("inf") and 0 < comparison.ssim < 1
    assert all(
        0 <= value <= 1 for value in result.frame_accuracy + result.motion_accuracy + result.motion_axes_accuracy
    )
    assert "clips moving along the asked line" in result.pictures.metrics
    with Image.open(result.pictures.baseline) as clip:
        assert clip.n_frames == FRAMES and clip.size == (CELL, CELL)
    assert "classifier accuracy per frame" in result.pictures.metrics
    with pytest.raises(gr.Error, match="Motion must be one of"):
        tab.generate(VideoRequest(motion="sideways"), settings)


def test_video_defaults_are_the_models_best_evaluated_settings():
    """The tab's defaults are those of the model's own evaluation with the best per-frame accuracy (CFG and steps),
    and the caption quotes that evaluation's numbers."""
    import json

    from diffusers_block.demo.video import CAPTION
    from diffusers_block.zoo import model_path

    evaluation = json.loads((model_path("digits-video") / "training" / "eval.json").read_text())
    runs = {
        float(name.removeprefix("guidance_")): run for name, run in evaluation.items() if name.startswith("guidance_")
    }
    best = max(runs, key=lambda g: runs[g]["frame_accuracy"])
    assert VideoRequest.guidance == best and VideoRequest.steps == 50
    assert f"{runs[best]['frame_accuracy']:.1%} per frame" in CAPTION
    assert f"{runs[best]['motion_axes_accuracy']:.1%} along the line" in CAPTION


@pytest.mark.skipif(DigitsVideoTab.available() is not None, reason="no trained video model in models/")
def test_video_teacher_beside_a_distilled_student(monkeypatch, tmp_path):
    """With a student in the video tab's folder (here an untrained one: the teacher itself on a 2-step grid), the
    tab runs the teacher at its steps and the student at its own, one forward a step."""
    import diffusers_block.demo.student as student_module
    from diffusers_block.distill import BlockwiseFlowModel, SegmentSchedule
    from diffusers_block.distill.schedule import split_steps, uniform_sigmas
    from diffusers_block.zoo import load_digits_video_pipeline

    pipe, _ = load_digits_video_pipeline(device="cpu")
    folder = tmp_path / DigitsVideoTab.student_model
    schedule = SegmentSchedule(uniform_sigmas(2), split_steps(2, 2))
    BlockwiseFlowModel.for_teacher(pipe.transformer, schedule, rank=1, guidance_scale=3.0).save_pretrained(folder)
    monkeypatch.setattr(student_module, "model_path", lambda name, *a, **k: tmp_path / name)
    tab = DigitsVideoTab("cpu")
    result = tab.generate(VideoRequest(digits=(4,), steps=3), CacheSettings(), distilled=True)
    comparison = result.comparison
    assert comparison.student.num_steps == 2 and Path(comparison.student.folder).resolve() == folder.resolve()
    assert comparison.baseline.transformer_calls == 2 * 3  # cond and uncond calls, 3 steps
    assert comparison.accelerated.transformer_calls == 2  # one forward a step
    assert comparison.baseline.forwards_per_output() == 6 and comparison.accelerated.forwards_per_output() == 2
    assert comparison.accelerated.output.shape == (1, FRAMES, 1, 32, 32)
    assert "distilled student" in result.pictures.metrics and "classifier accuracy per frame" in result.pictures.metrics


needs_sparse = pytest.mark.skipif(not sparse_available(), reason="this install has no enable_sparse_attention")
SPARSE = SparseSettings(enabled=True, threshold=0.5, block_size=16, dense_steps=2, refresh_interval=2)


@needs_sparse
def test_sparse_attention_alone(digits_tab):
    result = digits_tab.generate(REQUEST, CacheSettings(policy="none"), sparse=SPARSE)
    comparison = result.comparison
    assert comparison.summary is None and result.pictures.heatmap is None  # no block cache
    assert comparison.work_fraction == 1.0
    assert 0 < comparison.sparse_summary.sparse_density < 1
    assert comparison.psnr_db < float("inf")
    assert result.pictures.mask is not None and "attention key blocks kept" in result.pictures.metrics
    with pytest.raises(RuntimeError, match="not enabled"):  # removed again after the request
        sparse_attention_summary(_pipe(digits_tab))


@needs_sparse
def test_sparse_attention_approximates_and_scores_as_asked(digits_tab):
    config = replace(SPARSE, skipped_blocks="first", scoring="antidiagonal").config()
    assert (config.approximation, config.scoring, config.stride) == ("first", "antidiagonal", 4)  # 16 / 4 rows
    assert replace(SPARSE, block_size=128, scoring="antidiagonal").config().stride == 8
    assert SPARSE.config().approximation is None  # "drop"
    dropped = digits_tab.generate(REQUEST, CacheSettings(policy="none"), sparse=SPARSE).comparison
    approximated = digits_tab.generate(
        REQUEST, CacheSettings(policy="none"), sparse=replace(SPARSE, skipped_blocks="first")
    ).comparison
    assert approximated.psnr_db != dropped.psnr_db  # the skipped blocks now contribute
    cached = digits_tab.generate(
        REQUEST, CacheSettings(policy="none"), sparse=replace(SPARSE, skipped_blocks="cached")
    ).comparison
    assert replace(SPARSE, skipped_blocks="cached").config().approximation == "cached"
    assert cached.psnr_db > dropped.psnr_db  # exact on selection steps, their skipped part reused in between
    with pytest.raises(gr.Error, match="approximation"):
        replace(SPARSE, skipped_blocks="second").config()


@needs_sparse
def test_sparse_attention_with_a_cache(digits_tab):
    result = digits_tab.generate(REQUEST, STATIC, sparse=replace(SPARSE, layer=99))  # layer out of range: layer 0
    assert result.comparison.work_fraction == pytest.approx(STATIC_COMPUTED)
    assert result.comparison.sparse_summary.sparse_density < 1
    assert result.pictures.heatmap is not None and result.pictures.mask is not None


@needs_sparse
def test_sparse_bad_inputs_give_messages(digits_tab):
    with pytest.raises(gr.Error, match="Nothing to accelerate"):
        digits_tab.generate(REQUEST, CacheSettings(policy="none"))
    with pytest.raises(gr.Error, match=r"SparseAttentionConfig.threshold must be a number in \(0, 1\]"):
        digits_tab.generate(REQUEST, STATIC, sparse=replace(SPARSE, threshold=0.0))


# -- any pipeline ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from tiny_pipelines import build_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    build_pipeline("dit").save_pretrained(root / "dit")
    build_pipeline("sd3").save_pretrained(root / "sd3-no-text-encoder")
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "unet")
    (root / "empty").mkdir()
    return root


def test_any_pipeline_loads_a_local_folder_and_compares(saved_pipelines):
    tab = AnyPipelineTab("cpu")
    source = str(saved_pipelines / "dit")
    info = tab.load(source)
    assert info.pipeline_class == "DiTPipeline" and info.conditioning == "class_labels"
    assert "family dit" in info.transformers[0]
    request = PipelineRequest(prompt="1, 2", steps=STEPS)
    result = tab.generate(source, request, STATIC)
    comparison = result.comparison
    assert comparison.baseline.output.shape == (2, 3, 8, 8)
    assert comparison.summary.fraction_computed == pytest.approx(STATIC_COMPUTED)
    assert comparison.baseline.transformer_calls == comparison.accelerated.transformer_calls == STEPS
    # DiT also runs block 0's timestep embedding outside the blocks (final-layer conditioning), every step.
    assert STATIC_COMPUTED <= comparison.work_fraction < 0.75
    assert comparison.ssim is None and "n/a" in result.pictures.metrics  # 8x8 images: under SSIM's window
    assert tab.generate(source, request, NO_REUSE).comparison.psnr_db == float("inf")
    with pytest.raises(gr.Error, match="neither a class number"):
        tab.generate(source, PipelineRequest(prompt="tabby cat", steps=STEPS), STATIC)
    with pytest.raises(gr.Error, match="Height must be 0"):
        tab.generate(source, PipelineRequest(prompt="1", steps=STEPS, height=30), STATIC)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "Pick a pipeline from the list, or enter a hub id"),
        ("missing", "No folder at"),
        ("empty", "has no model_index.json"),
        ("unet", "cannot accelerate it: DDPMPipeline has no transformer component"),
        ("sd3-no-text-encoder", "saved without its text encoders"),
        ("hub:diffusers-block-tests/no-such-pipeline", "Could not load `diffusers-block-tests/no-such-pipeline`"),
    ],
)
def test_any_pipeline_load_failures_are_messages(saved_pipelines, name, message):
    source = name.removeprefix("hub:") if name.startswith("hub:") or not name else str(saved_pipelines / name)
    with pytest.raises(PipelineLoadError, match=message) as error:
        AnyPipelineTab("cpu").load(source)
    text = str(error.value)
    assert "Traceback" not in text and "\n" not in text and text.count(". ") <= 1  # one clean sentence or two


def test_any_pipeline_offers_offline_sources_with_fitting_prompts():
    """The list holds the shipped models and the tiny random-weight DiT; each loads offline and gets the prompt
    field its conditioning needs; a run where nothing is skipped calls its speed-up timing noise, not a bold win."""
    from diffusers_block.demo.pipeline import PROMPTS, TINY_DIT

    tab = AnyPipelineTab("cpu")
    sources = tab.sources()
    assert sources[-1] == TINY_DIT and "models/digits-image" in sources
    info = tab.load(TINY_DIT)
    assert info.pipeline_class == "DiTPipeline" and info.conditioning == "class_labels"
    request = PipelineRequest(prompt=PROMPTS["class_labels"][1], steps=STEPS)
    result = tab.generate(TINY_DIT, request, STATIC)
    assert result.comparison.summary.fraction_computed == pytest.approx(STATIC_COMPUTED)
    assert re.search(r"speed-up \| 1\.00x \| \*\*\d+\.\d\dx\*\*", result.pictures.metrics)
    plain = tab.generate(TINY_DIT, request, NO_REUSE)
    assert plain.comparison.work_fraction == 1.0
    assert re.search(r"speed-up \| 1\.00x \| \d+\.\d\dx \(no blocks skipped: timing noise\) \|", plain.pictures.metrics)
    assert "**" not in plain.pictures.metrics.split("speed-up")[1].splitlines()[0]

    info = tab.load("models/digits-image")
    assert info.conditioning == "digits" and info.encoder is not None
    digits = tab.generate("models/digits-image", PipelineRequest(prompt="3, 1", steps=2, guidance=3.0), NO_REUSE)
    assert digits.comparison.baseline.output.shape == (2, 1, 32, 32)
    with pytest.raises(gr.Error, match="Enter digits 0-9"):
        tab.generate("models/digits-image", PipelineRequest(prompt="a red fox", steps=2), NO_REUSE)


def test_outputs_of_any_layout_become_tensors():
    import numpy as np
    from PIL import Image

    images = np.random.default_rng(0).random((2, 8, 6, 3), dtype=np.float32)
    assert to_tensor(images).shape == (2, 3, 8, 6)
    assert to_tensor(np.zeros((1, 5, 8, 6, 3), np.float32)).shape == (1, 5, 3, 8, 6)  # video (B, T, H, W, C)
    pil = [Image.fromarray((images[0] * 255).astype(np.uint8))]
    assert to_tensor(pil).shape == (1, 3, 8, 6)
    assert to_tensor([pil, pil]).shape == (2, 1, 3, 8, 6)


# -- robot policy ---------------------------------------------------------------------------------------------------
needs_policy = pytest.mark.skipif(PolicyTab.available() is not None, reason="no shipped policy or no Meta-World")
# One episode of 16 environment steps (2 chunks of 8 actions), 10 DDPM steps per chunk: a few seconds on a CPU.
POLICY_REQUEST = PolicyRequest(task="reach-v3", episodes=1, max_env_steps=16, steps=10, updates=3, ddim_steps=3)


@pytest.fixture(scope="module")
def policy_tab():
    return PolicyTab("cpu")


@needs_policy
def test_policy_uniform_schedule_numbers(policy_tab):
    reports = []
    result = policy_tab.generate(replace(POLICY_REQUEST, policy="uniform"), lambda done, desc: reports.append(desc))
    assert result.work_fraction == pytest.approx(3 / 10)  # every sub-block computes on 3 of the 10 steps
    for run in (result.baseline, result.accelerated):
        summary = run.summary
        assert 1 <= summary["chunks"] <= 2 and summary["episodes"] == 1
        assert 0 <= summary["success_rate"] <= 1
        assert 0 < summary["latency_ms_p50"] <= summary["latency_ms_p99"]
        assert summary["policy_hz"] > 0 and summary["loop_hz"] > 0
        assert run.first_chunk.shape == (1, 8, 4)
        steps = int(summary["mean_episode_steps"])
        assert run.hands[0].shape == run.objects[0].shape == (steps + 1, 3)  # start, then one point per env step
    assert np.array_equal(result.baseline.hands[0][0], result.accelerated.hands[0][0])  # same goal variation
    assert 0 < result.first_chunk_rel_l2 < 10
    assert result.accelerated.heatmap is not None and result.baseline.heatmap is None
    assert result.picture.size[0] > 300
    assert "70.0% saved" in result.metrics and "relative L2" in result.metrics and "Hz" in result.metrics
    assert any("baseline" in d for d in reports) and any("accelerated" in d for d in reports)
    with pytest.raises(RuntimeError, match="not enabled"):  # nothing of the request stays on the policy
        block_cache_summary(policy_tab.slot._value.pipe)


@needs_policy
def test_policy_paths_show_the_point_meta_world_scores(policy_tab):
    """The gripper path is the fingertips' centre (``tcp_center``) Meta-World scores, recorded after every step, not
    the hand position the observation reports, 4.5 cm higher: drawn from the hand, an accelerated episode that
    failed with its fingertips under the goal ended on the goal in the plot. The closest approach agrees with the
    success flag to the millimetre."""
    result = policy_tab.generate(replace(POLICY_REQUEST, policy="uniform", max_env_steps=48))
    env = policy_tab.slot._value.pools[("reach-v3", 1)]._local.envs[0].unwrapped  # where the last rollout stopped
    np.testing.assert_allclose(result.accelerated.hands[0][-1], env.tcp_center, atol=1e-6)
    np.testing.assert_allclose(result.accelerated.goals[0], env._target_pos, atol=1e-6)
    for run in (result.baseline, result.accelerated):
        assert len(run.hands[0]) == len(run.objects[0])  # one point per observation
        assert run.success == [closest <= 0.05 for closest in closest_approach(run)]  # reach-v3: within 5 cm
    assert "closest approach of the fingertips" in result.metrics


def test_demo_runs_on_one_thread_per_pool_on_the_cpu():
    """Two threads made a 100-step chunk of the tiny policy cost 20x the CPU time of one (spinning pools), and a video
    clip 7x the wall-clock; the tabs limit torch's and the BLAS libraries' pools while they run, and give them back
    after."""
    from threadpoolctl import threadpool_info

    from diffusers_block.demo.runner import CPU_THREADS, cpu_threads

    saved = torch.get_num_threads()
    assert CPU_THREADS == 1
    with cpu_threads("cpu"):
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    assert torch.get_num_threads() == saved
    with cpu_threads("cuda"):  # on a GPU: untouched
        assert torch.get_num_threads() == saved


def test_trajectories_mark_failed_episodes_and_show_height():
    """A path that ends on the goal in x-y but under it in z: the side view shows the gap, the end is a cross."""
    goal = np.array([0.0, 0.8, 0.25])
    hand = np.linspace([0.0, 0.6, 0.2], [0.0, 0.8, 0.19], 20)
    picture = render.trajectories([("accelerated", [hand], [hand * 0], [False])], [goal], "t")
    wide = render.trajectories([("accelerated", [hand], [hand * 0], [True])], [goal], "t")
    assert picture.size == wide.size and picture.size[0] > 2 * picture.size[1]  # two views side by side
    assert np.abs(np.asarray(picture, float) - np.asarray(wide, float)).sum() > 0  # failure drawn unlike success


@needs_policy
@pytest.mark.parametrize("settings", [{"policy": "none"}, {"policy": "uniform", "updates": 10}])
def test_policy_without_reuse_repeats_the_baseline(policy_tab, settings):
    """No cache, or a schedule that computes every sub-block at every step: the same actions, paths and work."""
    result = policy_tab.generate(replace(POLICY_REQUEST, **settings))
    assert result.first_chunk_rel_l2 == 0.0
    assert result.work_fraction == pytest.approx(1.0)
    assert result.baseline.success == result.accelerated.success
    assert np.array_equal(result.baseline.hands[0], result.accelerated.hands[0])


@needs_policy
def test_policy_ddim_runs_fewer_steps(policy_tab):
    result = policy_tab.generate(replace(POLICY_REQUEST, policy="ddim"))
    assert result.work_fraction == pytest.approx(3 / 10)  # 3 DDIM steps per chunk instead of 10 DDPM steps
    assert result.accelerated.heatmap is None and "DDIM, 3 steps" in result.metrics
    assert type(policy_tab.slot._value.pipe.scheduler).__name__ == "DDPMScheduler"  # restored after the request


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "fly-v3"}, "Task must be one of reach-v3"),
        ({"episodes": 0}, r"Episodes must be an integer in \[1, 10\]"),
        ({"episodes": 11}, r"Episodes must be an integer in \[1, 10\]"),
        ({"max_env_steps": 4}, r"Max environment steps must be an integer in \[8, 500\]"),
        ({"steps": 1}, r"Steps must be an integer in \[2, 200\]"),
        ({"seed": -1}, "Seed must be"),
        ({"policy": "uniform", "updates": 11}, r"Updates must be in \[1, 10\]"),
        ({"policy": "bac", "updates": 0}, r"Updates must be in \[1, 10\]"),
        ({"policy": "ddim", "ddim_steps": 0}, r"DDIM steps must be an integer in \[1, 10\]"),
        ({"policy": "bwcache", "threshold": 20.0}, r"BWCacheConfig.threshold must be a number in \[0.0, 10.0\]"),
        ({"policy": "teleport"}, "Unknown acceleration"),
    ],
)
def test_policy_bad_inputs_give_messages(changes, message):
    with pytest.raises(gr.Error, match=message):
        PolicyTab("cpu").generate(replace(POLICY_REQUEST, **changes))
