"""Where a shipped model lives, the same way from a source checkout and from an installed package.

The trained models (``models/`` in the repository) are too large for the wheel, so an installed package has none of
its own. A model folder is found from, in order: an explicit path (used as given, never second-guessed), the
``DIFFUSERS_BLOCK_MODELS`` environment variable (a folder holding ``digits-image/``, ``digits-video/``...: e.g. a
clone's ``models/``), then the repository's ``models/`` beside the package (a source checkout or an editable
install). A folder counts when it holds ``model_index.json`` (a pipeline) or ``config.json`` (a single model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "DIFFUSERS_BLOCK_MODELS"
#: ``models/`` of the source checkout this package sits in (absent in an installed wheel).
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
#: The models the repository ships and how to make each again (the command an error suggests).
SHIPPED = {
    "digits-image": "python -m diffusers_block.train digits-image --out {path}",
    "digits-video": "python -m diffusers_block.train digits-video --out {path}",
    "digit-classifier": "python -m diffusers_block.eval.classifier --out {path}",
    "policy-metaworld": "python -m diffusers_block.train policy --out {path}",
    "digits-image-distilled": "python -m diffusers_block.train distill --teacher models/digits-image --out {path}",
}
#: How to make each model, the shipped ones and those the repository does not ship yet.
RECIPES = {
    **SHIPPED,
    "digits-video-distilled": "python -m diffusers_block.train distill --teacher models/digits-video --guidance 5 "
    "--out {path}",
}


class ModelNotFoundError(FileNotFoundError):
    """No folder holds the requested model; the message names every place looked at."""


def holds_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def model_path(
    name: str,
    path: str | os.PathLike | None = None,
    train_command: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The folder of model ``name`` (e.g. ``"digits-image"``): ``path`` if given, else ``$DIFFUSERS_BLOCK_MODELS/name``,
    else the source checkout's ``models/name``; :class:`ModelNotFoundError` naming all three when none holds it.
    ``train_command``: what the error suggests to make the model (default: its recipe in :data:`RECIPES`)."""
    if path is not None:
        folder = Path(path).expanduser()
        if holds_model(folder):
            return folder
        raise ModelNotFoundError(
            f"No {name} model at {folder} (no model_index.json or config.json there). {_make(name, folder, train_command)}"
        )
    looked = ["1. an explicit path: none given"]
    root = environ.get(ENV_VAR)
    if root:
        folder = Path(root).expanduser() / name
        if holds_model(folder):
            return folder
        looked.append(f"2. ${ENV_VAR}/{name}: {folder} holds no model")
    else:
        looked.append(f"2. ${ENV_VAR}/{name}: {ENV_VAR} is not set")
    folder = REPO_MODELS / name
    if holds_model(folder):
        return folder
    looked.append(
        f"3. the source checkout's models/{name}: {folder} holds no model (an installed package ships no models)"
    )
    raise ModelNotFoundError(
        f"No {name} model found. Looked at: {'; '.join(looked)}. Pass its folder as a path, or set {ENV_VAR} to a "
        f"folder holding {name}/ (e.g. the models/ folder of a clone of the repository). {_make(name, None, train_command)}"
    )


def _make(name: str, folder: Path | None, train_command: str | None) -> str:
    command = train_command or RECIPES.get(name)
    if command is None:
        return ""
    return f"Train one with `{command.format(path=folder if folder is not None else f'models/{name}')}`."
