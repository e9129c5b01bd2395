"""Reliability: step counting at the edges, shape changes of every stream, clear errors, faults, threads, leaks."""

import gc
import importlib
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from sampling import sample
from tiny_models import build_transformer, make_inputs, timestep_for
from tiny_pipelines import build_pipeline, call_kwargs

import diffusers_block as db
from diffusers_block.attention import layout
from diffusers_block.models import resolve_adapter

PERMISSIVE = db.StaticScheduleConfig(interval=2, warmup_steps=2, cooldown_steps=1)


def generate(pipe, name: str = "sd3", **pipeline_kwargs) -> torch.Tensor:
    """One seeded generation of a tiny pipeline (6 steps, CFG): its latents."""
    return pipe(**call_kwargs(name), **pipeline_kwargs)[0]


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


def test_bare_loop_shape_change_starts_a_generation_for_sparse_attention_too():
    """Its first steps are dense again, as in a fresh run, instead of going on counting from the last generation."""
    config = db.SparseAttentionConfig(min_tokens=0, block_size=4, dense_steps=2, refresh_interval=2, threshold=0.5)
    model = build_transformer("wan")
    db.enable_sparse_attention(model, config)
    sample(model, "wan", steps=3, context=False, height=8, width=8)
    after_change = sample(model, "wan", steps=4, context=False, height=12, width=12)
    summary = db.sparse_attention_summary(model)
    assert summary.num_steps == 4 and summary.mode[0, :, 0].tolist() == [0, 0, 1, 2]  # dense, dense, select, reuse
    db.enable_sparse_attention(model, config)  # fresh hooks
    assert torch.equal(after_change, sample(model, "wan", steps=4, context=False, height=12, width=12))


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


# ------------------------------------------------------------------------------------------------------------------
# Config validation (diffusers_block.validation, shared by every config)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: db.StaticScheduleConfig(update_steps={"blocks.0": 0}), TypeError, r"update_steps\['blocks.0'\] must"),
        (lambda: db.StaticScheduleConfig(update_steps={"blocks.0": "03"}), TypeError, "a list of integer steps"),
        (lambda: db.StaticScheduleConfig(update_steps={"blocks.0": [0, "3"]}), TypeError, r"\[1\] must be an int"),
        (lambda: db.StaticScheduleConfig(update_steps={"blocks.0": [0, -2]}), ValueError, r"\[1\] must be an int"),
        (lambda: db.StaticScheduleConfig(update_steps=[0, 2]), TypeError, "must map unit names to lists of steps"),
        (lambda: db.StaticScheduleConfig(interval=True), TypeError, "interval must be an integer >= 1, got True"),
        (lambda: db.BWCacheConfig(threshold="0.1"), TypeError, r"threshold must be a number in \[0.0, 10.0\]"),
        (lambda: db.BWCacheConfig(threshold=float("nan")), ValueError, "threshold must be a number"),
        (lambda: db.BWCacheConfig(warmup_steps=2.0), TypeError, "warmup_steps must be an integer"),
        (lambda: db.SparseAttentionConfig(threshold="0.5"), TypeError, r"threshold must be a number in \(0, 1\]"),
        (lambda: db.SparseAttentionConfig(dense_steps=True), TypeError, "dense_steps must be an integer >= 0"),
        (lambda: db.SparseAttentionConfig(head_thresholds="0.5"), TypeError, "head_thresholds must be a tuple"),
        (lambda: db.SparseAttentionConfig(head_thresholds=()), ValueError, "head_thresholds must be a non-empty"),
        (lambda: db.SparseAttentionConfig(block_size=64.0), TypeError, "block_size must be a power of two"),
        (lambda: db.SparseAttentionConfig(tile=(2, 8, "8")), TypeError, r"tile\[2\] must be an integer >= 1"),
        (lambda: db.SparseAttentionConfig(reorder=1), TypeError, "reorder must be True or False, got 1 .int."),
        (lambda: db.SparseAttentionConfig(fuse_rotary="no"), TypeError, "fuse_rotary must be True or False"),
        (lambda: db.SparseAttentionConfig(refresh_schedule=((0.0, 2.5),)), TypeError, r"\[0\]\[1\] must be an int"),
        (lambda: db.SparseAttentionConfig(stride=32, scoring="antidiagonal", block_size=16), ValueError, "stride"),
    ],
)
def test_bad_config_values_name_field_value_and_range(make, error, match):
    """A TypeError from inside Python, or a silently accepted bool or string, becomes an error naming the field."""
    with pytest.raises(error, match=match) as raised:
        make()
    assert isinstance(raised.value, ValueError)  # the README's promise: every bad config value is a ValueError


def test_numpy_scalars_are_numbers_and_come_out_as_python_values(tmp_path):
    """Values taken from numpy (calibration results, sweeps) are accepted like Python numbers, and stored as them."""
    config = db.BWCacheConfig(threshold=np.float32(0.25), max_consecutive_reuse=np.int64(2), warmup_steps=np.int32(1))
    assert config == db.BWCacheConfig(threshold=0.25, max_consecutive_reuse=2, warmup_steps=1)
    assert type(config.threshold) is float and type(config.max_consecutive_reuse) is int
    schedule = db.StaticScheduleConfig(update_steps={"blocks.0": np.array([0, 3])}, interval=np.int64(2))
    schedule.save(tmp_path / "schedule.json")  # plain ints: JSON-serialisable
    assert db.StaticScheduleConfig.load(tmp_path / "schedule.json") == schedule
    sparse = db.SparseAttentionConfig(
        threshold=np.float32(0.5), head_thresholds=np.array([0.5, 0.75]), dense_steps=np.int64(1), reorder=np.bool_(1)
    )
    assert sparse.threshold == 0.5 and sparse.head_thresholds == (0.5, 0.75) and sparse.reorder is True
    assert sparse == db.SparseAttentionConfig(threshold=0.5, head_thresholds=(0.5, 0.75), dense_steps=1)


# ------------------------------------------------------------------------------------------------------------------
# Enabling on a transformer and on its pipeline
# ------------------------------------------------------------------------------------------------------------------
FEATURES = {
    "block cache": (db.enable_block_cache, db.disable_block_cache, "block caching", PERMISSIVE),
    "sparse attention": (
        db.enable_sparse_attention,
        db.disable_sparse_attention,
        "sparse attention",
        db.SparseAttentionConfig(min_tokens=0, block_size=4, dense_steps=1),
    ),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_enabling_on_transformer_and_pipeline_says_who_has_it(feature):
    """Instead of diffusers' "Hook ... already exists": who has the feature, and the call that resolves it."""
    enable, disable, words, config = FEATURES[feature]
    pipe = build_pipeline("sd3")
    enable(pipe, config)
    with pytest.raises(
        RuntimeError,
        match=f"StableDiffusion3Pipeline already has {words} enabled on this SD3Tr.*"
        rf"call pipe.{disable.__name__}\(\) first",
    ):
        enable(pipe.transformer, config)
    reference = generate(pipe)  # the pipeline's feature is untouched by the refused call
    disable(pipe)
    enable(pipe.transformer, config)
    generate(pipe)  # on the transformer alone (without the pipeline's scheduler it counts steps by calls)
    with pytest.raises(
        RuntimeError,
        match=rf"already has {words} enabled on the transformer itself.*"
        rf"diffusers_block.{disable.__name__}\(transformer\) first",
    ):
        enable(pipe, config)
    disable(pipe.transformer)
    enable(pipe, config)
    assert torch.equal(generate(pipe), reference)
    disable(pipe)


# ------------------------------------------------------------------------------------------------------------------
# Kernel fast paths: a failure turns one path off on one device, with one warning giving the cause
# ------------------------------------------------------------------------------------------------------------------
def test_fast_path_failure_is_per_device_warned_once_and_narrow():
    from triton.compiler.errors import CompilationError

    bsa = importlib.import_module("diffusers_block.kernels.block_sparse_attention")  # the package exports a function
    hopper = importlib.import_module("diffusers_block.kernels.block_sparse_attention_hopper")
    from diffusers_block.kernels.runtime import FastPath

    assert isinstance(bsa.TMA_PATH, FastPath) and isinstance(hopper.FAST_PATH, FastPath)  # what the launcher uses
    path = FastPath("the test kernel")
    ran = []

    def broken():
        raise RuntimeError("Triton Error [CUDA]: invalid argument")

    with pytest.warns(RuntimeWarning, match=r"the test kernel disabled on cuda:0 .*RuntimeError: Triton Error"):
        assert not path.run("cuda:0", broken)
    assert not path.available("cuda:0") and path.available("cuda:1")  # the other GPU keeps its fast path
    assert path.run("cuda:1", lambda: ran.append(1)) and ran == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure on the same device warns no more
        path.fail("cuda:0", CompilationError("", None, "second failure"))
    assert list(path.failures) == ["cuda:0"] and "RuntimeError" in path.failures["cuda:0"]
    for not_a_kernel_failure in (ValueError("bad block lists"), torch.OutOfMemoryError("CUDA out of memory")):

        def failing(error=not_a_kernel_failure):
            raise error

        with pytest.raises(type(not_a_kernel_failure)):
            path.run("cuda:1", failing)
    assert path.available("cuda:1")  # bad input and OOM are the caller's to see, not a reason to give up a kernel
    path.reset()
    assert path.available("cuda:0")


# ------------------------------------------------------------------------------------------------------------------
# torch.compile: summaries stay complete without fullgraph; fullgraph=True is refused with a message
# ------------------------------------------------------------------------------------------------------------------
SPARSE = db.SparseAttentionConfig(min_tokens=0, block_size=4, dense_steps=1, refresh_interval=2, threshold=0.5)


def test_compiled_bwcache_summary_matches_eager():
    model = build_transformer("wan")
    db.enable_block_cache(model, db.BWCacheConfig(threshold=2.0))
    eager, eager_summary = sample(model, "wan", steps=6), db.block_cache_summary(model)
    assert 0 < eager_summary.fraction_saved < 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(sample(compiled, "wan", steps=6), eager)
    summary = db.block_cache_summary(model)
    np.testing.assert_array_equal(summary.computed, eager_summary.computed)
    np.testing.assert_allclose(summary.indicator, eager_summary.indicator, rtol=1e-6)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="BWCache.*Compile without fullgraph=True, or use Static"):
        sample(torch.compile(model, backend="eager", fullgraph=True), "wan", steps=2)
    torch._dynamo.reset()


def test_compiled_sparse_attention_summary_matches_eager():
    model = build_transformer("wan")
    db.enable_sparse_attention(model, SPARSE)
    eager, eager_summary = sample(model, "wan", steps=4), db.sparse_attention_summary(model)
    assert eager_summary.sparse_density < 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(sample(compiled, "wan", steps=4), eager)
    summary = db.sparse_attention_summary(model)
    np.testing.assert_array_equal(summary.mode, eager_summary.mode)
    np.testing.assert_array_equal(summary.density, eager_summary.density)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="sparse attention .* cannot be part of a fullgraph=True"):
        sample(torch.compile(model, backend="eager", fullgraph=True), "wan", steps=2)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------------
# Faults, threads, memory: for every cache policy, with sparse attention on too
# ------------------------------------------------------------------------------------------------------------------
def _unit_names(transformer) -> list[str]:
    return [ref.name for ref in resolve_adapter(transformer).blocks]


#: Every policy (and the options that change what a slot holds), as config makers taking the transformer.
POLICIES = {
    "bwcache": lambda model: db.BWCacheConfig(threshold=2.0, warmup_steps=1),
    "bwcache-model-scope": lambda model: db.BWCacheConfig(threshold=2.0, warmup_steps=1, scope="model"),
    "static-rule": lambda model: PERMISSIVE,
    "static-steps-taylor1": lambda model: db.StaticScheduleConfig(
        update_steps={name: [0, 1, 3] for name in _unit_names(model)}, forecast="taylor1"
    ),
    "static-sub-block": lambda model: db.StaticScheduleConfig(interval=2, warmup_steps=1, granularity="sub_block"),
}
#: One pipeline driven by its scheduler (batched CFG), one that sets diffusers' cache context (cond / uncond calls).
FAULT_PIPELINES = ("sd3", "wan")


def _enable_both(pipe, policy: str):
    pipe.enable_block_cache(POLICIES[policy](pipe.transformer))
    pipe.enable_sparse_attention(SPARSE)
    return pipe


def _summaries(pipe) -> tuple:
    cache, sparse = pipe.block_cache_summary(), pipe.sparse_attention_summary()
    return cache.computed.tolist(), sparse.mode.tolist(), np.nan_to_num(sparse.density, nan=-1).tolist()


def _assert_both_at_work(pipe) -> None:
    """Units were reused and attention ran sparse: state that a fault, a thread or a leak could corrupt exists."""
    assert pipe.block_cache_summary().fraction_saved > 0
    assert pipe.sparse_attention_summary().sparse_density < 1


class _Fault(Exception):
    pass


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FAULT_PIPELINES)
def test_generation_interrupted_by_an_exception_leaves_the_next_one_clean(name, policy):
    reference_pipe = _enable_both(build_pipeline(name), policy)
    reference, reference_summaries = generate(reference_pipe, name), _summaries(reference_pipe)
    _assert_both_at_work(reference_pipe)
    pipe = _enable_both(build_pipeline(name), policy)
    blocks = resolve_adapter(pipe.transformer).blocks
    calls = iter(range(1, 1 << 30))

    def fail_mid_generation(module, args):  # block 1, at the 4th transformer call: mid-step, mid-generation
        if next(calls) == 4:
            raise _Fault("injected failure")

    handle = blocks[1].module.register_forward_pre_hook(fail_mid_generation)
    with pytest.raises(_Fault):
        generate(pipe, name)
    handle.remove()
    assert torch.equal(generate(pipe, name), reference)
    assert _summaries(pipe) == reference_summaries


@pytest.mark.parametrize("policy", POLICIES)
def test_pipelines_in_threads_share_no_state(policy):
    """Several pipelines with block cache and sparse attention, generating at the same time in threads, give what
    each gives alone (their trackers, caches, block lists and records are their own)."""
    names = ("sd3", "wan", "sd3")
    pipes = [_enable_both(build_pipeline(name, seed=i), policy) for i, name in enumerate(names)]
    alone = []
    for pipe, name in zip(pipes, names):
        alone.append((generate(pipe, name), _summaries(pipe)))
        _assert_both_at_work(pipe)
    start = threading.Barrier(len(pipes))

    def run(pipe, name):
        start.wait()
        results = [(generate(pipe, name), _summaries(pipe)) for _ in range(2)]
        return results

    with ThreadPoolExecutor(len(pipes)) as pool:
        together = list(pool.map(run, pipes, names))
    for (output, summaries), results in zip(alone, together):
        for threaded_output, threaded_summaries in results:
            assert torch.equal(threaded_output, output)
            assert threaded_summaries == summaries


def _held_state(pipe) -> list:
    """Weak references to everything the two features hold during a generation: their objects, every cached
    residual / branch output and indicator, and every block list (and cached complement) of sparse attention."""
    cache, sparse = pipe._diffusers_block_cache, pipe._diffusers_block_sparse_attention
    held = [cache, cache.tracker, sparse, sparse.tracker]
    for part in cache.caches.values():
        held += [part, part.policy, *part.hooks]
        for hook in part.hooks:
            for slot in hook.slots.values():
                held += [t for t in (*(slot.current or ()), *(slot.previous or ())) if isinstance(t, torch.Tensor)]
                held += [slot.indicator] if isinstance(slot.indicator, torch.Tensor) else []
    for part in sparse.parts.values():
        held += [part, *part.hooks]
        for hook in part.hooks:
            for selection in hook.selections.values():
                held += [selection.index, selection.count, *(selection.skipped or ())]
    return [weakref.ref(obj) for obj in held]


def _live_tensors() -> int:
    """Tensors alive in the process, less the process-wide token permutation caches (bounded, shared by every
    model, and cleared wholesale when full, which would make counts depend on the tests run before)."""
    layout._device_cache.clear()
    layout._permutation_cpu.cache_clear()
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no lazy __class__


def _generate_holding(pipe, name: str, policy: str) -> list:
    """Enable both features, generate, disable both; weak references to what they held mid-generation."""
    _enable_both(pipe, policy)
    held = []

    def grab(pipe, step, timestep, callback_kwargs):
        if step == 3:  # mid-generation: slots and block lists are full (the pipeline frees them at its end)
            held.extend(_held_state(pipe))
        return callback_kwargs

    generate(pipe, name, callback_on_step_end=grab)
    _assert_both_at_work(pipe)
    pipe.disable_sparse_attention()
    pipe.disable_block_cache()
    return held


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FAULT_PIPELINES)
def test_disable_frees_every_cached_tensor(name, policy):
    """After disable nothing of either feature stays referenced, and the live tensors are back to their count
    before enabling (a first round warms process-wide caches, e.g. token permutations)."""
    pipe = build_pipeline(name)
    _generate_holding(pipe, name, policy)
    baseline = _live_tensors()
    held = _generate_holding(pipe, name, policy)
    assert len(held) > 20
    # Not more than before enabling (alone: exactly as many; after other tests, objects of theirs may be freed meanwhile)
    assert _live_tensors() <= baseline
    assert [ref() for ref in held if ref() is not None] == []
