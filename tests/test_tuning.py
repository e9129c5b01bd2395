"""tune_schedule: BAC options chosen by measured output error on validation inputs."""

import pytest
import torch
from sampling import sample
from tiny_models import build_transformer

import diffusers_block as db
from diffusers_block.cache.bac import (
    record_features,
    relative_error,
    schedule_from_features,
    uncached_output,
)
from diffusers_block.cache.tuning import tune_schedule_from_features


@pytest.fixture(scope="module")
def wan():
    return build_transformer("wan")


def test_the_chosen_schedule_is_the_closest_candidate_and_reproduces_its_error(wan):
    steps = 12
    calibrate = lambda m: sample(m, "wan", steps=steps, seed=1)  # noqa: E731
    validate = lambda m: sample(m, "wan", steps=steps, seed=2)  # noqa: E731
    grid = {"keep_first": (0, 3), "forecast": ("none", "taylor1")}
    tuned = db.tune_schedule(wan, calibrate, validate, updates=5, grid=grid)
    assert len(tuned.distances) == 4 and len(set(tuned.distances.values())) == 4  # candidates really differ
    assert tuned.distances[db.cache.tuning.candidate_name(tuned.options)] == min(tuned.distances.values())
    assert set(tuned.options) == {"keep_first", "forecast"} and tuned.schedule.forecast == tuned.options["forecast"]
    if tuned.options["keep_first"]:
        assert all(tuple(steps_[:3]) == (0, 1, 2) for steps_ in tuned.schedule.update_steps.values())
    assert all(len(steps_) == 5 for steps_ in tuned.schedule.update_steps.values())

    reference = validate(wan)
    db.enable_block_cache(wan, tuned.schedule)
    try:
        cached = validate(wan)
    finally:
        db.disable_block_cache(wan)
    assert relative_error(cached, reference) == pytest.approx(min(tuned.distances.values()), rel=1e-6)
    torch.testing.assert_close(validate(wan), reference, rtol=0, atol=0)  # disabled: exactly uncached again


def test_bad_grid_is_refused(wan):
    with pytest.raises(ValueError, match="grid keys"):
        db.tune_schedule(wan, lambda m: None, lambda m: None, updates=3, grid={"threshold": (0.1,)})


def test_combinations_the_budget_cannot_hold_are_left_out(wan):
    steps = 10
    run = lambda m: sample(m, "wan", steps=steps, seed=1)  # noqa: E731
    tuned = db.tune_schedule(wan, run, run, updates=3, grid={"keep_first": (0, 1, 5)})  # keep 5 of 3 updates: no
    assert set(tuned.distances) == {"keep_first=0", "keep_first=1"}
    with pytest.raises(ValueError, match="no option combination"):
        db.tune_schedule(wan, run, run, updates=3, grid={"keep_first": (4, 5)})


def test_a_given_reference_is_not_generated_again(wan):
    calls = []

    def validate(m):
        calls.append(1)
        return sample(m, "wan", steps=10, seed=2)

    features = record_features(wan, lambda m: sample(m, "wan", steps=10, seed=1))
    grid = {"keep_first": (0, 1, 2)}
    tune_schedule_from_features(wan, features, validate, 4, grid=grid)
    assert len(calls) == 1 + 3
    reference = uncached_output(wan, validate)
    calls.clear()
    tune_schedule_from_features(wan, features, validate, 4, grid=grid, reference=reference)
    assert len(calls) == 3


def test_bubbling_union_is_a_grid_key():
    model = build_transformer("wan")
    calibrate = lambda m: sample(m, "wan", steps=10, seed=1)  # noqa: E731
    validate = lambda m: sample(m, "wan", steps=10, seed=2)  # noqa: E731
    grid = {"bubbling_union_top": (0, 3), "objective": ("cosine",)}
    options = {"granularity": "sub_block", "shared": False}
    tuned = db.tune_schedule(model, calibrate, validate, 4, grid=grid, bubbling_union_top=1, **options)
    assert set(tuned.distances) == {"bubbling_union_top=0-objective=cosine", "bubbling_union_top=3-objective=cosine"}
    assert len(set(tuned.distances.values())) == 2  # the union changes the schedule, and so the output
    features = record_features(model, calibrate, "sub_block")
    union = tuned.options["bubbling_union_top"]  # the grid's value, not the argument's
    assert tuned.schedule == schedule_from_features(features, 4, bubbling_union_top=union, **options)
