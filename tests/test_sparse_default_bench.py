"""``--config default`` of the sparse-attention benchmarks: the library default ``SparseAttentionConfig()`` reaches
the hooks unchanged and the JSON says so (CPU, toy sizes: plumbing only)."""

import argparse
import dataclasses
import json

import pytest
import torch

from diffusers_block import SparseAttentionConfig
from diffusers_block.attention import apply as attention_apply
from diffusers_block.bench import attention, attention_quality, sparse_config
from diffusers_block.bench.__main__ import main


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _spy(monkeypatch):
    """Record the config each hooked attention module got, and the config given to enable_block_cache."""
    hooked, caches = [], []
    enable_sparse, enable_cache = attention.enable_sparse_attention, attention.enable_block_cache

    def sparse(target, config=None):
        enable_sparse(target, config)
        attached = getattr(target, attention_apply._ATTR)
        hooked.append({hook.controller.config for part in attached.parts.values() for hook in part.hooks})
        return target

    def cache(target, config=None):
        caches.append(config)
        return enable_cache(target, config)

    monkeypatch.setattr(attention, "enable_sparse_attention", sparse)
    monkeypatch.setattr(attention, "enable_block_cache", cache)
    return hooked, caches


E2E = ["attention", "--parts", "e2e", "--device", "cpu", "--model", "tiny-wan", "--steps", "3", "--repeats", "1"]


def test_e2e_runs_exactly_the_default_config_and_cache(tmp_path, monkeypatch, one_thread):
    hooked, caches = _spy(monkeypatch)
    # The sparse options of the command line are ignored under --config default.
    payload = main(E2E + ["--config", "default", "--threshold", "0.3", "--e2e-density", "0.1", "--out", str(tmp_path)])
    default = SparseAttentionConfig()
    # warm-up + one timed schedule, for "sparse" and "sparse+cache"; the rest are the one-forward timings
    assert sum(configs == {default} for configs in hooked) == 4
    assert all(len(configs) == 1 for configs in hooked)
    others = [next(iter(configs)) for configs in hooked if configs != {default}]
    assert others and all(dataclasses.replace(c, dense_steps=5, refresh_interval=5, fuse_rotary=True) == default
                          for c in others)  # fmt: skip
    assert caches and all(config is None for config in caches)  # enable_block_cache() with no config: its default
    [path] = tmp_path.glob("attention-cpu-*.json")
    e2e = json.loads(path.read_text())["e2e"]
    assert e2e == json.loads(json.dumps(payload["e2e"]))
    assert e2e["sparse_config"] == {"repr": repr(default), "is_default": True, "differs_from_default": {}}
    assert e2e["cache_config"]["is_default"] is True and "scope='model'" in e2e["cache_config"]["repr"]
    assert set(e2e["runs"]) == {"dense", "sparse", "sparse+cache", "cache"}
    # tiny-wan has 48 tokens, under the default's min_tokens: the default runs dense there
    assert e2e["runs"]["sparse"]["sparse_density"] == 1.0 and e2e["runs"]["sparse"]["rel_l2"] == 0.0
    assert 0.0 < e2e["runs"]["cache"]["cache_fraction_computed"] <= 1.0


def test_e2e_default_with_overrides_runs_sparse_and_is_not_flagged_default(tmp_path, monkeypatch, one_thread):
    hooked, _ = _spy(monkeypatch)
    # tiny-wan's random attention is diffuse: threshold 0.9 keeps all of its 6 blocks, 0.3 does not
    overrides = ["min_tokens=0", "block_size=8", "dense_steps=1", "refresh_interval=2", "threshold=0.3"]
    payload = main(E2E + ["--config", "default", "--default-override", *overrides, "--out", str(tmp_path)])
    expected = SparseAttentionConfig(min_tokens=0, block_size=8, dense_steps=1, refresh_interval=2, threshold=0.3)
    assert sum(configs == {expected} for configs in hooked) == 4
    e2e = payload["e2e"]
    assert e2e["sparse_config"]["is_default"] is False
    assert e2e["sparse_config"]["differs_from_default"] == {
        "min_tokens": 0,
        "block_size": 8,
        "dense_steps": 1,
        "refresh_interval": 2,
        "threshold": 0.3,
    }
    assert 0.0 < e2e["runs"]["sparse"]["sparse_density"] < 1.0 and e2e["runs"]["sparse"]["rel_l2"] > 0.0


def test_overrides_are_checked_before_the_run():
    assert sparse_config.parse_override("approximation=cached") == ("approximation", "cached")
    assert sparse_config.parse_override("max_blocks=None") == ("max_blocks", None)
    assert sparse_config.parse_override("tile=(1, 4, 4)") == ("tile", (1, 4, 4))
    with pytest.raises(argparse.ArgumentTypeError, match="min_tokens"):
        sparse_config.parse_override("min_token=0")  # a misspelt field names the real ones
    with pytest.raises(SystemExit, match="--config default"):
        sparse_config.default_config(argparse.Namespace(config="options", default_override=[("min_tokens", 0)]))


def test_quality_default_config_is_the_library_default():
    args = argparse.Namespace(config="default", default_override=[])
    assert attention_quality._configs(args) == [SparseAttentionConfig()]
    args.default_override = [("min_tokens", 0)]
    assert attention_quality._configs(args) == [SparseAttentionConfig(min_tokens=0)]


def test_quality_bench_records_the_default_config(tmp_path, one_thread):
    overrides = ["min_tokens=0", "block_size=32", "dense_steps=1", "refresh_interval=1"]
    payload = main(
        ["attention-quality", "--device", "cpu", "--clips", "1", "--steps", "3", "--config", "default"]
        + ["--default-override", *overrides, "--out", str(tmp_path)]
    )
    [row] = payload["results"]
    assert row["config"]["repr"] == repr(
        SparseAttentionConfig(min_tokens=0, block_size=32, dense_steps=1, refresh_interval=1)
    )
    assert row["config"]["is_default"] is False and row["threshold"] == 0.9 and row["refresh"] == 1
    assert row["sparse_calls"] > 0 and row["sparse_density"] < 1.0 and row["psnr_db"] is not None
    assert row["attention_error_mean"] is None  # not measured: that would change the config
    written = json.loads(next(tmp_path.glob("attention-quality-*.json")).read_text())
    assert written["results"][0]["config"] == row["config"]
