"""The Meta-World side of the policy: reproducible environments, the chunked control loop, FLOP accounting."""

import time

import numpy as np
import pytest
import torch
from test_policy import STEPS, act, observations, tiny_pipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffusers_block as db
from diffusers_block.pipelines.policy.envs import EnvPool, UnknownTaskError, make_env, make_expert, reset_to
from diffusers_block.pipelines.policy.flops import DenoiserFlops, computed_per_unit
from diffusers_block.pipelines.policy.rollout import evenly_spaced, run_episodes, uniform_schedule

pytest.importorskip("metaworld")


def expert_actor(tasks):
    """Closed-loop scripted expert as a chunked policy (chunks of one action)."""
    experts = [make_expert(t) for t in tasks]
    return lambda history, names: np.stack([[np.clip(e.get_action(h[-1]), -1, 1)] for e, h in zip(experts, history)])


def test_reset_is_reproducible_and_variations_differ():
    env = make_env("reach-v3", 3)
    first, other, again = reset_to(env, 4), reset_to(env, 5), reset_to(env, 4)
    assert np.array_equal(first, again) and not np.array_equal(first, other) and first.shape == (39,)
    with pytest.raises(UnknownTaskError, match="unknown Meta-World task 'reach-v9'"):
        make_env("reach-v9", 0)


def test_expert_through_the_chunked_loop_succeeds():
    tasks = ["reach-v3", "button-press-topdown-v3"]
    with EnvPool(tasks, seed=3, workers=0) as pool:
        result = run_episodes(expert_actor(tasks), pool, [0, 1], n_obs_steps=2, max_steps=150)
    assert result.success == [True, True]
    assert all(20 < s < 150 for s in result.episode_steps)  # episodes stop at the first success
    summary = result.summary(n_action_steps=1)
    assert summary["success_rate"] == 1.0 and summary["chunks"] == max(result.episode_steps)


def test_a_policy_that_does_nothing_fails_and_workers_match_in_process():
    still = lambda history, names: np.zeros((len(history), 8, 4), np.float32)  # noqa: E731
    results = []
    for workers in (0, 2):
        with EnvPool(["reach-v3"] * 2, seed=3, workers=workers) as pool:
            results.append(run_episodes(still, pool, [0, 1], n_obs_steps=2, max_steps=24))
    assert results[0].success == [False, False] and results[0].episode_steps == [24, 24] and results[0].chunks == 3
    assert results[1].success == results[0].success and results[1].episode_steps == results[0].episode_steps


def test_real_time_mode_counts_deadline_misses():
    def slow(history, names):
        time.sleep(0.06)  # planning takes 60 ms: longer than a 40 ms control period
        return np.zeros((len(history), 2, 4), np.float32)

    with EnvPool(["reach-v3"], seed=3) as pool:
        late = run_episodes(slow, pool, [0], 2, max_steps=6, real_time_hz=25)
        on_time = run_episodes(slow, pool, [0], 2, max_steps=6, real_time_hz=5)
    # 20 ms late after each of the 2 later chunks: one missed tick each, with 20 ms of slack either way for a busy
    # machine (the sleep overshooting, or stepping the environment).
    assert late.deadline_misses == 2 and late.missed_ticks == 2
    assert on_time.deadline_misses == 0 and on_time.missed_ticks == 0


def test_flop_accounting_matches_a_direct_count():
    pipe, one = tiny_pipeline(), observations(1)  # FLOPs are per environment
    flops = DenoiserFlops(pipe)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        act(pipe, one)
    assert flops.chunk(STEPS) == counter.get_total_flops()
    schedule = uniform_schedule(pipe, STEPS, 4)
    assert all(s == tuple(evenly_spaced(STEPS, 4)) for s in schedule.update_steps.values())
    pipe.enable_block_cache(schedule)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        act(pipe, one)
    counts = computed_per_unit(pipe.block_cache_summary())
    assert set(counts.values()) == {4}
    assert flops.chunk(STEPS, unit_computed=counts) == counter.get_total_flops() < flops.chunk(STEPS) / 2
    pipe.disable_block_cache()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        act(pipe, one, denoiser_steps=[0, 6])
    assert flops.chunk(STEPS, calls=2) == counter.get_total_flops()


def test_rollout_cli_rejects_a_task_the_policy_was_not_trained_for(tmp_path):
    from diffusers_block.pipelines.policy.rollout import main

    tiny_pipeline().save_pretrained(tmp_path)
    with pytest.raises(UnknownTaskError, match="not trained for task 'door-open-v3'.*reach-v3"):
        main(["--policy", str(tmp_path), "--task", "door-open-v3", "--episodes", "1", "--device", "cpu"])
    summary = main(
        [
            "--policy",
            str(tmp_path),
            "--task",
            "reach-v3",
            "--episodes",
            "2",
            "--device",
            "cpu",
            "--scheduler",
            "ddim",
            "--steps",
            "2",
            "--max-steps",
            "16",
            "--cache",
            "uniform",
            "--updates",
            "1",
        ]
    )
    assert summary["episodes"] == 2 and summary["chunks"] == 2 and summary["latency_ms_p50"] > 0


def test_calibrated_policy_schedule_round_trips(tmp_path):
    pipe = tiny_pipeline()
    obs = observations()
    schedule = db.calibrate_schedule(pipe, lambda p: act(p, obs), updates=3, granularity="sub_block")
    schedule.save(tmp_path / "s.json")
    loaded = db.StaticScheduleConfig.load(tmp_path / "s.json")
    assert loaded == schedule
    pipe.enable_block_cache(loaded)
    cached = act(pipe, obs).actions
    pipe.enable_block_cache(schedule)
    assert torch.equal(act(pipe, obs).actions, cached)
    pipe.disable_block_cache()


def test_default_bac_schedule_is_the_validated_choice():
    from diffusers_block.pipelines.policy.calibrate import default_bac_schedule

    pipe = tiny_pipeline()
    candidates = (("cosine", 1, 1), ("error", 2, 0))
    schedule, report = default_bac_schedule(pipe, ["reach-v3"], updates=4, steps=STEPS, candidates=candidates)
    assert set(report["errors"]) == {"cosine-kl1-u1", "error-kl2-u0"} and report["validation_histories"] == 6
    assert report["chosen"] == min(report["errors"], key=report["errors"].get)
    kept = {"cosine-kl1-u1": 1, "error-kl2-u0": 2}[report["chosen"]]
    assert all(set(range(STEPS - kept, STEPS)) <= set(steps) for steps in schedule.update_steps.values())
    pipe.enable_block_cache(schedule)  # the chosen schedule runs, and its error is the one reported
    cached = act(pipe).actions
    pipe.disable_block_cache()
    assert cached.shape == (3, 8, 4) and report["errors"][report["chosen"]] > 0
