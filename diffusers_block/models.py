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
# A block output that is no stream's update but a value of its own (a VACE block's hint for the main blocks): cached
# as it is, not as a residual.
OUTPUT = "output"

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
TEXT_ONLY = "only"  # text tokens only (a text refiner): never made sparse
TEXT_PLACEMENTS = (TEXT_FIRST, TEXT_LAST, TEXT_SEPARATE, TEXT_ONLY)

_BASIC_SUB_BLOCKS = {SELF_ATTN: "attn1", CROSS_ATTN: "attn2", FFN: "ff"}
_JOINT_SUB_BLOCKS = {SELF_ATTN: "attn", FFN: "ff", FFN_CONTEXT: "ff_context"}
_ATTN_FF_SUB_BLOCKS = {SELF_ATTN: "attn", FFN: "ff"}
_WAN_SUB_BLOCKS = {SELF_ATTN: "attn1", CROSS_ATTN: "attn2", FFN: "ffn"}
_JOINT_1_SUB_BLOCKS = {SELF_ATTN: "attn1", FFN: "ff"}  # CogVideoX-style joint blocks: one attn1 over text + image
_LUMINA_SUB_BLOCKS = {SELF_ATTN: "attn", FFN: "feed_forward"}
_Z_IMAGE_SUB_BLOCKS = {SELF_ATTN: "attention", FFN: "feed_forward"}


@dataclass(frozen=True)
class BlockListSpec:
    """One ``ModuleList`` of transformer blocks.

    ``returns`` names the streams a block returns, in order: ``("hidden",)`` for blocks returning a single tensor,
    ``("encoder", "hidden")`` or ``("hidden", "encoder")`` for two-stream blocks, ``"output"`` for a returned value
    that is cached as is. ``sub_blocks`` maps a role (self_attn, cross_attn, ffn, ...) to the child attribute holding
    that branch. ``hidden_arg`` / ``encoder_arg`` name the streams in the block's forward (the "encoder" stream is
    whatever second stream a block updates: text, or LTX-2's audio). An ``optional`` list may be None or empty
    (a model built without it).

    ``text`` says where the text tokens sit in the sequence the ``self_attn`` sub-block attends over, which sparse
    attention needs to keep text queries dense and text keys in every image query's lists: ``"first"`` or
    ``"last"`` (joint attention: text concatenated before or after the image tokens, by the attention processor, by
    the block, or by the transformer before this list), ``"separate"`` (the self-attention sees image tokens only;
    text, if any, comes through cross-attention), ``"only"`` (text tokens only, e.g. a text refiner: left dense), or
    None (unknown: sparse attention refuses the model, block caching still works). ``text_refused`` says why a list's placement cannot be
    expressed (for the refusal). A ``self_attn_2`` sub-block (SD3.5's extra attention) always attends over image
    tokens only.

    A joint list whose blocks take no text argument (or get None: the transformer concatenated the streams before
    them) takes the text length of the last joint block before it in the same forward.
    """

    attr: str
    returns: tuple[str, ...]
    sub_blocks: Mapping[str, str] = field(default_factory=dict)
    hidden_arg: str = "hidden_states"
    encoder_arg: str = "encoder_hidden_states"
    optional: bool = False
    text: str | None = None
    text_refused: str = ""

    def __post_init__(self):
        object.__setattr__(self, "sub_blocks", dict(self.sub_blocks))
        if self.text is not None and self.text not in TEXT_PLACEMENTS:
            raise ValueError(
                f"BlockListSpec({self.attr!r}).text must be one of {TEXT_PLACEMENTS} or None (unknown); got {self.text!r}"
            )
        if self.text_refused and self.text is not None:
            raise ValueError(f"BlockListSpec({self.attr!r}): text_refused explains a text=None, not text={self.text!r}")


@dataclass(frozen=True)
class FamilySpec:
    """A model family: its transformer classes and block lists, or (``refused``) why it must not be cached."""

    name: str
    transformer_classes: tuple[str, ...]
    block_lists: tuple[BlockListSpec, ...]
    refused: str = ""


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
            ("CogVideoXTransformer3DModel", "ConsisIDTransformer3DModel"),
            (BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_1_SUB_BLOCKS, text=TEXT_FIRST),),
        ),
        FamilySpec(
            "wan",
            (
                "WanTransformer3DModel",
                "ChronoEditTransformer3DModel",
                "SkyReelsV2Transformer3DModel",
                "WanAnimateTransformer3DModel",  # its face adapter is added to chosen blocks' outputs, not a block
                "HeliosTransformer3DModel",
                "AnyFlowTransformer3DModel",
                "AnyFlowFARTransformer3DModel",
            ),
            (BlockListSpec("blocks", (HIDDEN,), _WAN_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(  # VACE blocks run on the control stream and return (hint for the main blocks, control stream)
            "wan_vace",
            ("WanVACETransformer3DModel",),
            (
                BlockListSpec("blocks", (HIDDEN,), _WAN_SUB_BLOCKS, text=TEXT_SEPARATE),
                BlockListSpec(
                    "vace_blocks",
                    (OUTPUT, HIDDEN),
                    _WAN_SUB_BLOCKS,
                    hidden_arg="control_hidden_states",
                    text=TEXT_SEPARATE,
                ),
            ),
        ),
        FamilySpec(
            "hunyuanvideo",
            ("HunyuanVideoTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel"),
            (
                BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_SUB_BLOCKS, text=TEXT_LAST),
                BlockListSpec("single_transformer_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn"}, text=TEXT_LAST),
            ),
        ),
        FamilySpec(  # HunyuanVideo's block conventions on images
            "hunyuanimage",
            ("HunyuanImageTransformer2DModel",),
            (
                BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_SUB_BLOCKS, text=TEXT_LAST),
                BlockListSpec("single_transformer_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn"}, text=TEXT_LAST),
            ),
        ),
        FamilySpec(  # spatial blocks (text by cross-attention) alternate with temporal ones (image tokens over frames)
            "latte",
            ("LatteTransformer3DModel",),
            (
                BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),
                BlockListSpec(
                    "temporal_transformer_blocks", (HIDDEN,), {SELF_ATTN: "attn1", FFN: "ff"}, text=TEXT_SEPARATE
                ),
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
        FamilySpec(
            "motif_video",
            ("MotifVideoTransformer3DModel",),
            (
                BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_SUB_BLOCKS, text=TEXT_LAST),
                BlockListSpec("single_transformer_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn"}, text=TEXT_LAST),
            ),
        ),
        FamilySpec(
            "auraflow",
            ("AuraFlowTransformer2DModel",),
            (
                BlockListSpec("joint_transformer_blocks", (ENCODER, HIDDEN), _JOINT_SUB_BLOCKS, text=TEXT_FIRST),
                # the model concatenates [registers + text, image] before these
                BlockListSpec("single_transformer_blocks", (HIDDEN,), _ATTN_FF_SUB_BLOCKS, text=TEXT_FIRST),
            ),
        ),
        FamilySpec(  # Flux descendants whose single blocks take the concatenated sequence alone
            "chroma",
            ("ChromaTransformer2DModel", "BriaFiboTransformer2DModel"),
            (
                BlockListSpec("transformer_blocks", (ENCODER, HIDDEN), _JOINT_SUB_BLOCKS, text=TEXT_FIRST),
                # the model concatenates [text, image] before these
                BlockListSpec("single_transformer_blocks", (HIDDEN,), {SELF_ATTN: "attn"}, text=TEXT_FIRST),
            ),
        ),
        FamilySpec(  # Flux descendants with Flux's block conventions
            "flux_like",
            (
                "BriaTransformer2DModel",
                "LongCatImageTransformer2DModel",
                "OvisImageTransformer2DModel",
                "Flux2Transformer2DModel",
            ),
            (
                BlockListSpec("transformer_blocks", (ENCODER, HIDDEN), _JOINT_SUB_BLOCKS, text=TEXT_FIRST),
                # Flux-2 concatenates [text, image] before its single blocks and passes them no text
                BlockListSpec("single_transformer_blocks", (ENCODER, HIDDEN), {SELF_ATTN: "attn"}, text=TEXT_FIRST),
            ),
        ),
        FamilySpec(
            "qwenimage",
            ("QwenImageTransformer2DModel",),
            (
                BlockListSpec(
                    "transformer_blocks", (ENCODER, HIDDEN), {SELF_ATTN: "attn", FFN: "img_mlp"}, text=TEXT_FIRST
                ),
            ),
        ),
        FamilySpec(
            "cogview",
            (
                "CogView3PlusTransformer2DModel",
                "CogView4Transformer2DModel",
                "GlmImageTransformer2DModel",
                "EasyAnimateTransformer3DModel",
            ),
            (BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_1_SUB_BLOCKS, text=TEXT_FIRST),),
        ),
        FamilySpec(  # linear self-attention over the image tokens (no SDPA: it stays as it is), text by cross-attention
            "sana",
            ("SanaTransformer2DModel", "SanaVideoTransformer3DModel"),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(  # joint sequence: the refiners run on image and text tokens apart, then layers on both together
            "lumina2",
            ("Lumina2Transformer2DModel",),
            (
                BlockListSpec("noise_refiner", (HIDDEN,), _LUMINA_SUB_BLOCKS, text=TEXT_SEPARATE),
                BlockListSpec("context_refiner", (HIDDEN,), _LUMINA_SUB_BLOCKS, text=TEXT_ONLY),
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    _LUMINA_SUB_BLOCKS,
                    text_refused=(
                        "its `layers` attend over one padded sequence per sample, [that sample's valid text tokens, "
                        "image tokens], so the image starts at a different position in each sample of a batch, and "
                        "the blocks get no text argument to tell where"
                    ),
                ),
            ),
        ),
        FamilySpec(
            "lumina_next",
            ("LuminaNextDiT2DModel",),
            (
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    {**_LUMINA_SUB_BLOCKS, SELF_ATTN: "attn1", CROSS_ATTN: "attn2"},
                    text=TEXT_SEPARATE,
                ),
            ),
        ),
        FamilySpec(  # blocks take ``x``; the SigLIP refiner exists only in the image-editing variant
            "z_image",
            ("ZImageTransformer2DModel", "BriaFibo2Transformer2DModel"),
            tuple(
                BlockListSpec(attr, (HIDDEN,), _Z_IMAGE_SUB_BLOCKS, hidden_arg="x", optional=optional, text=text)
                for attr, optional, text in (
                    ("noise_refiner", False, TEXT_SEPARATE),  # image (and Bria-Fibo-2's context image) tokens
                    ("context_refiner", True, TEXT_ONLY),  # Bria-Fibo-2 refines no text
                    ("siglip_refiner", True, TEXT_SEPARATE),  # the edit variant's SigLIP image tokens
                )
            )
            + (
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    _Z_IMAGE_SUB_BLOCKS,
                    hidden_arg="x",
                    text_refused=(
                        "its `layers` attend over one unified sequence whose order depends on the inputs (Z-Image: "
                        "[image, text], or [text, image, SigLIP tokens] when editing; Bria-Fibo-2: [text, image] or, "
                        "with padded prompts, [image, text]), each sample's parts padded to their own lengths, and "
                        "the blocks get no text argument to tell where the text is"
                    ),
                ),
            ),
        ),
        FamilySpec(
            "ernie_image",
            ("ErnieImageTransformer2DModel",),
            (
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    {SELF_ATTN: "self_attention", FFN: "mlp"},
                    hidden_arg="x",
                    text_refused=(
                        "its `layers` take one sequence-first tensor [image, text] whose text length is the "
                        "transformer's `text_bth` argument, never passed to the blocks"
                    ),
                ),
            ),
        ),
        FamilySpec(  # image queries attend to keys [image, text] (query and key lengths differ: its attention stays dense)
            "nucleus_moe",
            ("NucleusMoEImageTransformer2DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), {SELF_ATTN: "attn", FFN: "img_mlp"}, text=TEXT_LAST),),
        ),
        FamilySpec(  # per-modality blocks first (text, image, reference image), then single blocks on all of them
            "flux3",
            ("Flux3Transformer2DModel",),
            (
                BlockListSpec("txt_mode_blocks", (HIDDEN,), _ATTN_FF_SUB_BLOCKS, text=TEXT_ONLY),
                BlockListSpec("mode_blocks.image", (HIDDEN,), _ATTN_FF_SUB_BLOCKS, text=TEXT_SEPARATE),
                BlockListSpec(
                    "mode_blocks.image_cond", (HIDDEN,), _ATTN_FF_SUB_BLOCKS, optional=True, text=TEXT_SEPARATE
                ),
                # the block concatenates [text, image (+ reference image)] for its attention
                BlockListSpec("single_transformer_blocks", (ENCODER, HIDDEN), _ATTN_FF_SUB_BLOCKS, text=TEXT_FIRST),
            ),
        ),
        FamilySpec(  # one sequence of text and image tokens; the text encoder's own blocks are not cached
            "krea2",
            ("Krea2Transformer2DModel",),
            (
                BlockListSpec(
                    "transformer_blocks",
                    (HIDDEN,),
                    _ATTN_FF_SUB_BLOCKS,
                    text_refused=(
                        "its `transformer_blocks` attend over one sequence [text, image] that the transformer "
                        "concatenates before them, and no block of the table gets the text (its text-fusion blocks "
                        "are not cached), so nothing gives the blocks the text length"
                    ),
                ),
            ),
        ),
        FamilySpec(
            "ideogram4",
            ("Ideogram4Transformer2DModel",),
            (
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    {SELF_ATTN: "attention", FFN: "feed_forward"},
                    text_refused=(
                        "its `layers` attend over one sequence whose positions are text or image as the "
                        "transformer's `indicator` argument says (any order, per sample) under a segment mask, and "
                        "get no text argument"
                    ),
                ),
            ),
        ),
        FamilySpec(  # one sequence: text, condition images, then the target image
            "qwenimage21",
            ("QwenImage21Transformer2DModel",),
            (
                BlockListSpec(
                    "transformer_blocks",
                    (HIDDEN,),
                    {SELF_ATTN: "attn", FFN: "img_mlp"},
                    text_refused=(
                        "its `transformer_blocks` attend over one sequence in which the condition images' tokens are "
                        "spliced between the text tokens (where the prompt's image slots are), under a block-causal "
                        "mask, and get no text argument"
                    ),
                ),
            ),
        ),
        FamilySpec(  # one packed sequence of text, audio and video rows
            "minimax_h3",
            ("MiniMaxH3Transformer3DModel",),
            (
                BlockListSpec(
                    "transformer_blocks",
                    (HIDDEN,),
                    _ATTN_FF_SUB_BLOCKS,
                    text_refused=(
                        "its `transformer_blocks` attend over one packed sequence into which the transformer "
                        "scatters the text, video and audio rows at the positions its index arguments give, and get "
                        "no text argument"
                    ),
                ),
            ),
        ),
        FamilySpec(  # Kandinsky 6's fused blocks update the video stream and the audio stream together
            "kandinsky6",
            ("Kandinsky6Transformer3DModel",),
            (BlockListSpec("visual_transformer_blocks", (HIDDEN, ENCODER), hidden_arg="vis", encoder_arg="aud"),),
        ),
        FamilySpec(
            "kandinsky6_sr",
            ("Kandinsky6SRTransformer3DModel",),
            (BlockListSpec("visual_transformer_blocks", (HIDDEN,)),),
        ),
        FamilySpec(  # LTX-2 blocks run video-only in this refiner
            "sana_wm_refiner",
            ("SanaWMLTX2RefinerTransformer3DModel",),
            # attn1 is the video self-attention; text comes through attn2
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(
            "sana_wm",
            ("SanaWMTransformer3DModel",),
            (
                BlockListSpec(  # the text ``y`` enters through cross_attn only
                    "blocks",
                    (HIDDEN,),
                    {SELF_ATTN: "attn", CROSS_ATTN: "cross_attn", FFN: "mlp"},
                    hidden_arg="x",
                    encoder_arg="y",
                    text=TEXT_SEPARATE,
                ),
            ),
        ),
        FamilySpec(
            "wan_animate2",
            ("WanAnimate2Transformer3DModel",),
            (),
            refused=(
                "its blocks write the reference video's keys and values into a per-layer KV cache "
                "(kv_cache_mode='extract') that the denoising calls then read; a reused block would leave its layer's "
                "cache unwritten, and block caching does not manage that state"
            ),
        ),
        FamilySpec(
            "hunyuan_dit",
            ("HunyuanDiT2DModel",),
            # the long skips enter as extra arguments
            (BlockListSpec("blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(
            "hunyuanvideo15",
            ("HunyuanVideo15Transformer3DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN, ENCODER), _JOINT_SUB_BLOCKS, text=TEXT_LAST),),
        ),
        FamilySpec(
            "joyimage",
            ("JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel"),
            (BlockListSpec("double_blocks", (HIDDEN, ENCODER), {SELF_ATTN: "attn", FFN: "img_mlp"}, text=TEXT_LAST),),
        ),
        FamilySpec(  # sub-blocks sit one level down (block.block), so only whole blocks are cached
            "hidream",
            ("HiDreamImageTransformer2DModel",),
            (
                BlockListSpec("double_stream_blocks", (HIDDEN, ENCODER)),
                BlockListSpec("single_stream_blocks", (HIDDEN,)),
            ),
        ),
        FamilySpec(
            "cosmos",
            ("CosmosTransformer3DModel",),
            (BlockListSpec("transformer_blocks", (HIDDEN,), _BASIC_SUB_BLOCKS, text=TEXT_SEPARATE),),
        ),
        FamilySpec(  # the second stream is audio: video and audio tokens update each other every block
            "ltx2",
            ("LTX2VideoTransformer3DModel",),
            (
                BlockListSpec(  # attn1 is the video self-attention; audio and text have attention modules of their own
                    "transformer_blocks",
                    (HIDDEN, ENCODER),
                    _BASIC_SUB_BLOCKS,
                    encoder_arg="audio_hidden_states",
                    text=TEXT_SEPARATE,
                ),
            ),
        ),
        FamilySpec(  # image queries attend to keys [text, image] (query and key lengths differ: it stays dense)
            "prx",
            ("PRXTransformer2DModel",),
            (BlockListSpec("blocks", (HIDDEN,), {SELF_ATTN: "attention"}, text=TEXT_FIRST),),
        ),
        FamilySpec(
            "omnigen",
            ("OmniGenTransformer2DModel",),
            (
                BlockListSpec(
                    "layers",
                    (HIDDEN,),
                    {SELF_ATTN: "self_attn", FFN: "mlp"},
                    text_refused=(
                        "its `layers` attend over one sequence [prompt tokens with the input images' tokens spliced "
                        "in, a time token, image tokens] under a full attention mask, and get no text argument"
                    ),
                ),
            ),
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
    return [name for name, spec in FAMILIES.items() if not spec.refused]


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
        f"{', '.join(supported_families())}; other diffusers transformers work when their blocks sit in a torch.nn.ModuleList "
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


def _child(model: torch.nn.Module, attr: str):
    """``model.<attr>``, where ``attr`` may be dotted through ModuleDicts (Flux 3's ``mode_blocks.image``)."""
    for part in attr.split("."):
        if isinstance(model, torch.nn.ModuleDict):
            model = model[part] if part in model else None
        else:
            model = getattr(model, part, None)
    return model


def resolve_adapter(model: torch.nn.Module) -> ModelAdapter:
    """Locate every cacheable block of ``model`` (a diffusers transformer), or raise UnsupportedModelError."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"expected a diffusers transformer (torch.nn.Module) or pipeline, got {type(model).__name__}"
        )
    family = _family_of(model)
    if family is not None and family.refused:
        raise _unsupported(model, family.refused)
    block_lists = family.block_lists if family is not None else _generic_block_lists(model)
    if not block_lists:
        raise _unsupported(model, "no list of transformer blocks with a known return convention was found")
    blocks = []
    for spec in block_lists:
        container = _child(model, spec.attr)
        if spec.optional and (container is None or len(container) == 0):
            continue
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
