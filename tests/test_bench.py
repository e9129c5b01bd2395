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
