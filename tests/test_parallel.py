"""Block caching and sparse attention under diffusers' context parallelism, on 2 CPU processes (gloo).

One spawned pair of ranks runs every scenario (spawning costs more than the tiny model's runs) and returns its
outputs; each test checks one property of them against the same generation run single-process in the same worker.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from distributed import run

import diffusers_block as db
from diffusers_block.bench.architectures import ARCHITECTURES, build, conditioning
from diffusers_block.cache.bwcache import BWCacheConfig
from diffusers_block.cache.slot import CacheSlot
from diffusers_block.parallel import UnsupportedParallelismError, context_parallel, cpu_context_parallel

WORLD = 2
ARCH = ARCHITECTURES["tiny-wan"]  # 2 heads: one per rank under Ulysses
LATENT = (4, 4, 16, 16)  # 4 frames x 8 x 8 patches = 256 tokens, 16 blocks of 16
STEPS = 8
#: Different thresholds per head, so that a rank using the wrong head's threshold selects other blocks.
SPARSE = db.SparseAttentionConfig(
    threshold=0.5, head_thresholds=(0.3, 0.8), block_size=16, min_tokens=0, dense_steps=2, refresh_interval=2
)
BWCACHE = BWCacheConfig(threshold=0.15, warmup_steps=1, cooldown_steps=1, max_consecutive_reuse=2)


def _model(name: str = "tiny-wan") -> torch.nn.Module:
    return build(ARCHITECTURES[name], torch.device("cpu"), torch.float32, seed=0)


def _parallel(model: torch.nn.Module, **degrees) -> torch.nn.Module:
    from diffusers import ContextParallelConfig

    with cpu_context_parallel():
        model.enable_parallelism(config=ContextParallelConfig(**degrees))
    return model


def _denoise(model: torch.nn.Module, arch=ARCH, latent_shape=LATENT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, *latent_shape), generator=generator)
    text = conditioning(arch, torch.device("cpu"), torch.float32, seed=1)
    with torch.no_grad():
        for step in range(STEPS):
            t = torch.tensor([1000.0 * (1 - step / STEPS) * arch.timestep_scale])
            with db.cache_context(model, "cond", step_index=step, num_inference_steps=STEPS):
                velocity = model(hidden_states=latents, timestep=t, return_dict=False, **text)[0]
            latents = latents - velocity / STEPS
    return latents


def _runs(model: torch.nn.Module) -> dict:
    out = {"dense": _denoise(model)}
    db.enable_block_cache(model, BWCacheConfig(threshold=0.0))
    out["cached0"] = _denoise(model)
    db.enable_block_cache(model, BWCACHE)
    out["cached"] = _denoise(model)
    summary = db.block_cache_summary(model)
    out["computed"], out["indicator"] = summary.computed, summary.indicator
    db.disable_block_cache(model)
    db.enable_sparse_attention(model, SPARSE)
    out["sparse"] = _denoise(model)
    out["density"] = db.sparse_attention_summary(model).density  # (branch, step, layer, local heads)
    db.enable_block_cache(model, BWCACHE)
    out["sparse_cached"] = _denoise(model)
    db.disable_block_cache(model)
    db.disable_sparse_attention(model)
    schedule = db.calibrate_schedule(model, _denoise, updates=5)
    out["bac"] = dict(schedule.update_steps)
    db.enable_block_cache(model, schedule)
    out["static"] = _denoise(model)
    db.disable_block_cache(model)
    out["dense_after"] = _denoise(model)
    return out


def _decisions_with_diverging_indicators(layout) -> dict:
    """The BWCache policy alone: each rank's chunk changed by a different amount, so their own rates fall on both
    sides of the threshold; the summed indicator must give one decision on every rank."""
    policy = BWCacheConfig(threshold=0.1, warmup_steps=0, cooldown_steps=0).build(["block"])
    policy.parallel = layout
    slot = CacheSlot()
    slot.previous_step, slot.computed_step = 0, 1
    # rank 0: |change| 1 over |previous| 100 (rate 0.01); rank 1: 30 over 100 (0.3); whole sequence 31 / 200.
    slot.indicator = torch.tensor([1.0 if layout.rank == 0 else 30.0, 100.0])
    policy.observe(0, slot, 1, torch.zeros(1))
    local_rate = float(slot.indicator[0] / slot.indicator[1])
    decision = policy.should_compute(0, slot, 2, None)
    return {"local_rate": local_rate, "decision": decision, "global_rate": slot.indicator}


def _refusal(fn) -> str:
    try:
        fn()
    except UnsupportedParallelismError as error:
        return str(error)
    return "not refused"


def _scenarios(rank: int, world_size: int) -> dict:
    results = {"single": _runs(_model())}
    cp = _parallel(_model(), ulysses_degree=world_size)
    layout = context_parallel(cp)
    results["layout"] = (layout.ulysses_degree, layout.ring_degree, layout.rank, layout.world_size)
    results["cp"] = _runs(cp)
    # Cache enabled before enable_parallelism: the CP split hook then wraps the cache hook of blocks.0.
    early = _model()
    db.enable_block_cache(early, BWCACHE)
    _parallel(early, ulysses_degree=world_size)
    results["early"] = _denoise(early)
    results["early_computed"] = db.block_cache_summary(early).computed
    results["policy"] = _decisions_with_diverging_indicators(layout)
    ring = _parallel(_model(), ring_degree=world_size)
    results["ring_enable"] = _refusal(lambda: db.enable_sparse_attention(ring, SPARSE))
    late = _model()
    db.enable_sparse_attention(late, dataclasses.replace(SPARSE, dense_steps=0))
    _parallel(late, ring_degree=world_size)
    results["ring_forward"] = _refusal(lambda: _denoise(late))
    anything = _parallel(_model(), ulysses_degree=world_size, ulysses_anything=True)
    results["anything"] = _refusal(lambda: db.enable_sparse_attention(anything, SPARSE))
    results["flux"] = _flux_cached(world_size)
    return results


def _flux_cached(world_size: int) -> dict:
    """Flux under CP: text and image tokens both split, double and single blocks cached per chunk."""
    arch = ARCHITECTURES["tiny-flux"]
    denoise = functools.partial(_denoise, arch=arch, latent_shape=arch.latent_shape)
    out = {}
    for name, model in (("single", _model("tiny-flux")), ("cp", _parallel(_model("tiny-flux"), ulysses_degree=2))):
        out[name] = {"dense": denoise(model)}
        db.enable_block_cache(model, dataclasses.replace(BWCACHE, threshold=1.0))  # the tiny Flux moves a lot
        out[name]["cached"] = denoise(model)
        out[name]["computed"] = db.block_cache_summary(model).computed
        db.disable_block_cache(model)
        if name == "cp":
            out["joint"] = _refusal(lambda m=model: db.enable_sparse_attention(m, SPARSE))
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run(_scenarios, world_size=WORLD, timeout=600)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).norm() / b.norm()) < tol


@pytest.mark.slow
def test_layout_read_from_the_model(ranks):
    assert [r["layout"] for r in ranks] == [(WORLD, 1, 0, WORLD), (WORLD, 1, 1, WORLD)]


@pytest.mark.slow
def test_parallel_outputs_match_single_process(ranks):
    for r in ranks:
        cp, single = r["cp"], r["single"]
        assert _close(cp["dense"], single["dense"])
        # zero reuse: the cache computes everything, exactly the uncached parallel output
        assert torch.equal(cp["cached0"], cp["dense"])
        assert _close(cp["cached"], single["cached"])
        assert not _close(cp["cached"], cp["dense"], 1e-3)  # the cache did reuse something
        assert _close(cp["static"], single["static"])
        assert torch.equal(cp["dense_after"], cp["dense"])  # disabling restores the parallel outputs
    assert torch.equal(ranks[0]["cp"]["cached"], ranks[1]["cp"]["cached"])  # the gathered output, on both ranks


@pytest.mark.slow
def test_bwcache_decisions_agree_across_ranks_and_with_one_process(ranks):
    computed = [r["cp"]["computed"] for r in ranks]
    np.testing.assert_array_equal(computed[0], computed[1])
    np.testing.assert_array_equal(computed[0], ranks[0]["single"]["computed"])
    assert (computed[0] == 0).any()  # some units were reused
    # each rank's summary shows its own chunk's indicator, and they differ: agreement came from the reduction
    local = [np.nan_to_num(r["cp"]["indicator"]) for r in ranks]
    assert np.abs(local[0] - local[1]).max() > 1e-3
    np.testing.assert_array_equal(ranks[0]["early_computed"], computed[0])  # cache enabled before CP too
    assert _close(ranks[0]["early"], ranks[0]["single"]["cached"])


@pytest.mark.slow
def test_flux_caches_under_context_parallelism(ranks):
    for r in ranks:
        cp, single = r["flux"]["cp"], r["flux"]["single"]
        assert _close(cp["dense"], single["dense"])
        assert _close(cp["cached"], single["cached"])
        np.testing.assert_array_equal(cp["computed"], single["computed"])
        assert (cp["computed"] == 0).any() and not _close(cp["cached"], cp["dense"], 1e-4)


@pytest.mark.slow
def test_bwcache_decision_uses_the_summed_indicator(ranks):
    policy = [r["policy"] for r in ranks]
    assert policy[0]["local_rate"] < 0.1 < policy[1]["local_rate"]  # alone, rank 0 would reuse, rank 1 compute
    assert policy[0]["decision"] is policy[1]["decision"] is True  # whole sequence: 31 / 200 = 0.155 >= 0.1
    assert policy[0]["global_rate"] == pytest.approx(31 / 200) == policy[1]["global_rate"]


@pytest.mark.slow
def test_bac_calibrates_the_same_schedule_on_every_rank(ranks):
    assert ranks[0]["cp"]["bac"] == ranks[1]["cp"]["bac"] == ranks[0]["single"]["bac"]


@pytest.mark.slow
def test_sparse_attention_under_ulysses_matches_single_process(ranks):
    for rank, r in enumerate(ranks):
        cp, single = r["cp"], r["single"]
        assert not _close(single["sparse"], single["dense"], 1e-3)  # sparse attention dropped something
        assert _close(cp["sparse"], single["sparse"])
        assert _close(cp["sparse_cached"], single["sparse_cached"])
        # rank r holds head r after the all-to-all and selects exactly the single-process lists of that head
        assert cp["density"].shape[-1] == 1
        np.testing.assert_allclose(cp["density"][..., 0], single["density"][..., rank])
    assert not np.allclose(ranks[0]["cp"]["density"], ranks[1]["cp"]["density"], equal_nan=True)


@pytest.mark.slow
def test_unsupported_configurations_are_refused(ranks):
    for r in ranks:
        assert "ring attention" in r["ring_enable"] and "ring_degree=2" in r["ring_enable"]
        assert "ulysses_degree=N" in r["ring_enable"]  # says what to do
        assert "ring attention" in r["ring_forward"]  # enable_parallelism after enable_sparse_attention
        assert "ulysses_anything=True" in r["anything"] and "unevenly" in r["anything"]
        assert "text tokens" in r["flux"]["joint"] and "flux" in r["flux"]["joint"]
