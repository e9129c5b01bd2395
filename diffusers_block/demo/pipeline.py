"""Any-pipeline tab: load a diffusers pipeline by hub id or local folder, then compare baseline and cached runs.

Loading never shows a traceback: a missing folder, a folder that is not a pipeline, a hub id without internet
access, a family diffusers-block cannot cache (``UnsupportedModelError``) and a pipeline the demo cannot drive (saved
without its text encoder) each come back as one message in the page. Text-to-image and text-to-video pipelines are
driven by a prompt, class-conditional ones (DiT) by class labels or names.

One loaded pipeline is kept for all sessions (the last one asked for); each session remembers which source it loaded
and gets it back, reloaded if another session has loaded something else since.
"""

from __future__ import annotations

import gc
import inspect
import json
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
from .page import DIFFERENCE_GAIN, ComparisonView, acceleration_inputs, in_page, reporter
from .runner import Report, SideBySide, side_by_side, transformers_of
from .sparse import SPARSE_OFF, SparseSettings, mask_image

MAX_SIDE = 4096
MAX_FRAMES_SHOWN = 8
CALIBRATION_SEED_OFFSET = 1000  # BAC calibrates on another seed than the one shown


class PipelineLoadError(ValueError):
    """A pipeline could not be loaded or cannot be used by the demo; the message is meant for the page."""


@dataclass(frozen=True)
class PipelineInfo:
    source: str
    pipeline_class: str
    transformers: tuple[str, ...]  # "transformer: SD3Transformer2DModel (family sd3, 24 blocks)"
    conditioning: str  # "prompt" or "class_labels"

    def markdown(self, device: str, dtype: torch.dtype) -> str:
        parts = "; ".join(self.transformers)
        how = "a text prompt" if self.conditioning == "prompt" else "class labels (numbers or names)"
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
            "Enter a hub id (e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) or a local folder saved with "
            "`pipe.save_pretrained(folder)`."
        )
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
    except Exception as error:  # whatever the hub client or a component raises: one line in the page
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        hint = (
            ""
            if looks_local
            else (
                " A hub id needs internet access (or the model already in the Hugging Face cache); "
                "otherwise give a local folder."
            )
        )
        raise PipelineLoadError(
            f"Could not load `{source}`: {type(error).__name__}: {first_line[:500]}.{hint}"
        ) from error
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
    conditioning = _conditioning(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, PipelineInfo(source, type(pipe).__name__, tuple(described), conditioning)


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


def call_kwargs(pipe, conditioning: str, request: PipelineRequest, device: str) -> dict:
    """The keyword arguments of ``pipe(**kwargs)`` for ``request``, limited to what its __call__ takes."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict = {"num_inference_steps": request.steps}
    if conditioning == "class_labels":
        kwargs["class_labels"] = _class_labels(pipe, request.prompt)
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
        with self.store.use(source) as (pipe, info):
            call_kwargs(pipe, info.conditioning, request, self.device)  # checks the prompt or labels before any run
            config, sparse_config = accelerations(
                settings, sparse, request.steps, lambda p: self._run(p, info.conditioning, calibration)
            )
            result = side_by_side(
                pipe,
                lambda p: self._run(p, info.conditioning, request),
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

    def _run(self, pipe, conditioning: str, request: PipelineRequest) -> torch.Tensor:
        with torch.no_grad():
            return to_tensor(pipe(**call_kwargs(pipe, conditioning, request, self.device)))

    # -- page ---------------------------------------------------------------------------------------------------
    def build(self) -> None:
        k = self.key
        gr.Markdown(
            "Load any diffusers pipeline with a transformer denoiser: a hub id (needs internet access) or a "
            "local folder saved with `save_pretrained`. Text pipelines take a prompt; DiT takes class labels."
        )
        loaded = gr.State(None)  # the source this session loaded
        with gr.Row():
            source = gr.Textbox(
                label="hub id or local folder",
                placeholder="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                scale=4,
                elem_id=f"{k}-source",
            )
            load_button = gr.Button("Load", scale=1, elem_id=f"{k}-load")
        status = gr.Markdown("No pipeline loaded.", elem_id=f"{k}-status")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    PipelineRequest.prompt, label="prompt (or class labels for DiT: `1, 207`)", elem_id=f"{k}-prompt"
                )
                with gr.Row():
                    steps = gr.Slider(1, 200, value=PipelineRequest.steps, step=1, label="steps")
                    seed = gr.Number(0, precision=0, label="seed")
                    guidance = gr.Number(PipelineRequest.guidance, label="guidance scale")
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
                return f"**Cannot use this pipeline.** {error}", None
            return info.markdown(self.device, self.store.dtype), info.source

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

            def run():
                try:
                    return self.generate(
                        values[loaded],
                        request,
                        inputs.controls.settings(values),
                        reporter(progress),
                        inputs.sparse_settings(values),
                    )
                except PipelineLoadError as error:  # the held pipeline was replaced and can no longer be loaded
                    raise gr.Error(str(error)) from error

            return view.values(in_page(run).pictures)

        load_button.click(on_load, inputs=source, outputs=[status, loaded])
        source.submit(on_load, inputs=source, outputs=[status, loaded])
        inputs.button.click(
            on_generate,
            inputs={loaded, prompt, steps, seed, guidance, height, width, *inputs.components},
            outputs=view.outputs,
        )
