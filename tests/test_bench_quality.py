"""The quality benchmark on the shipped image model: a tiny sweep on CPU, checking what its JSON claims."""

import argparse
import json

import pytest
from sampling import sample
from tiny_models import build_transformer

from diffusers_block.bench.__main__ import main as bench
from diffusers_block.bench.quality import accelerations
from diffusers_block.cache.bac import record_features
from diffusers_block.cache.tuning import DEFAULT_GRID, candidate_name, tune_schedule_from_features


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = ["quality", "--device", "cpu", "--steps", "8", "--per-class", "1", "--guidance", "1"]
    argv += ["--bac-fractions", "0.5"]
    argv += ["--only", "bac-validated|bac-shared-4|static-2$", "--no-peers", "--out", str(out), "--name", "q"]
    bench(argv)
    return json.loads(next(out.glob("q*.json")).read_text())


def test_every_run_is_measured_against_the_uncached_images(result):
    rows = {row["name"]: row for row in result["results"]}
    assert set(rows) == {"static-2", "bac-shared-4", "bac-validated-4"}
    for row in rows.values():
        assert row["error"] is None
        assert 0 < row["fraction_computed"] < 1 and row["psnr_db"] > 10 and 0 <= row["accuracy"] <= 1
    assert rows["bac-validated-4"]["fraction_computed"] == pytest.approx(rows["bac-shared-4"]["fraction_computed"])


def test_bac_validated_keeps_the_candidate_closest_to_the_uncached_output(result):
    choice = result["bac_validated"]["bac-validated-4"]
    errors = choice["relative_errors"]
    grid = DEFAULT_GRID
    assert len(errors) == len(grid["keep_first"]) * len(grid["objective"]) * len(grid["forecast"])
    assert candidate_name(choice["chosen"]) == min(errors, key=errors.get)
    assert len(set(errors.values())) > 1  # the candidates differ: the choice is not a formality


def test_bac_validated_runs_share_one_uncached_validation_run_and_choose_as_alone():
    model = build_transformer("wan")
    calibration_run = lambda m: sample(m, "wan", steps=10, seed=1)  # noqa: E731
    validations = []

    def validation_run(m):
        validations.append(1)
        return sample(m, "wan", steps=10, seed=2)

    args = argparse.Namespace(
        steps=10, thresholds=[], intervals=[], bac_fractions=[0.5, 0.3], only="bac-validated", no_peers=True
    )
    choices = {}
    runs = accelerations(args, model, calibration_run, validation_run, choices)
    assert [run.name for run in runs] == ["bac-validated-5", "bac-validated-3"]
    measured = sum(len(choice["relative_errors"]) for choice in choices.values())
    assert measured == 16 + 12  # at 3 updates, keep_first=0.3 (3 steps) leaves no room: those 4 are left out
    assert len(validations) == 1 + measured  # one uncached reference for both budgets, then one run per candidate
    features = record_features(model, calibration_run)
    for updates in (5, 3):
        alone = tune_schedule_from_features(model, features, validation_run, updates)  # its own reference run
        assert choices[f"bac-validated-{updates}"] == {"chosen": alone.options, "relative_errors": alone.distances}


def test_candidates_include_the_default_and_with_variants_their_taylor1_and_sub_block_versions():
    args = argparse.Namespace(
        steps=50, thresholds=[0.1], intervals=[4], bac_fractions=[], only=None, no_peers=True, variants=True
    )
    names = [run.name for run in accelerations(args, None, None)]
    assert names[0] == "default"  # enable_block_cache() without a config, measured as such
    for family in ("bwcache-0.1", "bwcache-model-0.1", "static-4"):
        assert {family, f"{family}-taylor1", f"{family}-sub", f"{family}-sub-taylor1"} <= set(names)
    args.variants = False
    assert "bwcache-model-0.1-taylor1" not in [run.name for run in accelerations(args, None, None)]


def test_limit_spreads_the_scored_labels_over_digits_and_motions():
    from diffusers_block.bench.quality import _subset
    from diffusers_block.eval.digits import balanced_clip_labels

    digits, motions = _subset(argparse.Namespace(limit=8), *balanced_clip_labels(1))
    assert len(digits) == len(motions) == 8
    assert len(set(digits.tolist())) == 8 and len(set(motions.tolist())) >= 5  # not the first 8 pairs (all digit 0)
    everything = balanced_clip_labels(1)
    assert all(a is b for a, b in zip(_subset(argparse.Namespace(limit=None), *everything), everything))


def test_repeats_zero_keeps_the_counted_run_and_times_nothing():

    import torch

    from diffusers_block.eval.harness import _measure

    model = build_transformer("wan")
    runs = []

    def generate(pipe):
        runs.append(1)
        return sample(pipe.transformer, "wan", steps=2, seed=0)

    output, seconds, work = _measure(type("P", (), {"transformer": model})(), generate, 0)
    assert len(runs) == 1 and seconds is None and work > 0  # untimed: None, as bench distill writes it
    assert torch.equal(output, sample(model, "wan", steps=2, seed=0).float().cpu())
