"""The adapter table: where each diffusers transformer family keeps its blocks and what a block returns.

Everything in diffusers-block that touches a model goes through this table, so supporting a new family is one
entry here. A family not in the table still works when its blocks sit in a ``ModuleList`` and diffusers' own
block registry knows their return convention; anything else gets :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

HIDDEN = "hidden"
ENCODER = "encoder"

# Sub-block roles, each a branch that feeds one residual add inside a block.
SELF_ATTN = "self_attn"
SELF_ATTN_2 = "self_attn_2"
CROSS_ATTN = "cross_attn"
FFN = "ffn"
FFN_CONTEXT = "ffn_context"

# Where the text tokens sit in the sequence a block list's self-attention (``self_attn`` role) attends over.
TEXT_FIRST = "first"  # joint attention over [text, image]
TEXT_LAST = "last"  # joint attention over [image, text]
TEXT_SEPARATE = "separate"  # no text in self-attention: it reaches the image through cross-attention, or not at all
TEXT_PLACEMENTS = (TEXT_FIRST, TEXT_LAST, TEXT_SEPARATE)

_BASIC_SUB_BLOCKS = {SELF_ATTN: "attn1", CROSS_ATTN: "attn2", FFN: "ff"}
_JOINT_SUB_BLOCKS = {SELF_ATTN: "attn", FFN: "ff", FFN_CONTEXT: "ff_context"}


@dataclass(frozen=True)
class BlockListSpec:
    """One ``ModuleList`` of transformer blocks.

    ``returns`` names the streams a block returns, in order: ``("hidden",)`` for blocks returning a single tensor,
    ``("encoder", "hidden")`` or ``("hidden", "encoder")`` for two-stream blocks. ``sub_blocks`` maps a role
    (self_attn, cross_attn, ffn, ...) to the child attribute holding that branch.

    ``text`` says where the text tokens sit in the sequence the ``self_attn`` sub-block attends over, which sparse
    attention needs to keep text queries dense and text keys in every image query's lists: ``"first"`` or
    ``"last"`` (joint attention: text concatenated before or after the image tokens, by the attention processor or
    by the block itself), ``"separate"`` (the self-attention sees image tokens only; text, if any, comes through
    cross-attention), or None (unknown: sparse attention refuses the model, block caching still works). A
    ``self_attn_2`` sub-block (SD3.5's extra attention) always attends over image tokens only.
    """

    attr: str
    returns: tuple[str, ...]
    sub_blocks: Mapping[str, str] = field(default_factory=dict)
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"
    text: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "sub_blocks", dict(self.sub_blocks))
        if self.text is not None and self.text not in TEXT_PLACEMENTS:
            raise ValueError(
                f"BlockListSpec({self.attr!r}).text must be one of {TEXT_PLACEMENTS} or None (unknown); got {self.text!r}"
            )


@dataclass(frozen=True)
class FamilySpec:
    name: str
    transformer_classes: tuple[str, ...]
    block_lists: tuple[BlockListSpec, ...]


FAMILIES: Mapping[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "dit",
            ("DiTTransformer2DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(
            "pixart",
            ("PixArtTransformer2DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(
            "sd3",
            ("SD3Transformer2DModel",),
            (
                BlockListSpec(
                    "transformer_blocks",
                    (ENCODER, HIDDEN),
                    {**_JOINT_SUB_BLOCKS, SELF_ATTN_2: "attn2"},
                    text=TEXT_LAST,  # JointAttnProcessor2_0: [image, text]
                ),
            ),
        ),
        FamilySpec(
            "flux",
            ("FluxTransformer2DModel",),
            (
                BlockListSpec("transformer_blocks", (ENCODER, HIDDEN), _JOINT_SUB_BLOCKS, text=TEXT_FIRST),
                # the block concatenates [text, image] and its attention gets them as one sequence
                BlockListSpec("single_transformer_blocks", (ENCODER, HIDDEN), {SELF_ATTN: "attn"}, text=TEXT_FIRST),
            ),
        ),
        FamilySpec(
            "cogvideox",
            ("CogVideoXTransformer3DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn1", FFN: "ff"}, text=TEXT_FIRST),),
        ),
        FamilySpec(
            "wan",
            ("WanTransformer3DModel",),
            (
                BlockListSpec(
                    "blocks", (HIDDEN,), {SELF_ATTN: "attn1", CROSS_ATTN: "attn2", FFN: "ffn"}, text=TEXT_SEPARATE
                ),
            ),
        ),
        FamilySpec(
            "hunyuanvideo",
            ("HunyuanVideoTransformer3DModel",),
            (
                BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_SUB_BLOCKS, text=TEXT_LAST),
                BlockListSpec("single_transformer_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn"}, text=TEXT_LAST),
            ),
        ),
        FamilySpec(
            "ltx",
            ("LTXVideoTransformer3DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(
            "mochi",
            ("MochiTransformer3DModel",),
            (
                BlockListSpec(
                    "transformer_blocks",
                    (HIDDEN, ENCODER),
                    {SELF_ATTN: "attn1", FFN: "ff", FFN_CONTEXT: "ff_context"},
                    text=TEXT_LAST,  # MochiAttnProcessor2_0: [image, valid text] per sample
                ),
            ),
        ),
        FamilySpec(
            "allegro",
            ("AllegroTransformer3DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(  # diffusers_block.pipelines.policy: diffusion-policy denoiser (self-attn, cross-attn, FFN)
            "policy",
            ("PolicyTransformer",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
    )
}

# Child names the generic adapter recognises as sub-blocks of an unlisted family.
_GENERIC_SUB_BLOCK_NAMES = {
    "attn1": SELF_ATTN,
    "attn": SELF_ATTN,
    "attn2": CROSS_ATTN,
    "ff": FFN,
    "ffn": FFN,
    "ff_context": FFN_CONTEXT,
}


# Child names of FFN sub-blocks across the table (for BAC's Bubbling Union, which follows FFN update steps).
FFN_CHILDREN = frozenset(
    attr
    for spec in FAMILIES.values()
    for lst in spec.block_lists
    for role, attr in lst.sub_blocks.items()
    if role in (FFN, FFN_CONTEXT)
)


class UnsupportedModelError(ValueError):
    """Raised for a model whose transformer blocks diffusers-block cannot find or call."""


def supported_families() -> list[str]:
    """Names of the model families in the adapter table (``"dit"``, ``"flux"``, ``"wan"``, ...)."""
    return list(FAMILIES)


@dataclass(frozen=True)
class BlockRef:
    """One located block: its module, its dotted name inside the transformer and its list's spec."""

    name: str
    module: torch.nn.Module
    spec: BlockListSpec

    def sub_blocks(self) -> list[tuple[str, str, torch.nn.Module]]:
        """(dotted name, role, module) for each sub-block present in this block (some are optional, e.g. attn2)."""
        found = []
        for role, attr in self.spec.sub_blocks.items():
            child = getattr(self.module, attr, None)
            if isinstance(child, torch.nn.Module):
                found.append((f"{self.name}.{attr}", role, child))
        return found


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    blocks: tuple[BlockRef, ...]


def _unsupported(model: torch.nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"diffusers-block cannot cache {type(model).__name__}: {why}. Supported families: "
        f"{', '.join(FAMILIES)}; other diffusers transformers work when their blocks sit in a torch.nn.ModuleList "
        f"registered in diffusers' TransformerBlockRegistry."
    )


def _family_of(model: torch.nn.Module) -> FamilySpec | None:
    names = {cls.__name__ for cls in type(model).__mro__}
    for spec in FAMILIES.values():
        if names.intersection(spec.transformer_classes):
            return spec
    return None


def _generic_text_placement(returns: tuple[str, ...], sub_blocks: Mapping[str, str]) -> str | None:
    """Text placement of an unlisted block list, only where it cannot be wrong: a one-stream block with a
    cross-attention gets its text there, so its self-attention sees image tokens only. A two-stream block attends
    jointly over text and image in an order the registry does not tell, and a one-stream block without
    cross-attention may carry text inside its sequence (unified single-stream models): both unknown (None)."""
    if returns == (HIDDEN,) and CROSS_ATTN in sub_blocks:
        return TEXT_SEPARATE
    return None


def _generic_block_lists(model: torch.nn.Module) -> tuple[BlockListSpec, ...]:
    """Block lists of an unlisted family, from diffusers' private TransformerBlockRegistry."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # pragma: no cover - very old diffusers
        return ()
    specs = []
    for attr, child in model.named_children():
        if not isinstance(child, torch.nn.ModuleList) or len(child) == 0:
            continue
        block_cls = type(child[0])
        if not all(type(block) is block_cls for block in child):
            continue
        try:
            meta = TransformerBlockRegistry.get(block_cls)
        except ValueError:
            continue
        if meta.return_encoder_hidden_states_index is None:
            returns = (HIDDEN,)
        else:
            returns = [None, None]
            returns[meta.return_hidden_states_index] = HIDDEN
            returns[meta.return_encoder_hidden_states_index] = ENCODER
            returns = tuple(returns)
        sub_blocks = {}
        for name, role in _GENERIC_SUB_BLOCK_NAMES.items():
            if isinstance(getattr(child[0], name, None), torch.nn.Module) and role not in sub_blocks:
                sub_blocks[role] = name
        specs.append(
            BlockListSpec(
                attr,
                returns,
                sub_blocks,
                hidden_arg=getattr(meta, "hidden_states_argument_name", None) or "hidden_states",
                encoder_arg=getattr(meta, "encoder_hidden_states_argument_name", None) or "encoder_hidden_states",
                text=_generic_text_placement(returns, sub_blocks),
            )
        )
    return tuple(specs)


def resolve_adapter(model: torch.nn.Module) -> ModelAdapter:
    """Locate every cacheable block of ``model`` (a diffusers transformer), or raise UnsupportedModelError."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"expected a diffusers transformer (torch.nn.Module) or pipeline, got {type(model).__name__}"
        )
    family = _family_of(model)
    block_lists = family.block_lists if family is not None else _generic_block_lists(model)
    if not block_lists:
        raise _unsupported(model, "no list of transformer blocks with a known return convention was found")
    blocks = []
    for spec in block_lists:
        container = getattr(model, spec.attr, None)
        if not isinstance(container, torch.nn.ModuleList):
            raise _unsupported(model, f"expected a ModuleList at `{spec.attr}`, found {type(container).__name__}")
        for index, block in enumerate(container):
            params = inspect.signature(block.forward).parameters
            if spec.hidden_arg not in params:
                raise _unsupported(model, f"{type(block).__name__}.forward takes no `{spec.hidden_arg}` argument")
            blocks.append(BlockRef(f"{spec.attr}.{index}", block, spec))
    return ModelAdapter(family.name if family is not None else "generic", tuple(blocks))


def argument_index(module: torch.nn.Module, name: str) -> int | None:
    """Position of argument ``name`` in ``module.forward`` (self excluded), so hooks can read it without binding."""
    params = list(inspect.signature(module.forward).parameters.values())
    for index, param in enumerate(params):
        if param.name == name and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return index
    return None


def get_argument(args: tuple, kwargs: dict, name: str, index: int | None):
    if name in kwargs:
        return kwargs[name]
    if index is not None and index < len(args):
        return args[index]
    return None
