"""The benchmark CLI: real-size configurations match the published models, and `cache` runs end to end on CPU."""

import inspect
import json

import pytest
import torch

from diffusers_block.bench.__main__ import main
from diffusers_block.bench.architectures import ARCHITECTURES, num_parameters, num_tokens


@pytest.mark.parametrize(
    "name, parameters, tokens",
    [("wan2.1-1.3b", 1_418_996_800, 21 * 30 * 52), ("flux-dev", 11_901_408_320, 64 * 64)],
)
def test_real_size_architectures(name, parameters, tokens):
    arch = ARCHITECTURES[name]
    assert set(arch.config) <= set(inspect.signature(arch.cls).parameters)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = arch.cls(**arch.config)
    assert num_parameters(model) == parameters
    assert num_tokens(arch) == tokens


def test_cache_benchmark_tiny_wan(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model gains nothing from threads, and OpenMP stalls on a busy CPU
    try:
        main(
            [
                "cache",
                "--model",
                "tiny-wan",
                "--device",
                "cpu",
                "--steps",
                "10",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)

    [path] = tmp_path.glob("cache-tiny-wan-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["command"].startswith("python -m diffusers_block.bench cache --model tiny-wan")
    assert result["environment"]["torch"] == torch.__version__
    runs = result["models"]["tiny-wan"]["policies"]
    assert set(runs) == {"dense", "static-all", "bwcache-0", "static-40", "bwcache-0.05", "bwcache-0.1"}
    assert runs["static-all"]["rel_l2"] == 0.0  # hooks that compute everything change nothing
    assert runs["bwcache-0"]["rel_l2"] == 0.0
    assert 0.3 <= runs["static-40"]["fraction_computed"] <= 0.5
    assert min(runs["bwcache-0.05"]["fraction_computed"], runs["bwcache-0.1"]["fraction_computed"]) < 1.0
    for run in runs.values():
        assert run["ms_per_schedule"] > 0 and run["speedup"] > 0 and run["peak_memory_gib"] is None


def test_environment_names_the_commit_given_by_the_runner(monkeypatch):
    """A tree copied to a GPU runner may carry stale git metadata: DIFFUSERS_BLOCK_COMMIT names the commit instead."""
    from diffusers_block.bench import report

    monkeypatch.setenv("DIFFUSERS_BLOCK_COMMIT", "0123abc")
    assert report.environment(torch.device("cpu"))["git"] == "0123abc"
    monkeypatch.delenv("DIFFUSERS_BLOCK_COMMIT")
    assert report.environment(torch.device("cpu"))["git"] != "0123abc"


@pytest.fixture
def dirty_tree(monkeypatch):
    from diffusers_block.bench import report

    monkeypatch.setattr(report, "_describe", lambda: "0123abc-dirty")
    monkeypatch.delenv(report.ALLOW_DIRTY, raising=False)
    monkeypatch.delenv("DIFFUSERS_BLOCK_COMMIT", raising=False)
    return report


def test_a_dirty_tree_is_refused_before_the_benchmark_runs(dirty_tree, tmp_path):
    with pytest.raises(dirty_tree.DirtyTreeError, match="--allow-dirty"):
        main(["cache", "--model", "tiny-wan", "--device", "cpu", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
    with pytest.raises(dirty_tree.DirtyTreeError):
        dirty_tree.environment(torch.device("cpu"))  # labs write through this too


def test_an_allowed_dirty_tree_is_flagged_loudly(dirty_tree, monkeypatch, capsys):
    env = dirty_tree.environment(torch.device("cpu"), allow_dirty=True)
    assert env["git"] == "0123abc-dirty" and env["dirty"] is True
    assert "WARNING: benchmarking a dirty tree" in capsys.readouterr().err
    monkeypatch.setenv(dirty_tree.ALLOW_DIRTY, "1")
    assert dirty_tree.environment(torch.device("cpu"))["dirty"] is True


def test_the_runner_commit_vouches_for_a_stale_copy(dirty_tree, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_BLOCK_COMMIT", "4567def")
    env = dirty_tree.environment(torch.device("cpu"))
    assert env["git"] == "4567def" and env["dirty"] is False


def test_every_committed_result_names_a_clean_commit_or_is_listed_in_the_changelog():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    changelog = (root / "CHANGELOG.md").read_text()
    for path in sorted((root / "benchmarks").rglob("*.json")):
        commit = str(json.loads(path.read_text()).get("environment", {}).get("git"))
        if commit.endswith("-dirty"):
            assert path.name in changelog, f"{path.name} records {commit}: rerun it clean, or document it"
