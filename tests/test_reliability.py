"""Reliability: step counting at the edges, shape changes of every stream, clear errors, faults, threads, leaks."""

import pytest
import torch
from sampling import sample
from tiny_models import build_transformer, make_inputs, timestep_for

import diffusers_block as db

PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=2, cooldown_steps=1)


# ------------------------------------------------------------------------------------------------------------------
# Step counting and shape changes
# ------------------------------------------------------------------------------------------------------------------
def test_bare_loop_shape_change_starts_a_generation_at_step_0_once():
    """Without cache_context, the call whose new shape starts a generation is its step 0, and the next is step 1."""
    model = build_transformer("wan")
    db.enable_block_cache(model, PERMISSIVE)
    sample(model, "wan", steps=3, context=False, height=8, width=8)
    after_change = sample(model, "wan", steps=6, context=False, height=12, width=12)
    summary = db.block_cache_summary(model)
    assert summary.num_steps == 6
    assert summary.computed[0, :, 0].tolist() == [1, 1, 1, 0, 1, 0]
    db.enable_block_cache(model, PERMISSIVE)  # fresh hooks
    assert torch.equal(after_change, sample(model, "wan", steps=6, context=False, height=12, width=12))


def _text_inputs(family: str, text: int) -> dict:
    """One step's inputs with the prompt cut to ``text`` tokens (and Flux's text positions with it)."""
    inputs = make_inputs(family)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :text]
    if "txt_ids" in inputs:
        inputs["txt_ids"] = inputs["txt_ids"][:text]
    return inputs


@pytest.mark.parametrize("granularity", ["block", "sub_block"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_length_change_mid_generation_is_a_shape_error(family, granularity):
    """Two-stream blocks cache a text residual too: other text lengths are a shape change like any other."""
    model = build_transformer(family)
    db.enable_block_cache(model, db.StaticScheduleConfig(interval=2, warmup_steps=2, granularity=granularity))
    for step, text in enumerate([8, 8, 8, 5]):
        kwargs = {**_text_inputs(family, text), **timestep_for(family, 900.0 - 100 * step, 1)}
        with db.cache_context(model, "cond", step_index=step, num_inference_steps=6), torch.no_grad():
            if text == 8:
                model(**kwargs)
            else:
                with pytest.raises(db.ShapeChangedError, match=r"encoder_hidden_states \(1, 8, \d+\) to .*\(1, 5,"):
                    model(**kwargs)
