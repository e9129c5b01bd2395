"""Any-pipeline tab: load a diffusers pipeline by hub id or local folder, then compare baseline and cached runs.

It works offline out of the box: the source list offers the shipped digits models and a tiny random-weight DiT
built in memory, and any other hub id or folder can be typed in. Loading never shows a traceback: a missing folder,
a folder that is not a pipeline, a hub id without internet access, a family diffusers-block cannot cache
(``UnsupportedModelError``) and a pipeline the demo cannot drive (saved without its text encoder) each come back as
one sentence in the page, and so do the failures of a run: nothing raises into Gradio, so no red error badge stays
on the outputs. The prompt field follows the loaded pipeline: a prompt for text pipelines, class labels or names for
DiT, digits (and motions) for the shipped digits models, which read labels through their label encoders.

One loaded pipeline is kept for all sessions (the last one asked for); each session remembers which source it loaded
and gets it back, reloaded if another session has loaded something else since.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..models import UnsupportedModelError, resolve_adapter, supported_families
from ..zoo.no_text_encoder import is_absent, null_components
from . import render
from .checks import check_repeats, check_seed, check_steps
from .controls import (
    CacheSettings,
    accelerations,
)
from .page import DIFFERENCE_GAIN, ComparisonView, acceleration_inputs, reporter
from .runner import Report, SideBySide, cpu_threads, limited_threads, side_by_side, transformers_of
from .sparse import SPARSE_OFF, SparseSettings, mask_image

MAX_SIDE = 4096
MAX_FRAMES_SHOWN = 8
CALIBRATION_SEED_OFFSET = 1000  # BAC calibrates on another seed than the one shown
logger = logging.getLogger(__name__)
TINY_DIT = "tiny random-weight DiT (built in memory, no download)"
#: The sources the dropdown offers: every one loads offline (the shipped models where this install has them).
SHIPPED = {"models/digits-image": "digits-image", "models/digits-video": "digits-video"}
#: What the prompt field asks for, per kind of conditioning: (label, example value).
PROMPTS = {
    "prompt": ("prompt", "a red fox running through snow"),
    "class_labels": ("class labels: numbers, or label names the pipeline knows", "1, 2, 3"),
    "digits": ("digits to draw (class labels 0-9)", "3, 1, 4"),
    "digit_motions": (
        "digits and motions (e.g. `3 right, 7 up`; motions: right, up_right, up, up_left, left, down_left, down, "
        "down_right)",
        "2 right, 5 right",
    ),
}


class PipelineLoadError(ValueError):
    """A pipeline could not be loaded or cannot be used by the demo; the message is meant for the page."""


@dataclass(frozen=True)
class PipelineInfo:
    source: str
    pipeline_class: str
    transformers: tuple[str, ...]  # "transformer: SD3Transformer2DModel (family sd3, 24 blocks)"
    conditioning: str  # a key of PROMPTS
    encoder: object = None  # the shipped digits models' label encoder
    call_defaults: tuple[tuple[str, object], ...] = ()  # fixed call kwargs (the shipped video model's frames, size)

    def markdown(self, device: str, dtype: torch.dtype) -> str:
        parts = "; ".join(self.transformers)
        how = PROMPTS[self.conditioning][0].split(" (")[0].split(":")[0]
        return (
            f"Loaded **{self.pipeline_class}** from `{self.source}` on `{device}` ({str(dtype).removeprefix('torch.')})"
            f": {parts}. Driven by {how}."
        )


def load_pipeline(source: str, device: str, dtype: torch.dtype):
    """``DiffusionPipeline.from_pretrained(source)`` checked for what the demo needs: (pipe, PipelineInfo)."""
    from diffusers import DiffusionPipeline

    source = (source or "").strip()
    if not source:
        raise PipelineLoadError(
            "Pick a pipeline from the list, or enter a hub id (e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) or a local "
            "folder saved with `pipe.save_pretrained(folder)`."
        )
    if source == TINY_DIT:
        pipe = tiny_dit()
        return _checked(pipe, source, "class_labels", device)
    if source in SHIPPED:
        return _load_shipped(source, device, dtype)
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise PipelineLoadError(f"No folder at `{path}`. Give a folder saved with `pipe.save_pretrained(folder)`.")
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(
                f"`{path}` has no model_index.json, so it is not a diffusers pipeline folder "
                f"(save one with `pipe.save_pretrained(folder)`)."
            )
    # Components saved as None (e.g. a pipeline saved without its text encoders) must be passed as None again.
    absent = _null_components(path) if looks_local else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else source, dtype=dtype, **absent)
    except Exception as error:  # whatever the hub client or a component raises: one sentence in the page
        logger.warning("loading %s failed", source, exc_info=True)  # the details go to the server's log
        if looks_local:
            raise PipelineLoadError(
                f"Could not load `{source}` as a diffusers pipeline ({type(error).__name__}): check that the folder "
                f"was written by `pipe.save_pretrained(folder)` with this diffusers release."
            ) from error
        raise PipelineLoadError(
            f"Could not load `{source}` ({type(error).__name__}): a hub id needs internet access or the model in "
            f"the Hugging Face cache; otherwise pick a shipped model or give a local folder."
        ) from error
    return _checked(pipe, source, None, device)


def tiny_dit():
    """A DiTPipeline with random weights (3 blocks, 8x8 latents, a 1-block autoencoder), built from configs in
    memory: the tab has something to run offline on any install. Its pictures are noise; its numbers are real."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, num_layers=3, in_channels=4, out_channels=8, sample_size=8
    )
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=8)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)


def _load_shipped(source: str, device: str, dtype: torch.dtype):
    """A shipped digits model through the zoo: its label encoder turns digits (and motions) into embeddings."""
    from ..zoo import ModelNotFoundError, load_digits_image_pipeline, load_digits_video_pipeline

    name = SHIPPED[source]
    try:
        if name == "digits-image":
            pipe, encoder = load_digits_image_pipeline(device=device, dtype=dtype)
            return _checked(pipe, source, "digits", device, encoder)
        pipe, encoder = load_digits_video_pipeline(device=device, dtype=dtype)
        defaults = (("num_frames", 17), ("height", 32), ("width", 32))
        return _checked(pipe, source, "digit_motions", device, encoder, defaults)
    except ModelNotFoundError as error:
        raise PipelineLoadError(f"This install has no `{source}` (the shipped models live in the checkout).") from error


def _checked(pipe, source: str, conditioning: str | None, device: str, encoder=None, call_defaults=()):
    """``pipe`` checked for what the demo needs (a transformer of a supported family, a way to condition it)."""
    try:
        described = []
        models = transformers_of(pipe)
        if not models:
            components = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
            raise UnsupportedModelError(
                f"{type(pipe).__name__} has no transformer component (its model components: {components}); "
                f"diffusers-block caches diffusion transformers, not UNets."
            )
        for name, module in pipe.components.items():
            if any(module is model for model in models):
                adapter = resolve_adapter(module)
                described.append(
                    f"{name}: {type(module).__name__} (family {adapter.family}, {len(adapter.blocks)} blocks)"
                )
    except UnsupportedModelError as error:
        raise PipelineLoadError(
            f"Loaded {type(pipe).__name__}, but diffusers-block cannot accelerate it: {error} "
            f"Supported families: {', '.join(supported_families())}."
        ) from error
    conditioning = conditioning or _conditioning(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, PipelineInfo(source, type(pipe).__name__, tuple(described), conditioning, encoder, call_defaults)


def _null_components(folder: Path) -> dict[str, None]:
    try:
        return null_components(folder)
    except (OSError, json.JSONDecodeError) as error:
        raise PipelineLoadError(f"Cannot read `{folder / 'model_index.json'}`: {error}") from error


def _conditioning(pipe) -> str:
    params = inspect.signature(pipe.__call__).parameters
    if "class_labels" in params:
        return "class_labels"
    if "prompt" in params:
        encoders = {n: m for n, m in pipe.components.items() if n.startswith(("text_encoder", "tokenizer"))}
        if encoders and all(is_absent(m) for m in encoders.values()):
            raise PipelineLoadError(
                f"Loaded {type(pipe).__name__}, but it was saved without its text encoders and tokenizers "
                f"({', '.join(encoders)}), so the demo cannot turn a prompt into embeddings. Load a complete "
                f"pipeline, or call it in Python with precomputed `prompt_embeds`."
            )
        return "prompt"
    raise PipelineLoadError(
        f"Loaded {type(pipe).__name__}, but the demo drives pipelines by `prompt` or `class_labels` and its "
        f"__call__ takes neither."
    )


class PipelineStore:
    """The last loaded pipeline, shared by all sessions, used by one request at a time (see ``runner``)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self._lock = threading.Lock()
        self._pipe = None
        self._info: PipelineInfo | None = None

    def load(self, source: str) -> PipelineInfo:
        with self._lock:
            return self._load(source)

    def _load(self, source: str) -> PipelineInfo:
        source = (source or "").strip()
        if self._info is not None and self._info.source == source:
            return self._info
        self._pipe, self._info = None, None  # free the previous pipeline before loading the next one
        gc.collect()
        self._pipe, self._info = load_pipeline(source, self.device, self.dtype)
        return self._info

    @contextmanager
    def use(self, source: str) -> Iterator[tuple[object, PipelineInfo]]:
        with self._lock:
            info = self._load(source)
            yield self._pipe, info


@dataclass(frozen=True)
class PipelineRequest:
    prompt: str = "a red fox running through snow"
    steps: int = 20
    seed: int = 0
    guidance: float = 4.0
    height: int = 0  # 0: the pipeline's default
    width: int = 0
    repeats: int = 1  # timed runs per side

    def checked(self) -> PipelineRequest:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is None or value != int(value) or (value and not (16 <= value <= MAX_SIDE and value % 8 == 0)):
                raise gr.Error(
                    f"{name.capitalize()} must be 0 (the pipeline's default) or a multiple of 8 in [16, {MAX_SIDE}], "
                    f"got {value!r}."
                )
        if self.guidance is None or not 0.0 <= float(self.guidance) <= 30.0:
            raise gr.Error(f"Guidance scale must be in [0, 30], got {self.guidance!r}.")
        return PipelineRequest(
            (self.prompt or "").strip(),
            check_steps(self.steps, low=1),
            check_seed(self.seed),
            float(self.guidance),
            int(self.height),
            int(self.width),
            check_repeats(self.repeats),
        )


@dataclass
class PipelineResult:
    info: PipelineInfo
    comparison: SideBySide
    pictures: render.Pictures


def call_kwargs(pipe, info: PipelineInfo, request: PipelineRequest, device: str) -> dict:
    """The keyword arguments of ``pipe(**kwargs)`` for ``request``, limited to what its __call__ takes."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict = {"num_inference_steps": request.steps, **dict(info.call_defaults)}
    conditioning = info.conditioning
    dtype = pipe.transformer.dtype
    if conditioning == "class_labels":
        kwargs["class_labels"] = _class_labels(pipe, request.prompt)
    elif conditioning == "digits":
        kwargs.update(info.encoder.prompt_kwargs(_digits(request.prompt), dtype=dtype))
    elif conditioning == "digit_motions":
        digits, motions = _digit_motions(request.prompt)
        kwargs.update(info.encoder.prompt_kwargs(digits, motions, dtype=dtype))
    else:
        if not request.prompt:
            raise gr.Error("Enter a prompt.")
        kwargs["prompt"] = request.prompt
    if "guidance_scale" in params:
        kwargs["guidance_scale"] = request.guidance
    for name in ("height", "width"):
        value = getattr(request, name)
        if value:
            if name not in params:
                gr.Warning(f"{type(pipe).__name__} takes no {name}: its resolution is fixed by its config.")
            else:
                kwargs[name] = value
    if "output_type" in params:
        kwargs["output_type"] = "np"
    kwargs["generator"] = torch.Generator(device).manual_seed(request.seed)
    return kwargs


def _items(text: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]


def _digits(text: str) -> torch.Tensor:
    items = _items(text)
    if not items or not all(item.isdigit() and int(item) <= 9 for item in items):
        raise gr.Error(f"Enter digits 0-9 separated by commas, e.g. `3, 1, 4`; got `{text}`.")
    return torch.tensor([int(item) for item in items])


def _digit_motions(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``"3 right, 7 up"``: one clip per item, a digit and a motion (``right`` when left out)."""
    from ..data.digits import MOTIONS

    digits, motions = [], []
    for item in _items(text):
        digit, _, motion = item.partition(" ")
        motion = motion.strip() or "right"
        if not digit.isdigit() or int(digit) > 9 or motion not in MOTIONS:
            raise gr.Error(
                f"Each clip is a digit 0-9 and a motion ({', '.join(MOTIONS)}), e.g. `3 right, 7 up`; got `{item}`."
            )
        digits.append(int(digit))
        motions.append(MOTIONS.index(motion))
    if not digits:
        raise gr.Error("Enter one or more clips as a digit and a motion, e.g. `3 right, 7 up`.")
    return torch.tensor(digits), torch.tensor(motions)


def _class_labels(pipe, text: str) -> list[int]:
    """Class ids from "3, 7" or from label names known to the pipeline ("golden retriever, tabby")."""
    items = [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]
    if not items:
        raise gr.Error("Enter one or more class labels, e.g. `1, 207` (or label names the pipeline knows).")
    count = getattr(getattr(pipe, "transformer", None), "config", {}).get("num_embeds_ada_norm")
    labels = []
    for item in items:
        if item.lstrip("-").isdigit():
            labels.append(int(item))
        else:
            try:
                labels.extend(pipe.get_label_ids(item))
            except (ValueError, AttributeError, TypeError, KeyError) as error:
                raise gr.Error(f"`{item}` is neither a class number nor a label name this pipeline knows.") from error
    if count is not None and any(not 0 <= label < count for label in labels):
        raise gr.Error(f"Class labels must be in [0, {count - 1}] for this model, got {labels}.")
    return labels


def to_tensor(output) -> torch.Tensor:
    """A pipeline's images or frames as a float tensor in [0, 1]: (B, C, H, W) or (B, T, C, H, W)."""
    for name in ("images", "frames"):
        if hasattr(output, name):
            output = getattr(output, name)
            break
    else:
        if isinstance(output, tuple):
            output = output[0]
    if isinstance(output, torch.Tensor):
        return output.float().cpu()
    if isinstance(output, list) and output and isinstance(output[0], list):  # videos as lists of PIL frames
        return torch.stack([to_tensor(frames) for frames in output])
    if isinstance(output, list) and output and isinstance(output[0], Image.Image):
        output = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in output])
    if isinstance(output, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(output)).float()
        return tensor.movedim(-1, -3)  # (..., H, W, C) -> (..., C, H, W)
    raise TypeError(f"cannot read images from a pipeline output of type {type(output).__name__}")


def preview(output: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Images to show and the grid width: the batch, or up to 8 evenly spaced frames of the first video."""
    if output.ndim == 5:
        frames = output[0]
        index = torch.linspace(0, len(frames) - 1, min(MAX_FRAMES_SHOWN, len(frames))).round().long()
        return frames[index], len(index)
    return output, len(output)


class AnyPipelineTab:
    key = "pipeline"
    title = "Any pipeline"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.store = PipelineStore(device)

    def load(self, source: str) -> PipelineInfo:
        """Load ``source`` (replacing the pipeline held); raises PipelineLoadError with a message for the page."""
        return self.store.load(source)

    def generate(
        self,
        source: str,
        request: PipelineRequest,
        settings: CacheSettings,
        report: Report | None = None,
        sparse: SparseSettings = SPARSE_OFF,
    ) -> PipelineResult:
        if not source:
            raise gr.Error("Load a pipeline first.")
        request = request.checked()
        calibration = replace(request, seed=request.seed + CALIBRATION_SEED_OFFSET)
        with self.store.use(source) as (pipe, info), self._threads(info):
            call_kwargs(pipe, info, request, self.device)  # checks the prompt or labels before any run
            config, sparse_config = accelerations(
                settings, sparse, request.steps, lambda p: self._run(p, info, calibration)
            )
            result = side_by_side(
                pipe,
                lambda p: self._run(p, info, request),
                config,
                report,
                None,  # transformer calls per step vary by pipeline: a running count until the baseline has one
                request.repeats,
                sparse_config,
            )
        base, columns = preview(result.baseline.output)
        fast, _ = preview(result.accelerated.output)
        pictures = render.pictures(
            base,
            fast,
            result,
            render.metrics_table(result, self.device),
            columns=columns,
            cell=128,
            gain=DIFFERENCE_GAIN,
            title=render.heatmap_title(settings.label, result),
            mask=mask_image(result.sparse_summary, sparse.layer, sparse.head) if result.sparse_summary else None,
        )
        return PipelineResult(info, result, pictures)

    def _threads(self, info: PipelineInfo):
        """One CPU thread for the tiny models the list offers (see ``runner.CPU_THREADS``); others keep torch's."""
        offered = info.source in SHIPPED or info.source == TINY_DIT
        return cpu_threads(self.device) if offered else limited_threads(None)

    def _run(self, pipe, info: PipelineInfo, request: PipelineRequest) -> torch.Tensor:
        with torch.no_grad():
            return to_tensor(pipe(**call_kwargs(pipe, info, request, self.device)))

    # -- page ---------------------------------------------------------------------------------------------------
    def sources(self) -> list[str]:
        """What the dropdown offers: the shipped models this install has, then the tiny random-weight DiT."""
        from ..zoo import ModelNotFoundError, model_path

        shipped = []
        for source, name in SHIPPED.items():
            try:
                model_path(name)
            except ModelNotFoundError:
                continue
            shipped.append(source)
        return [*shipped, TINY_DIT]

    def build(self) -> None:
        k = self.key
        gr.Markdown(
            "Load a diffusers pipeline with a transformer denoiser: one of the list (all offline: the shipped models, "
            "and a tiny random-weight DiT whose pictures are noise but whose numbers are real), or type a hub id "
            "(needs internet access) or a local folder saved with `save_pretrained`. The prompt field follows what "
            "the loaded pipeline is conditioned on."
        )
        loaded = gr.State(None)  # the source this session loaded
        choices = self.sources()
        with gr.Row():
            source = gr.Dropdown(
                choices,
                value=choices[0],
                allow_custom_value=True,
                label="pipeline: pick one, or type a hub id or a local folder",
                scale=4,
                elem_id=f"{k}-source",
            )
            load_button = gr.Button("Load", scale=1, elem_id=f"{k}-load")
        status = gr.Markdown("No pipeline loaded: pick one and press *Load*.", elem_id=f"{k}-status")
        with gr.Row():
            with gr.Column(scale=2):
                label, example = PROMPTS["prompt"]
                prompt = gr.Textbox(example, label=label, elem_id=f"{k}-prompt")
                with gr.Row():
                    steps = gr.Slider(1, 200, value=PipelineRequest.steps, step=1, label="steps")
                    seed = gr.Number(0, precision=0, label="seed")
                    guidance = gr.Number(PipelineRequest.guidance, label="guidance scale", elem_id=f"{k}-guidance")
                with gr.Row():
                    height = gr.Number(0, precision=0, label="height (0: default)")
                    width = gr.Number(0, precision=0, label="width (0: default)")
                inputs = acceleration_inputs(k, self.device)
            with gr.Column(scale=3):
                view = ComparisonView(k, DIFFERENCE_GAIN)
                view.add_mask()
        view.add_heatmap("cache heatmap: steps x units (blue: computed, orange: reused, grey: not run)")

        def on_load(text: str, progress=gr.Progress()):  # noqa: B008 (Gradio injects the bar this way)
            progress(0, desc=f"loading {text}")
            try:
                info = self.load(text)
            except PipelineLoadError as error:
                return f"**Cannot use this pipeline.** {error}", None, gr.update(), gr.update(), *view.cleared()
            label, example = PROMPTS[info.conditioning]
            shipped_guidance = 3.0 if info.conditioning in ("digits", "digit_motions") else gr.update()
            return (
                info.markdown(self.device, self.store.dtype),
                info.source,
                gr.update(label=label, value=example),
                shipped_guidance,
                *view.cleared("Press *Generate* to run both."),
            )

        def on_generate(values: dict, progress=gr.Progress()):  # noqa: B008 (Gradio injects the bar this way)
            request = PipelineRequest(
                values[prompt],
                values[steps],
                values[seed],
                values[guidance],
                values[height],
                values[width],
                values[inputs.repeats],
            )
            try:
                result = self.generate(
                    values[loaded],
                    request,
                    inputs.controls.settings(values),
                    reporter(progress),
                    inputs.sparse_settings(values),
                )
            except (gr.Error, PipelineLoadError) as error:  # a message in the page, where the numbers go
                return view.cleared(f"**Could not run.** {error.message if isinstance(error, gr.Error) else error}")
            except Exception as error:  # anything else: one sentence, the traceback in the server's log
                logger.exception("the any-pipeline run failed")
                return view.cleared(f"**Could not run.** {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            return view.values(result.pictures)

        load_outputs = [status, loaded, prompt, guidance, *view.outputs]
        load_button.click(on_load, inputs=source, outputs=load_outputs)
        inputs.button.click(
            on_generate,
            inputs={loaded, prompt, steps, seed, guidance, height, width, *inputs.components},
            outputs=view.outputs,
        )
