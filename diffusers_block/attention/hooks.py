"""The hook on each self-attention module: catch its SDPA call and make it block-sparse.

diffusers' attention processors reach attention in two ways: some call ``F.scaled_dot_product_attention``
themselves (DiT, PixArt, SD3, CogVideoX, Mochi), the others go through ``dispatch_attention_fn`` (Wan, Flux,
HunyuanVideo, LTX), whose "native" backend calls the same SDPA. So one mechanism covers both, without touching a
processor: while a hooked self-attention module runs, a :class:`~torch.overrides.TorchFunctionMode` (thread-local,
active only inside that module's forward) receives its SDPA calls; dispatcher backends other than native are
switched to native for the duration. Cross-attention modules are never hooked, so they are never affected.

Text tokens of joint attention (where ``BlockListSpec.text`` places them, first or last): their queries attend
to every key and their keys are in every image query's lists (:func:`~.functional.sparse_self_attention`); the
image tokens are the attention's ``hidden_states``, or, where the block concatenated the streams itself, those
minus the text length its block received.

Calls the sparse path cannot express exactly (dropout, causal, GQA, cross-shaped q/k, masks other than key
padding) run the original SDPA unchanged and are recorded as dense.

Rotary embedding (``config.fuse_rotary``): diffusers' Wan processor rotates q and k with several fp32 elementwise
passes before attention. On sparse steps the hook passes ``rotary_emb=None`` to that processor (only the stock
``WanAttnProcessor``, whose rotation :func:`~diffusers_block.kernels.rotate_interleaved` reproduces) and applies the
tables inside the token gather instead; a call that falls back to SDPA gets them applied in PyTorch first.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from ..kernels import rotate_interleaved
from ..models import TEXT_FIRST, TEXT_SEPARATE, UnsupportedModelError, argument_index, get_argument
from ..parallel import check_sparse_attention, context_parallel, full_tokens, local_heads
from .functional import sparse_self_attention

if TYPE_CHECKING:
    from .apply import SparseAttention

SPARSE_ATTENTION_HOOK = "diffusers_block.sparse_attention"
#: F.scaled_dot_product_attention's arguments in order (a C builtin: no inspectable signature).
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MISSING = object()
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _rotary_processors() -> tuple[type, ...]:
    """Processors whose ``rotary_emb`` argument the hook may take over (their rotation is rotate_interleaved); the
    exact classes only, since a subclass may use the tables differently."""
    try:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    except ImportError:  # pragma: no cover - diffusers without Wan
        return ()
    return (WanAttnProcessor,)


def _set_argument(args: tuple, kwargs: dict, name: str, index: int | None, value) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with argument ``name`` (at ``index`` if positional) replaced by ``value``."""
    if name in kwargs or index is None or index >= len(args):
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1 :]), kwargs


def _bind_sdpa(args: tuple, kwargs: dict) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    return bound


class _SdpaInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls to ``hook.attend``; every other function runs as usual."""

    def __init__(self, hook: SparseAttentionHook) -> None:
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self.hook.attend(_bind_sdpa(args, kwargs))
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextmanager
def _native_backend(module: torch.nn.Module):
    """Make diffusers' dispatcher use its native (SDPA) backend inside ``module`` for the duration."""
    processor = getattr(module, "processor", None)
    with ExitStack() as stack:
        if processor is not None and getattr(processor, "_attention_backend", None) not in (None, "native"):
            previous = processor.__dict__.get("_attention_backend", _MISSING)
            processor._attention_backend = None

            def restore():
                if previous is _MISSING:
                    processor.__dict__.pop("_attention_backend", None)
                else:
                    processor._attention_backend = previous

            stack.callback(restore)
        try:
            from diffusers.models import attention_dispatch as dispatch
        except ImportError:  # pragma: no cover - diffusers without a dispatcher
            dispatch = None
        if dispatch is not None and str(
            getattr(dispatch._AttentionBackendRegistry, "_active_backend", "native")
        ) not in (
            "native",
            "AttentionBackendName.NATIVE",
        ):
            stack.enter_context(dispatch.attention_backend("native"))
        yield


#: Why the hook runs outside compiled graphs (dynamo shows it when ``fullgraph=True`` refuses the graph break).
EAGER_ONLY = (
    "diffusers_block sparse attention runs each hooked self-attention outside torch.compile graphs (its block "
    "selection and records are Python decisions on the host), so it cannot be part of a fullgraph=True graph. "
    "Compile without fullgraph=True (the rest of the model is still compiled), or call disable_sparse_attention() "
    "before compiling with fullgraph=True"
)


class SparseAttentionHook(ModelHook):
    """On one self-attention module: per call, dense or sparse by the step; keeps this layer's block lists."""

    _is_stateful = True

    def __init__(self, controller: SparseAttention, layer: int, name: str, module: torch.nn.Module, text: str) -> None:
        super().__init__()
        self.controller = controller
        self.layer = layer
        self.name = name
        self.text = text  # where text sits in this attention's sequence: "first", "last" or "separate" (none)
        self.text_first = text == TEXT_FIRST
        self._hidden_index = argument_index(module, "hidden_states")
        self._encoder_index = argument_index(module, "encoder_hidden_states")
        self._rotary_index = argument_index(module, "rotary_emb")
        self.selections: dict = {}  # (branch, call in forward, sample) -> Selection
        self._thresholds: torch.Tensor | None = None
        self._call: dict | None = None

    # -- forward ------------------------------------------------------------------------------------------------
    @torch.compiler.disable(reason=EAGER_ONLY)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        """Under ``torch.compile`` this runs eagerly between graphs: traced, the selection's host reads would break
        the graph anyway, and the per-call records (the summary) would be lost."""
        controller = self.controller
        tracker = controller.tracker
        hidden = get_argument(args, kwargs, "hidden_states", self._hidden_index)
        encoder = get_argument(args, kwargs, "encoder_hidden_states", self._encoder_index)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return self.fn_ref.original_forward(*args, **kwargs)
        # Under context parallelism (diffusers' Ulysses) the module sees this rank's chunk of the tokens, and its SDPA
        # call the whole sequence for this rank's heads; enable_parallelism may have come after enable_sparse_attention.
        layout = context_parallel(module)
        check_sparse_attention(layout, controller.family, joint=self.text != TEXT_SEPARATE)
        tokens = full_tokens(layout, hidden.shape[1])  # what the SDPA call attends over (Ulysses: the whole sequence)
        image = tokens
        if self.text != TEXT_SEPARATE and not isinstance(encoder, torch.Tensor):
            if controller.text_tokens is None:
                raise UnsupportedModelError(
                    f"Sparse attention on {type(controller.model).__name__}: the self-attention at `{self.name}` "
                    f"attends over text and image tokens in one sequence, but no block of this forward said how many "
                    f"are text (its block gets no text argument and no joint block ran before it). Call the "
                    f"transformer as a whole, or disable sparse attention for it (dense attention and block caching "
                    f"still work)."
                )
            image -= controller.text_tokens  # the block concatenated text and image into hidden_states
        step, branch = tracker.step, tracker.branch
        last = self._last_selection_step(branch)
        mode = controller.config.step_mode(step, last, tracker.num_steps)
        if mode == "dense" or tokens < controller.config.min_tokens:
            controller.record(self.layer, step, branch, "dense", None)
            return self.fn_ref.original_forward(*args, **kwargs)
        rotary = None
        # Under CP the processor's rotary tables are the rank's chunk of the sequence while the SDPA call holds all of
        # it: the processor keeps rotating (before its all-to-all).
        fuse = controller.config.fuse_rotary and layout is None
        if fuse and type(getattr(module, "processor", None)) in _rotary_processors():
            tables = get_argument(args, kwargs, "rotary_emb", self._rotary_index)
            if (
                isinstance(tables, (tuple, list))
                and len(tables) == 2
                and all(isinstance(t, torch.Tensor) for t in tables)
            ):
                rotary = tuple(tables)
                args, kwargs = _set_argument(args, kwargs, "rotary_emb", self._rotary_index, None)
        self._call = {
            "step": step,
            "branch": branch,
            "image": image,
            "mode": mode,
            "calls": 0,
            "rotary": rotary,
            "layout": layout,
        }
        try:
            with _native_backend(module), _SdpaInterceptor(self):
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._call = None

    def _last_selection_step(self, branch) -> int | None:
        steps = [sel.step for (b, *_), sel in self.selections.items() if b == branch]
        return max(steps) if steps else None

    # -- one SDPA call ------------------------------------------------------------------------------------------
    def attend(self, call: dict) -> torch.Tensor | None:
        """Sparse output for one intercepted SDPA call, or None to run the original SDPA."""
        frame = self._call
        q, k, v = call["query"], call["key"], call["value"]
        if frame is None or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return None
        call_index = frame["calls"]
        frame["calls"] += 1
        controller = self.controller
        rotary = frame.get("rotary") if call_index == 0 else None  # the processor's one rotated (self-attention) call
        if (
            call["dropout_p"]
            or call["is_causal"]
            or call["enable_gqa"]
            or q.dim() != 4
            or q.shape != k.shape
            or k.shape != v.shape
        ):
            controller.record(self.layer, frame["step"], frame["branch"], "fallback", None)
            return self._dense(call, rotary)
        batch, heads, seq, head_dim = q.shape
        if self.text == TEXT_SEPARATE and seq != frame["image"]:
            raise UnsupportedModelError(
                f"Sparse attention on {type(controller.model).__name__}: the self-attention at `{self.name}` attends "
                f"over {seq} tokens but its hidden_states hold {frame['image']}, so other tokens (text?) joined its "
                f"sequence, though the adapter table says it sees image tokens only (text='separate'). Disable sparse "
                f"attention for this model (dense attention and block caching still work), and correct its "
                f"BlockListSpec.text in diffusers_block.models.FAMILIES or file an issue."
            )
        text = max(seq - frame["image"], 0)
        if seq - text < 1:
            return self._dense(call, rotary)
        if rotary is not None and (text or rotary[0].numel() != seq * head_dim or rotary[0].shape[-1] != head_dim):
            raise RuntimeError(
                f"the rotary tables {tuple(rotary[0].shape)} taken from the processor do not fit its attention call "
                f"{tuple(q.shape)}; disable the fusion with SparseAttentionConfig(fuse_rotary=False)"
            )
        lengths = self._key_lengths(call["attn_mask"], batch, seq, text)
        if lengths is False:
            controller.record(self.layer, frame["step"], frame["branch"], "fallback", None)
            return self._dense(call, rotary)
        config = controller.config
        thresholds = self._thresholds_for(heads, q.device, frame.get("layout"))
        grid = controller.grid if config.reorder else None
        # One call for the whole batch when all samples share a key length; per sample otherwise (text padding).
        groups = [(slice(None), None if lengths is None else lengths[0], "all")]
        if lengths is not None and len(set(lengths)) > 1:
            groups = [(slice(b, b + 1), lengths[b], b) for b in range(batch)]
        outs, densities, reused = [], [], True
        for rows, key_length, sample in groups:
            key = (frame["branch"], call_index, sample)
            previous = self.selections.get(key) if frame["mode"] == "reuse" else None
            out, selection = sparse_self_attention(
                q[rows],
                k[rows],
                v[rows],
                config=config,
                thresholds=thresholds,
                scale=call["scale"],
                text=text,
                text_first=self.text_first,
                grid=grid,
                key_length=key_length,
                selection=previous,
                step=frame["step"],
                rotary=rotary,
            )
            reused = reused and selection is previous
            self.selections[key] = selection
            outs.append(out)
            density = selection.density()
            if config.approximation == "cached" and selection is not previous:
                density = torch.ones_like(density)  # the lists and their complement: a dense attention's work
            densities.append(density)
        mode = "reuse" if reused else "select"
        density = densities[0] if len(densities) == 1 else torch.stack(densities).mean(0)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        error = self._relative_error(out, call, rotary) if config.measure_error else None
        controller.record(self.layer, frame["step"], frame["branch"], mode, density, error)
        controller.last_selection[self.layer] = self.selections[(frame["branch"], call_index, groups[0][2])]
        return out

    @classmethod
    def _relative_error(cls, out: torch.Tensor, call: dict, rotary) -> torch.Tensor:
        """||out - dense|| / ||dense|| (fp32, 0-d tensor) against exact attention of the same call; diagnostic only
        (``SparseAttentionConfig.measure_error``): one dense attention more, no host sync."""
        with torch.no_grad():
            dense = cls._dense(call, rotary, always=True).float()
            return (out.detach().float() - dense).norm() / dense.norm().clamp_min(torch.finfo(torch.float32).tiny)

    @staticmethod
    def _dense(call: dict, rotary, always: bool = False) -> torch.Tensor | None:
        """The original SDPA for a call the sparse path does not take: None (run it as it came) unless the hook
        took the rotary embedding away from the processor, which is then applied here first. ``always``: compute
        it here in any case (the exact reference of ``measure_error``)."""
        if rotary is None and not always:
            return None
        q, k = call["query"], call["key"]
        if rotary is not None:
            seq, head_dim = q.shape[-2:]
            cos, sin = (t.reshape(seq, head_dim) for t in rotary)
            q, k = (rotate_interleaved(t, cos, sin) for t in (q, k))
        return F.scaled_dot_product_attention(
            q,
            k,
            call["value"],
            attn_mask=call["attn_mask"],
            dropout_p=call["dropout_p"],
            is_causal=call["is_causal"],
            scale=call["scale"],
            enable_gqa=call["enable_gqa"],
        )

    def _thresholds_for(self, heads: int, device: torch.device, layout=None) -> torch.Tensor:
        """Per-head thresholds of the ``heads`` heads of this call: under Ulysses, this rank's slice of the model's."""
        first, total = local_heads(layout, heads)
        cached = self._thresholds
        if cached is None or cached.numel() != heads or cached.device != device:
            values = self.controller.config.thresholds(total)[first : first + heads]
            cached = self._thresholds = torch.tensor(values, dtype=torch.float32, device=device)
        return cached

    def _key_lengths(self, mask, batch: int, seq: int, text: int):
        """None (no mask), per-sample valid key counts (a key-padding mask whose valid keys are a prefix in the
        attended order, image tokens then text: text padding), or False (any other mask: run dense)."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return False
        if mask.shape[-1] != seq or mask.shape[0] not in (1, batch):
            return False
        return self.controller.key_lengths(mask, batch, seq - text, self.text_first)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End of a pipeline call: drop the block lists."""
        self.selections.clear()
        return module
