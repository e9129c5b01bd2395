"""Public entry points of sparse attention, for a pipeline or a bare transformer.

``enable_sparse_attention`` hooks the self-attention module of every block the adapter table knows (the
``self_attn`` and ``self_attn_2`` sub-block roles) and a generation tracker on the transformer (step and CFG
branch, as block caching uses, but its own instance, so that the two features come and go independently and in
either order). ``disable_sparse_attention`` removes all of it; outputs are then bit-identical to never enabling.

Joint attention (text and image tokens in one sequence) is only made sparse where the adapter table says where the
text sits (``BlockListSpec.text``): text queries then stay dense and every image query keeps the text keys. Blocks
of such lists also get a small forward pre-hook that reads the text length of each call (blocks that concatenate
the streams themselves hand their attention one sequence). A model whose text placement is unknown is refused.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from diffusers.hooks import HookRegistry

from ..cache.apply import _transformers
from ..cache.units import stream_shapes
from ..models import (
    CROSS_ATTN,
    ENCODER,
    SELF_ATTN,
    SELF_ATTN_2,
    TEXT_FIRST,
    TEXT_LAST,
    TEXT_ONLY,
    TEXT_SEPARATE,
    BlockRef,
    ModelAdapter,
    UnsupportedModelError,
    argument_index,
    get_argument,
    resolve_adapter,
)
from ..parallel import check_sparse_attention, context_parallel, register_inside_context_parallel
from ..state import GenerationTracker, GenerationTrackerHook, check_not_enabled_elsewhere
from .config import SparseAttentionConfig
from .hooks import EAGER_ONLY, SPARSE_ATTENTION_HOOK, SparseAttentionHook
from .layout import token_grid
from .summary import MODES, NOT_RUN, SparseAttentionSummary, merge

_ATTR = "_diffusers_block_sparse_attention"
TRACKER_HOOK = "diffusers_block.sparse_attention.tracker"


def _text_placement_unknown(model: torch.nn.Module, adapter: ModelAdapter, ref: BlockRef) -> UnsupportedModelError:
    spec = ref.spec
    name = type(model).__name__
    if spec.text_refused:  # known, but no placement the kernels can follow
        return UnsupportedModelError(
            f"Sparse attention cannot run on {name}: the text tokens in the self-attention of `{ref.name}` have no "
            f"fixed place it can protect: {spec.text_refused} (adapter entry {adapter.family!r}). Without it the "
            f"block selection could drop the text keys of image queries and sparsify text queries. Dense attention "
            f"and block caching (enable_block_cache) still work on this model."
        )
    if adapter.family != "generic":
        why = f"its adapter entry {adapter.family!r} does not say (BlockListSpec({spec.attr!r}).text is None)"
    elif ENCODER in spec.returns:
        why = (
            f"it is not in the adapter table and its `{spec.attr}` blocks are two-stream (joint attention over text "
            f"and image tokens, in an order diffusers' block registry does not tell)"
        )
    elif CROSS_ATTN not in spec.sub_blocks:
        why = (
            f"it is not in the adapter table and its `{spec.attr}` blocks have no cross-attention, so their "
            f"self-attention may carry the text tokens inside its sequence"
        )
    else:
        why = f"it is not in the adapter table (BlockListSpec({spec.attr!r}).text is None)"
    return UnsupportedModelError(
        f"Sparse attention cannot run on {name}: where the text tokens sit in the self-attention of "
        f"`{ref.name}` is unknown: {why}. Without it the block selection could drop the text keys of image queries "
        f"and sparsify text queries. Dense attention and block caching (enable_block_cache) still work on this "
        f'model. To use sparse attention, add text="first", "last", "separate" or "only" to its BlockListSpec in '
        f"diffusers_block.models.FAMILIES (where its attention puts the text tokens), or file an issue."
    )


class TextLength:
    """Forward pre-hook on a block of a joint-attention list: the text length of this call, for its attention hook
    (a block that concatenates text and image itself hands its attention one sequence, no text argument to read).
    A block without a text argument, or given None (the transformer concatenated the streams before it: Chroma's,
    AuraFlow's, Flux-2's single blocks), leaves the length of the last joint block before it in this forward.

    A torch hook rather than one in diffusers' HookRegistry: block caching hooks the same blocks, and the registry's
    ``remove_hook`` of an inner hook replaces the next hook's whole forward (bypassing its ``new_forward``)."""

    def __init__(self, controller: SparseAttention, block: torch.nn.Module, encoder_arg: str) -> None:
        self.controller = controller
        self.encoder_arg = encoder_arg
        self._index = argument_index(block, encoder_arg)

    @torch.compiler.disable(reason=EAGER_ONLY)
    def __call__(self, module, args, kwargs):
        encoder = get_argument(args, kwargs, self.encoder_arg, self._index)
        if isinstance(encoder, torch.Tensor):
            self.controller.text_tokens = encoder.shape[1] if encoder.dim() == 3 else 0


def _check_native_backend(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Sparse attention receives the SDPA calls of diffusers' native backend; a processor that only runs on other
    backends (AnyFlow-FAR's causal processor needs flex attention and its ``BlockMask``) cannot be served."""
    processor = getattr(module, "processor", None)
    supported = getattr(processor, "_SUPPORTED_BACKENDS", None)
    if supported is not None and "native" not in supported:
        raise UnsupportedModelError(
            f"Sparse attention cannot run on {type(model).__name__}: the attention processor of `{name}` "
            f"({type(processor).__name__}) only runs on the {', '.join(map(repr, supported))} attention backends, and "
            f"sparse attention replaces the native SDPA backend. Block caching (enable_block_cache) still works on "
            f"this model."
        )


def _reaches(fn, target) -> bool:
    """Whether ``fn`` is ``target`` or wraps it (functools.wraps chains)."""
    seen = 0
    while fn is not None and seen < 64:
        if fn is target:
            return True
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return False


class _Tracker(GenerationTracker):
    """A GenerationTracker whose scheduler wrappers survive other trackers (block caching) coming and going.

    Each tracker wraps the scheduler's ``set_timesteps``/``step`` on the instance. Unwrapping restores what was
    there before (another tracker's wrapper, possibly) instead of deleting the attribute; if another wrapper was
    put on top of ours it keeps calling ours, and if another tracker's removal took ours away, the next forward
    notices and wraps again.
    """

    _NAMES = ("set_timesteps", "step")

    def __init__(self) -> None:
        super().__init__()
        self._previous: dict = {}
        self._wrappers: dict = {}

    def attach_scheduler(self, scheduler) -> None:
        self.detach_scheduler()
        if scheduler is None:
            return
        previous = {name: scheduler.__dict__.get(name) for name in self._NAMES}
        super().attach_scheduler(scheduler)
        if self._scheduler is scheduler:
            self._previous = previous
            self._wrappers = {name: scheduler.__dict__[name] for name in self._NAMES}

    def detach_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None:
            for name, wrapper in self._wrappers.items():
                if scheduler.__dict__.get(name) is wrapper:
                    if self._previous.get(name) is None:
                        scheduler.__dict__.pop(name, None)
                    else:
                        scheduler.__dict__[name] = self._previous[name]
        self._scheduler = None
        self._scheduler_originals = {}
        self._previous, self._wrappers = {}, {}

    def on_forward(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None and self._wrappers:
            current = getattr(scheduler, "step", None)
            if not _reaches(current, self._wrappers["step"]):  # another tracker's removal took our wrapper away
                self.attach_scheduler(scheduler)
                self.on_generation_start(None)
        super().on_forward()


class _TransformerHook(GenerationTrackerHook):
    """On the transformer: step/branch tracking, plus the token grid of this call for reordering."""

    def __init__(self, tracker: GenerationTracker, controller: SparseAttention) -> None:
        super().__init__(tracker)
        self.controller = controller

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        self.controller.on_forward(args, kwargs)
        return args, kwargs


class SparseAttention:
    """Everything sparse attention attached to one transformer, and the way to take it off again."""

    def __init__(self, model: torch.nn.Module, config: SparseAttentionConfig, tracker: GenerationTracker) -> None:
        if not isinstance(config, SparseAttentionConfig):
            raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
        adapter = resolve_adapter(model)
        self.model = model
        self.config = config
        self.tracker = tracker
        self.family = adapter.family
        self.grid: tuple[int, int, int] | None = None
        # text length of the block running now (joint-attention lists, TextLength); None: no joint block ran yet
        self.text_tokens: int | None = None
        self.layer_names: list[str] = []
        self.hooks: list[SparseAttentionHook] = []
        self._modules: list[torch.nn.Module] = []
        self._text_hooks: list = []  # handles of the TextLength pre-hooks on joint-attention blocks
        self.last_selection: dict = {}
        # (step, branch, layer, mode, density (H,) tensor or None, relative error 0-d tensor or None)
        self._records: list[tuple] = []
        self._key_length_cache: dict = {}
        self._input_shape: tuple | None = None  # of the last transformer call, to see a bare loop's new generation
        attentions = [
            (ref, [(name, role, module) for name, role, module in ref.sub_blocks() if role in (SELF_ATTN, SELF_ATTN_2)])
            for ref in adapter.blocks
        ]
        for ref, found in attentions:  # refuse before hooking anything
            if ref.spec.text is None and any(role == SELF_ATTN for _, role, _ in found):
                raise _text_placement_unknown(model, adapter, ref)
            for name, _, module in found:
                _check_native_backend(model, name, module)
        joint = any(ref.spec.text in (TEXT_FIRST, TEXT_LAST) for ref, found in attentions if found)
        check_sparse_attention(context_parallel(model), self.family, joint=joint)
        for ref, found in attentions:
            if ref.spec.text == TEXT_ONLY:  # text tokens only: nothing to make sparse, leave it dense
                found = [(name, role, module) for name, role, module in found if role == SELF_ATTN_2]
            if found and ref.spec.text in (TEXT_FIRST, TEXT_LAST):
                hook = TextLength(self, ref.module, ref.spec.encoder_arg)
                self._text_hooks.append(ref.module.register_forward_pre_hook(hook, with_kwargs=True))
            for name, role, module in found:
                text = TEXT_SEPARATE if role == SELF_ATTN_2 else ref.spec.text
                hook = SparseAttentionHook(self, len(self.hooks), name, module, text)
                register_inside_context_parallel(module, hook, SPARSE_ATTENTION_HOOK)
                self.hooks.append(hook)
                self._modules.append(module)
                self.layer_names.append(name)
        if not self.hooks:
            self.remove()
            raise ValueError(f"{type(model).__name__} has no self-attention sub-block in the adapter table")
        HookRegistry.check_if_exists_or_initialize(model).register_hook(_TransformerHook(tracker, self), TRACKER_HOOK)
        tracker.add_listener(self._on_event)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    # -- events -----------------------------------------------------------------------------------------------
    def _on_event(self, event: str) -> None:
        if event == "generation":
            for hook in self.hooks:
                hook.selections.clear()
            self.last_selection.clear()
            self._records.clear()

    def on_forward(self, args: tuple, kwargs: dict) -> None:
        self._follow_shape(args, kwargs)
        self.grid = (
            token_grid(self.family, getattr(self.model, "config", None), args, kwargs) if self.config.reorder else None
        )
        self.text_tokens = None
        self._key_length_cache.clear()

    def _follow_shape(self, args: tuple, kwargs: dict) -> None:
        """In a bare loop (no scheduler, no cache context) a new input shape starts a new generation, as it does for
        block caching: its first steps are dense again and old block lists are dropped. Where steps are known, a
        shape change mid-generation only makes the next calls select anew, so it is left to block caching to
        refuse."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        shape = stream_shapes(hidden, kwargs.get("encoder_hidden_states"))
        previous, self._input_shape = self._input_shape, shape
        if previous is not None and shape != previous and not self.tracker.stepped:
            self.tracker.on_shape_change(previous, shape)

    def record(
        self, layer: int, step: int, branch, mode: str, density: torch.Tensor | None, error: torch.Tensor | None = None
    ) -> None:
        """One attention call: its mode, kept fraction per head (None: dense) and, with ``measure_error``, its
        relative error against dense attention. Never traced: the hook runs outside compiled graphs."""
        self._records.append((step, branch, layer, mode, density, error))

    def key_lengths(self, mask: torch.Tensor, batch: int, image: int, text_first: bool = False):
        """Valid key count per sample of a key-padding mask (B or 1, 1, 1, S), or False if its valid keys are not a
        prefix covering the image tokens, in the attended order (image tokens, then text: with ``text_first`` the
        mask's leading S - image text entries are moved behind the image's). One host sync per mask and forward."""
        key = (mask.data_ptr(), tuple(mask.shape), mask._version, image, text_first)
        if key in self._key_length_cache:
            return self._key_length_cache[key]
        flat = mask[:, 0, 0, :]
        if text_first:
            text = flat.shape[-1] - image
            flat = torch.cat([flat[:, text:], flat[:, :text]], dim=-1)
        if flat.dtype == torch.bool:
            valid, pure = flat, True
        else:
            valid = flat == 0
            pure = bool(((flat == 0) | (flat <= -1e4)).all())
        lengths = valid.sum(-1)
        prefix = torch.arange(flat.shape[-1], device=flat.device) < lengths[:, None]
        ok = pure and bool((valid == prefix).all()) and int(lengths.min()) >= image
        result = False
        if ok:
            lengths = [int(n) for n in lengths.tolist()]
            result = lengths * batch if len(lengths) == 1 else lengths
        self._key_length_cache[key] = result
        return result

    # -- summary ----------------------------------------------------------------------------------------------
    def summary(self) -> SparseAttentionSummary:
        records = self._records
        branches = list(dict.fromkeys(branch for _, branch, *_ in records))
        steps = 1 + max((step for step, *_ in records), default=-1)
        measured = [d for *_, d, _ in records if d is not None]
        values = torch.stack([d.float().cpu() for d in measured]).numpy() if measured else np.zeros((0, 1))
        heads = values.shape[-1] if len(values) else 1
        mode = np.full((len(branches), steps, len(self.hooks)), NOT_RUN, dtype=np.int8)
        density = np.full((len(branches), steps, len(self.hooks), heads), np.nan)
        errors = [float(e) for *_, e in records if e is not None]  # one host sync per call, at summary time only
        error = np.full(mode.shape, np.nan)
        sums, error_sums = {}, {}
        it, error_it = iter(values), iter(errors)
        for step, branch, layer, kind, d, e in records:
            index = (branches.index(branch), step, layer)
            mode[index] = max(mode[index], MODES[kind]) if kind != "dense" else MODES[kind]
            if d is None:
                density[index] = 1.0
            else:
                total, n = sums.get(index, (0.0, 0))
                sums[index] = (total + next(it), n + 1)  # several SDPA calls of one layer (Mochi: per sample)
            if e is not None:
                total, n = error_sums.get(index, (0.0, 0))
                error_sums[index] = (total + next(error_it), n + 1)
        for index, (total, n) in sums.items():
            density[index] = total / n
        for index, (total, n) in error_sums.items():
            error[index] = total / n
        masks = {}
        for layer, selection in self.last_selection.items():
            masks[self.layer_names[layer]] = functools.partial(_mask_of, selection)
        return SparseAttentionSummary(list(self.layer_names), branches, mode, density, error, masks)

    def remove(self) -> None:
        for module in self._modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(SPARSE_ATTENTION_HOOK) is not None:
                registry.remove_hook(SPARSE_ATTENTION_HOOK, recurse=False)
        for handle in self._text_hooks:
            handle.remove()
        self._text_hooks.clear()
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(TRACKER_HOOK) is not None:
            registry.remove_hook(TRACKER_HOOK, recurse=False)
        for hook in self.hooks:
            hook.selections.clear()
        self.last_selection.clear()
        self._records.clear()
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()


def _mask_of(selection, head: int) -> np.ndarray:
    from ..kernels import block_mask_from_index

    mask = block_mask_from_index(
        selection.index[:1, head : head + 1], selection.count[:1, head : head + 1], selection.num_kv_blocks
    )
    return mask[0, 0].cpu().numpy()


class _Attached:
    def __init__(self, tracker: _Tracker, parts: dict[str, SparseAttention]) -> None:
        self.tracker = tracker
        self.parts = parts


def enable_sparse_attention(target, config: SparseAttentionConfig | None = None):
    """Make the self-attention of a diffusers pipeline's transformer(s), or of a bare transformer, block-sparse.

    Enabling again replaces the previous configuration. Composes with ``enable_block_cache`` (either order).
    Returns ``target``.
    """
    config = SparseAttentionConfig() if config is None else config
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    models = _transformers(target)
    disable_sparse_attention(target)
    for model in models.values():
        check_not_enabled_elsewhere(
            model, TRACKER_HOOK, "sparse attention", "enable_sparse_attention", "disable_sparse_attention"
        )
    tracker = _Tracker()
    parts: dict[str, SparseAttention] = {}
    try:
        for name, model in models.items():
            parts[name] = SparseAttention(model, config, tracker)
    except Exception:
        for part in parts.values():
            part.remove()
        raise
    if not isinstance(target, torch.nn.Module):
        tracker.attach_pipeline(target)
    setattr(target, _ATTR, _Attached(tracker, parts))
    return target


def disable_sparse_attention(target) -> None:
    """Remove every hook and block list: attention is exactly dense again. No-op if not enabled."""
    attached: _Attached | None = getattr(target, _ATTR, None)
    if attached is None:
        return
    for part in attached.parts.values():
        part.remove()
    attached.tracker.detach_scheduler()
    delattr(target, _ATTR)


def sparse_attention_summary(target) -> SparseAttentionSummary:
    """Density per layer, head and step of the last generation, and the last block mask of each layer."""
    attached = getattr(target, _ATTR, None)
    if attached is None:
        raise RuntimeError("Sparse attention is not enabled on this object: call enable_sparse_attention() first.")
    return merge({name: part.summary() for name, part in attached.parts.items()})
