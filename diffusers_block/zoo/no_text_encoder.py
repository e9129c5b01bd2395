"""What fills the text-encoder and tokenizer slots of the shipped class-conditioned stock pipelines.

The digits models are a stock ``StableDiffusion3Pipeline`` and a stock ``WanPipeline`` conditioned through
``prompt_embeds`` from a label encoder (``label_encoder/``), so they have no tokenizer or text encoder. Saved as
``None``, those slots read ``[null, null]`` in ``model_index.json``, and diffusers refuses to load a pipeline with a
null component that the class does not list in ``_optional_components`` (neither class lists its text encoders): plain
``DiffusionPipeline.from_pretrained(folder)`` failed. A :class:`NoTextEncoder` in each slot loads like any component
(a config and an empty tensor), moves with the pipeline, and where a prompt string would be encoded it raises an error that
says how to condition this model instead. diffusers logs that the text-encoder slots hold an unexpected type; that is
this class, and it is meant.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

#: The slots each pipeline class fills with a NoTextEncoder.
TEXT_SLOTS = {
    "StableDiffusion3Pipeline": tuple(f"{kind}{n}" for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")),
    "WanPipeline": ("text_encoder", "tokenizer"),
}


class NoTextEncoder(ModelMixin, ConfigMixin):
    """Stands in a text-encoder or tokenizer slot of a label-conditioned pipeline; calling it explains what to pass."""

    @register_to_config
    def __init__(self, model_max_length: int = 77):
        super().__init__()
        self.model_max_length = model_max_length  # read by SD3's __init__ from its tokenizer slot
        # An empty tensor, so that the pipeline's device and dtype (read from its first module) follow .to().
        self.register_buffer("anchor", torch.zeros(0))  # saved too: diffusers loads no model without weights

    def forward(self, *args, **kwargs):
        raise TypeError(
            "This pipeline is conditioned on labels, not text: it has no tokenizer or text encoder. Pass the label "
            "encoder's embeddings (prompt_embeds and negative_prompt_embeds, pooled ones for SD3), e.g. "
            "`encoder = LabelEncoder.from_pretrained(f'{folder}/label_encoder')` (ClipLabelEncoder for the video "
            "model, both in diffusers_block.zoo) and `pipe(**encoder.prompt_kwargs(...))`."
        )


def fill_text_slots(pipe) -> None:
    """Put a :class:`NoTextEncoder` in each empty text slot of ``pipe`` (before ``save_pretrained``)."""
    for slot in TEXT_SLOTS[type(pipe).__name__]:
        if getattr(pipe, slot, None) is None:
            pipe.register_modules(**{slot: NoTextEncoder()})


def null_components(folder: Path) -> dict[str, None]:
    """``{slot: None}`` for each component saved as ``[null, null]`` in ``folder/model_index.json``: what
    ``from_pretrained`` must be passed again to load a folder saved with empty slots (e.g. by an older release)."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in index.items() if value in ([None, None], None) and not name.startswith("_")}


def is_absent(component) -> bool:
    """Whether a pipeline slot holds no usable text component: None, or a :class:`NoTextEncoder`."""
    return component is None or isinstance(component, NoTextEncoder)


@contextmanager
def expected_placeholders():
    """Within the block, diffusers does not log that the text slots hold a :class:`NoTextEncoder` (the zoo loaders
    know they do; a plain ``from_pretrained`` still says so)."""
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    quiet = _DropExpectedTypes()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _DropExpectedTypes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for") and NoTextEncoder.__name__ in message)
