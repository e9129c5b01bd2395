"""Block caching on every supported family, on tiny random-weight transformers driven by a hand-written loop."""

import copy

import numpy as np
import pytest
import torch
from sampling import relative_l2, sample
from tiny_models import FAMILIES, build_transformer, build_unet

import diffusers_block as db
from diffusers_block.eval.harness import BlockWorkCounter

PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=2, cooldown_steps=1)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build_transformer(request.param)


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "family_model" in request.fixturenames:
        db.disable_block_cache(request.getfixturevalue("family_model")[1])


def test_no_reuse_is_identical_to_no_cache(family_model):
    family, model = family_model
    reference = sample(model, family)
    for config in (
        db.BWCacheConfig(threshold=0.0),
        db.StaticScheduleConfig(interval=1),
        db.StaticScheduleConfig(interval=1, granularity="sub_block"),
        db.BWCacheConfig(threshold=0.0, granularity="sub_block", forecast="taylor1"),
    ):
        db.enable_block_cache(model, config)
        assert torch.equal(sample(model, family), reference), config
        assert db.block_cache_summary(model).fraction_saved == 0.0


@pytest.mark.parametrize("granularity", ["block", "sub_block"])
def test_permissive_policy_skips_work_and_stays_close(family_model, granularity):
    family, model = family_model
    counter = BlockWorkCounter(model)
    reference = sample(model, family)
    dense_calls = counter.calls
    db.enable_block_cache(
        model, db.StaticScheduleConfig(interval=2, warmup_steps=2, cooldown_steps=1, granularity=granularity)
    )
    counter.calls = 0
    cached = sample(model, family)
    counter.remove()
    summary = db.block_cache_summary(model)
    # 8 steps: computes steps 0, 1, 2, 4, 6, 7 -> 6/8 of the unit evaluations.
    assert summary.fraction_computed == pytest.approx(6 / 8)
    assert counter.calls < 0.9 * dense_calls  # real work was skipped, not just reported
    assert not torch.equal(cached, reference)
    assert relative_l2(cached, reference) < 0.15


def test_bwcache_skips_with_a_permissive_threshold(family_model):
    family, model = family_model
    reference = sample(model, family, steps=12)
    db.enable_block_cache(
        model, db.BWCacheConfig(threshold=5.0, max_consecutive_reuse=1, warmup_steps=2, cooldown_steps=1)
    )
    cached = sample(model, family, steps=12)
    summary = db.block_cache_summary(model)
    # Reuse every other step after the 2 computed warm-up steps and a second computed step for the rate.
    assert 0.4 < summary.fraction_computed < 0.8
    assert np.isfinite(summary.indicator[summary.computed == 1][len(summary.unit_names) :]).all()
    assert relative_l2(cached, reference) < 0.25


def test_disable_restores_bit_identical_outputs(family_model):
    family, model = family_model
    reference = sample(model, family)
    db.enable_block_cache(model, PERMISSIVE)
    assert not torch.equal(sample(model, family), reference)
    db.disable_block_cache(model)
    assert torch.equal(sample(model, family), reference)
    assert not hasattr(model, "_diffusers_block_cache")


def test_generations_do_not_leak_into_each_other(family_model):
    family, model = family_model
    db.enable_block_cache(model, PERMISSIVE)
    first = sample(model, family, seed=0)
    other = sample(model, family, seed=3)
    again = sample(model, family, seed=0)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_cfg_branches_never_share_a_cache(family_model):
    family, model = family_model
    copies = [copy.deepcopy(model) for _ in range(2)]
    db.enable_block_cache(model, PERMISSIVE)
    shared_model = sample(model, family, branches=("cond", "uncond"))
    assert db.block_cache_summary(model).branches == ["cond", "uncond"]
    # The same loop with each branch on its own copy of the model (so nothing can be shared) gives the same result.
    for each in copies:
        db.enable_block_cache(each, PERMISSIVE)
    assert torch.equal(sample(copies, family, branches=("cond", "uncond")), shared_model)
    db.disable_block_cache(model)
    dense = sample(model, family, branches=("cond", "uncond"))
    assert relative_l2(shared_model, dense) < 0.3


def test_changed_shape_between_generations(family_model):
    family, model = family_model
    small = {"height": 8, "width": 8} if family != "ltx" else {}
    large = {"height": 12, "width": 12}
    db.enable_block_cache(model, PERMISSIVE)
    sample(model, family, **small)
    after_change = sample(model, family, batch_size=2, **large)
    db.enable_block_cache(model, PERMISSIVE)  # fresh hooks
    fresh = sample(model, family, batch_size=2, **large)
    assert torch.equal(after_change, fresh)


def test_shape_change_mid_generation_is_a_clear_error():
    model = build_transformer("wan")
    db.enable_block_cache(model, PERMISSIVE)
    from tiny_models import make_inputs, timestep_for

    for step, shape in enumerate([{"height": 8, "width": 8}, {"height": 12, "width": 12}]):
        kwargs = {**make_inputs("wan", **shape), **timestep_for("wan", 900.0 - step, 1)}
        with db.cache_context(model, "cond", step_index=step, num_inference_steps=4), torch.no_grad():
            if step == 0:
                model(**kwargs)
            else:
                with pytest.raises(db.ShapeChangedError, match="changed shape"):
                    model(**kwargs)


def test_forecast_taylor1_changes_reused_outputs():
    model = build_transformer("wan")
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=3, warmup_steps=2))
    plain = sample(model, "wan", steps=10)
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=3, warmup_steps=2, forecast="taylor1"))
    forecast = sample(model, "wan", steps=10)
    assert not torch.equal(plain, forecast)
    assert torch.isfinite(forecast).all()


def test_without_context_every_call_is_a_step():
    model = build_transformer("wan")
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=2))
    sample(model, "wan", steps=6, context=False)
    summary = db.block_cache_summary(model)
    assert summary.num_steps == 6 and summary.branches == [0]
    assert summary.computed[0, :, 0].tolist() == [1, 0, 1, 0, 1, 0]
    db.reset_block_cache(model)
    assert db.block_cache_summary(model).num_steps == 0


def test_summary_heatmap(tmp_path):
    model = build_transformer("flux")
    db.enable_block_cache(model, db.BWCacheConfig(threshold=2.0))
    sample(model, "flux", steps=10)
    summary = db.block_cache_summary(model)
    assert summary.unit_names[0] == "transformer_blocks.0" and summary.unit_names[-1] == "single_transformer_blocks.1"
    assert summary.computed.shape == (1, 10, 4)
    assert 0 < summary.fraction_saved < 1
    assert "saved" in str(summary) and summary.to_dict()["fraction_saved"] == summary.fraction_saved
    path = summary.plot(tmp_path / "heatmap.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_static_schedule_explicit_steps_and_json(tmp_path):
    model = build_transformer("wan")
    config = db.StaticScheduleConfig(update_steps={"blocks.1": [0, 3]}, interval=1)
    config.save(tmp_path / "schedule.json")
    loaded = db.StaticScheduleConfig.load(tmp_path / "schedule.json")
    assert loaded == config
    db.enable_block_cache(model, loaded)
    sample(model, "wan", steps=6)
    computed = db.block_cache_summary(model).computed[0]
    assert computed[:, 1].tolist() == [1, 0, 0, 1, 0, 0]
    assert computed[:, 0].tolist() == [1] * 6


def test_torch_compile_static_schedule_has_no_graph_breaks():
    model = build_transformer("wan")
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=2, warmup_steps=1, cooldown_steps=1))
    eager = sample(model, "wan", steps=6)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    assert torch.equal(sample(compiled, "wan", steps=6), eager)
    assert torch.equal(sample(compiled, "wan", steps=6), eager)
    assert db.block_cache_summary(model).fraction_computed == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: db.BWCacheConfig(threshold=-0.1), "BWCacheConfig.threshold must be a number in"),
        (lambda: db.BWCacheConfig(max_consecutive_reuse=1.5), "max_consecutive_reuse must be an integer"),
        (lambda: db.BWCacheConfig(warmup_steps=-1), "warmup_steps"),
        (lambda: db.BWCacheConfig(granularity="layer"), "granularity must be one of 'block', 'sub_block'"),
        (lambda: db.BWCacheConfig(forecast="taylor9"), "forecast must be one of"),
        (lambda: db.StaticScheduleConfig(interval=0), "StaticScheduleConfig.interval must be an integer >= 1"),
        (lambda: db.StaticScheduleConfig(update_steps={"blocks.0": [1, 2]}), "containing 0"),
    ],
)
def test_bad_configs_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedule_for_units_the_model_lacks():
    with pytest.raises(ValueError, match="does not have"):
        db.enable_block_cache(build_transformer("wan"), db.StaticScheduleConfig(update_steps={"blocks.99": [0]}))


def test_unsupported_models_get_a_clear_error():

    unet = build_unet()
    for model in (unet, torch.nn.Linear(2, 2)):
        with pytest.raises(db.UnsupportedModelError, match=rf"{type(model).__name__}.*Supported families: dit, pixart"):
            db.enable_block_cache(model)
    with pytest.raises(db.UnsupportedModelError, match="expects a diffusers pipeline or transformer, got str"):
        db.enable_block_cache("wan")
    with pytest.raises(TypeError, match="BWCacheConfig, StaticScheduleConfig"):
        db.enable_block_cache(build_transformer("wan"), {"threshold": 0.1})


def test_unlisted_family_works_through_the_generic_adapter():
    """CogView4 is not in the adapter table; its blocks are found through diffusers' TransformerBlockRegistry."""
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    model = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=16,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=8,
        sample_size=8,
        rope_axes_dim=(4, 4),
    ).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    kwargs = {
        "encoder_hidden_states": torch.randn(1, 6, 16),
        "original_size": torch.tensor([[64.0, 64.0]]),
        "target_size": torch.tensor([[64.0, 64.0]]),
        "crop_coords": torch.tensor([[0.0, 0.0]]),
        "return_dict": False,
    }

    def run():
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for step in range(6):
                with db.cache_context(model, "cond", step_index=step, num_inference_steps=6):
                    out = model(hidden_states=latents, timestep=torch.tensor([900 - 150 * step]), **kwargs)[0]
                latents = latents - out / 6
        return latents

    reference = run()
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=2))
    cached = run()
    summary = db.block_cache_summary(model)
    assert summary.unit_names == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert summary.fraction_computed == pytest.approx(0.5)
    assert not torch.equal(cached, reference) and relative_l2(cached, reference) < 0.5
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=1, granularity="sub_block"))
    assert torch.equal(run(), reference)
    db.disable_block_cache(model)


def test_bwcache_model_scope_skips_all_units_together():
    model = build_transformer("flux")
    db.enable_block_cache(model, db.BWCacheConfig(threshold=5.0, scope="model", max_consecutive_reuse=1))
    sample(model, "flux", steps=12)
    computed = db.block_cache_summary(model).computed[0]  # (steps, units)
    assert (computed == computed[:, :1]).all()  # every unit follows the first one
    assert 0 < (computed[:, 0] == 0).sum() < 12
    db.disable_block_cache(model)
    with pytest.raises(ValueError, match="scope must be one of 'block', 'model'"):
        db.BWCacheConfig(scope="layer")
