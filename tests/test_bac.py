"""BAC's Adaptive Caching Scheduler and Bubbling Union, checked against brute force and hand-made cases."""

import itertools

import pytest
import torch
from sampling import sample
from tiny_models import build_transformer

import diffusers_block as db
from diffusers_block.cache.bac import (
    InfeasibleScheduleError,
    bubbling_union,
    calibrate,
    candidate_schedules,
    cosine_similarity_matrix,
    negative_error_matrix,
    optimal_update_steps,
    record_features,
    relative_error,
    schedule_from_features,
    segment_scores,
    select_schedule,
    uncached_output,
)


def _score(similarity, steps):
    bounds = list(steps) + [similarity.shape[0]]
    return sum(float(similarity[a, a:b].sum()) for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k, m", [(6, 1), (6, 3), (7, 4), (8, 8)])
def test_dp_matches_brute_force(seed, k, m):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(k, 5, generator=g).cumsum(0)  # a drifting trajectory, like denoising features
    similarity = torch.nn.functional.cosine_similarity(features[:, None], features[None], dim=-1)
    steps = optimal_update_steps(similarity, m)
    assert steps[0] == 0 and len(steps) == m == len(set(steps))
    best = max(_score(similarity, (0, *rest)) for rest in itertools.combinations(range(1, k), m - 1))
    assert _score(similarity, steps) == pytest.approx(best)


def test_dp_recomputes_where_features_jump():
    similarity = torch.ones(8, 8)
    similarity[:5, 5:] = similarity[5:, :5] = 0.1  # features change abruptly at step 5
    assert optimal_update_steps(similarity, 2) == [0, 5]


def test_segment_scores_are_prefix_sums():
    similarity = torch.arange(9.0).view(3, 3)
    phi = segment_scores(similarity)
    assert phi[0, 2] == 0 + 1 + 2 and phi[1, 1] == 4 and phi[1, 2] == 4 + 5 and phi[2, 1] == float("-inf")


def test_bad_update_count():
    with pytest.raises(ValueError, match=r"updates must be in \[1, 4\]"):
        optimal_update_steps(torch.eye(4), 5)


def test_bubbling_union_hand_made():
    steps = {
        "blocks.0.attn1": [0, 4],
        "blocks.0.ffn": [0, 2],
        "blocks.1.attn1": [0, 5],
        "blocks.1.ffn": [0, 3],
    }
    variability = {"blocks.0.attn1": 0.1, "blocks.0.ffn": 0.2, "blocks.1.attn1": 0.9, "blocks.1.ffn": 0.3}
    merged = bubbling_union(steps, variability, top=1)
    assert merged["blocks.1.attn1"] == [0, 3, 5]  # + FFN steps of layer 1 only (no FFN after it)
    assert merged["blocks.0.attn1"] == [0, 4]  # not in the top 1: unchanged
    assert bubbling_union(steps, variability, top=2)["blocks.1.ffn"] == [0, 3]
    assert bubbling_union(steps, {"blocks.0.attn1": 1.0}, top=1)["blocks.0.attn1"] == [0, 2, 3, 4]


def test_calibrated_schedule_runs_and_updating_every_step_is_exact():
    model = build_transformer("wan")
    reference = sample(model, "wan", steps=10)
    config = calibrate(model, lambda m: sample(m, "wan", steps=10), updates=4)
    assert set(config.update_steps) == {"blocks.0", "blocks.1", "blocks.2"}
    assert all(len(s) == 4 and s[0] == 0 for s in config.update_steps.values())
    db.enable_block_cache(model, config)
    cached = sample(model, "wan", steps=10)
    assert db.block_cache_summary(model).fraction_computed == pytest.approx(0.4)
    assert not torch.equal(cached, reference)
    every_step = calibrate(model, lambda m: sample(m, "wan", steps=10), updates=1.0, granularity="sub_block")
    db.enable_block_cache(model, every_step)
    assert torch.equal(sample(model, "wan", steps=10), reference)
    db.disable_block_cache(model)


def test_error_objective_sees_magnitude_that_cosine_ignores():
    # One direction throughout; the features grow 10x at step 4 and 1.1x at step 2. Cosine sees no change at all, so
    # its schedule is arbitrary; the error objective spends its second update where the jump is largest.
    scale = torch.tensor([1.0, 1.0, 1.1, 1.1, 11.0, 11.0])
    features = scale.view(6, 1, 1) * torch.ones(6, 2, 8)
    assert torch.allclose(cosine_similarity_matrix(features), torch.ones(6, 6))
    assert optimal_update_steps(negative_error_matrix(features), 2) == [0, 4]
    assert negative_error_matrix(features).diagonal().abs().max() < 1e-6  # reusing a step's own features is free


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be one of"):
        calibrate(build_transformer("wan"), lambda t: None, 2, objective="l1")


def test_keep_first_always_updates_the_first_steps_and_optimises_the_rest():
    similarity = torch.ones(10, 10)
    similarity[:7, 7:] = similarity[7:, :7] = 0.1  # a jump at step 7
    steps = optimal_update_steps(similarity, 5, keep_first=3)
    assert steps[:3] == [0, 1, 2] and 7 in steps and len(steps) == 5
    with pytest.raises(ValueError, match="keep_first"):
        optimal_update_steps(similarity, 3, keep_first=3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k, m, first, last", [(7, 3, 0, 1), (7, 4, 0, 2), (8, 4, 1, 2), (8, 5, 2, 1), (6, 3, 2, 0)])
def test_dp_with_kept_steps_matches_brute_force(seed, k, m, first, last):
    # The optimum over every schedule that contains the kept steps, not a DP on the steps in between.
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(k, 5, generator=g).cumsum(0)
    similarity = torch.nn.functional.cosine_similarity(features[:, None], features[None], dim=-1)
    kept = set(range(first)) | set(range(k - last, k)) | {0}
    steps = optimal_update_steps(similarity, m, keep_first=first, keep_last=last)
    assert len(steps) == m == len(set(steps)) and kept <= set(steps)
    feasible = [(0, *rest) for rest in itertools.combinations(range(1, k), m - 1) if kept <= {0, *rest}]
    assert _score(similarity, steps) == pytest.approx(max(_score(similarity, s) for s in feasible))


def test_keep_last_updates_the_last_steps():
    similarity = torch.ones(10, 10)
    similarity[:3, 3:] = similarity[3:, :3] = 0.1  # a jump at step 3
    assert optimal_update_steps(similarity, 4, keep_last=2) == [0, 3, 8, 9]
    assert optimal_update_steps(similarity, 2) == [0, 3]
    with pytest.raises(ValueError, match="keep_last must be in"):
        optimal_update_steps(similarity, 3, keep_last=3)
    with pytest.raises(ValueError, match=r"keep_first \+ keep_last \(1 \+ 2\)"):
        optimal_update_steps(similarity, 3, keep_first=1, keep_last=2)


def test_calibrate_keep_last_fraction():
    model = build_transformer("wan")
    config = calibrate(model, lambda m: sample(m, "wan", steps=10), updates=5, keep_last=0.2)
    assert all(s[-2:] == (8, 9) and len(s) == 5 for s in config.update_steps.values())
    with pytest.raises(ValueError, match="must be fewer than the updates"):
        calibrate(model, lambda m: sample(m, "wan", steps=10), updates=2, keep_last=0.2)


def test_select_schedule_keeps_the_candidate_closest_to_uncached():
    model = build_transformer("wan")
    generate = lambda m: sample(m, "wan", steps=10)  # noqa: E731
    reference = generate(model)
    candidates = {
        "every-step": db.StaticScheduleConfig(interval=1),
        "every-3rd": db.StaticScheduleConfig(interval=3),
        "every-5th": db.StaticScheduleConfig(interval=5),
    }
    best, errors = select_schedule(model, generate, candidates)
    assert best == "every-step" and errors["every-step"] == 0
    assert 0 < errors["every-3rd"] < errors["every-5th"]  # the error grows with the reuse, measured
    assert torch.equal(generate(model), reference)  # no cache left attached
    assert relative_error((reference * 1.1,), reference) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one candidate"):
        select_schedule(model, generate, {})


def test_select_schedule_with_a_reference_made_once_gives_the_same_choice_and_errors():
    model = build_transformer("wan")
    calls = []

    def generate(m):
        calls.append(1)
        return sample(m, "wan", steps=10)

    candidates = {"every-2nd": db.StaticScheduleConfig(interval=2), "every-4th": db.StaticScheduleConfig(interval=4)}
    best, errors = select_schedule(model, generate, candidates)
    assert len(calls) == 3  # the uncached reference, then each candidate
    reference = uncached_output(model, generate)
    calls.clear()
    for _ in range(2):  # e.g. two budgets' choices on the same validation inputs: no reference run again
        assert select_schedule(model, generate, candidates, reference=reference) == (best, errors)
    assert len(calls) == 4 and best == "every-2nd" and 0 < errors["every-2nd"] < errors["every-4th"]
    assert torch.equal(generate(model), reference)  # no cache left attached


def test_candidate_schedules_leave_out_what_the_budget_cannot_hold_and_refuse_bad_input():
    model = build_transformer("wan")
    features = record_features(model, lambda m: sample(m, "wan", steps=10))
    candidates = {
        "kf0": {"keep_first": 0},
        "kf2-error": {"keep_first": 2, "objective": "error"},
        "kf4": {"keep_first": 4},
    }
    schedules = candidate_schedules(features, 4, candidates, shared=True, objective="cosine")
    assert list(schedules) == ["kf0", "kf2-error"]  # keep 4 of 4 updates: left out
    for name in schedules:  # each is the calibration of its options over the common ones (options win)
        assert schedules[name] == schedule_from_features(
            features, 4, **{"shared": True, "objective": "cosine", **candidates[name]}
        )
    assert schedules["kf0"] != schedules["kf2-error"]
    with pytest.raises(InfeasibleScheduleError, match="must be fewer than the updates"):
        schedule_from_features(features, 4, keep_first=4)
    with pytest.raises(ValueError, match=r"no option combination of the candidates is feasible for updates=2.*kf4"):
        candidate_schedules(features, 2, {"kf4": {"keep_first": 4}})
    with pytest.raises(ValueError, match="objective must be one of"):  # a typo is not an infeasible budget
        candidate_schedules(features, 4, {"kf0": {}, "typo": {"objective": "cosin"}})
