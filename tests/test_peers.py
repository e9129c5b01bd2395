"""The peers the quality benchmark compares against really engage on the models they are run on."""

from types import SimpleNamespace

import pytest
from tiny_models import build_transformer

from diffusers_block.bench import peers


@pytest.mark.parametrize("family", ["wan", "sd3"])
def test_taylorseer_hooks_every_attention_module(family):
    # diffusers' default patterns fullmatch "^blocks.*attn", which misses Wan's attn1 / attn2: the peer must not run
    # as a silent no-op there.
    pipe = SimpleNamespace(transformer=build_transformer(family))
    run = peers.taylorseer_cache(interval=2, warmup=1)
    run.enable(pipe)
    try:
        hooked = peers.hooked_modules(pipe.transformer, "taylorseer_cache")
        assert hooked and all(".attn" in name for name in hooked)
        if family == "wan":
            assert {name.rsplit(".", 1)[-1] for name in hooked} == {"attn1", "attn2"}
    finally:
        run.disable(pipe)
    assert not peers.hooked_modules(pipe.transformer, "taylorseer_cache")
