"""The Gradio demo (``python app.py``): every acceleration, baseline and accelerated side by side.

A tab is one module with one class, registered in :data:`TABS`. The class takes the device, has a ``key`` (the
prefix of its elements' ids in the page, which the browser test uses), a ``title``, and ``build()``, which creates
its widgets and events inside an open ``gr.Tab``. Its generate method takes plain values and returns plain results,
so it is tested without a page. A tab whose model or feature is missing on this install names itself in
``available()`` (returning why not), and the demo leaves it out.

Shared pieces: ``controls`` (the cache-policy widgets), ``sparse`` (the sparse-attention widgets, where the feature
exists), ``checks`` (typed values checked, with messages for the page), ``runner`` (baseline vs accelerated on one
pipeline under its lock: the reason concurrent users never share cache state), ``render`` (grids, heatmap, table),
``page`` (errors as in-page messages, progress).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home: the demo must start offline

from .._extras import require  # noqa: E402

gr = require("demo", "gradio")

from .image import DigitsImageTab  # noqa: E402
from .pipeline import AnyPipelineTab  # noqa: E402
from .policy import PolicyTab  # noqa: E402
from .video import DigitsVideoTab  # noqa: E402

TABS: list[type] = [DigitsImageTab, DigitsVideoTab, PolicyTab, AnyPipelineTab]

THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)  # no web fonts: the page works offline

INTRO = """# diffusers-block

Block-wise feature caching, sparse attention and distilled students for diffusers' diffusion transformers. Each tab
generates the same seed twice, **baseline** and **accelerated** (a block cache, sparse attention, or a distilled
student beside its teacher), and shows what the acceleration saved and what it cost."""


def build_demo(device: str = "cpu") -> gr.Blocks:
    """The demo's page for models on ``device``; launch it with ``.launch(theme=THEME)``."""
    # delete_cache: generated pictures and clips older than an hour leave the server's cache every hour
    with gr.Blocks(title="diffusers-block demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            for tab_class in TABS:
                reason = getattr(tab_class, "available", lambda: None)()
                if reason:
                    continue
                tab = tab_class(device)
                with gr.Tab(tab.title, id=tab.key, elem_id=f"tab-{tab.key}"):
                    tab.build()
    return demo


__all__ = ["TABS", "THEME", "build_demo"]
