"""Shipped models are found the same way from a checkout and an installed package: path, environment, repo."""

import json
from pathlib import Path

import pytest

from diffusers_block.zoo import locate
from diffusers_block.zoo.locate import ENV_VAR, ModelNotFoundError, model_path


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({}))
    return folder


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An explicit folder, an environment folder and a repo folder, each holding digits-image."""
    repo = tmp_path / "repo-models"
    monkeypatch.setattr(locate, "REPO_MODELS", repo)
    return {
        "explicit": _model(tmp_path / "mine"),
        "env": _model(tmp_path / "env-models" / "digits-image").parent,
        "repo": _model(repo / "digits-image").parent,
    }


def test_explicit_path_then_environment_then_repo(places):
    env = {ENV_VAR: str(places["env"])}
    assert model_path("digits-image", places["explicit"], environ=env) == places["explicit"]
    assert model_path("digits-image", environ=env) == places["env"] / "digits-image"
    assert model_path("digits-image", environ={}) == places["repo"] / "digits-image"
    # an environment folder without this model falls through to the repo
    assert model_path("digits-image", environ={ENV_VAR: str(places["explicit"])}) == places["repo"] / "digits-image"


def test_an_explicit_path_is_used_as_given(places, tmp_path):
    with pytest.raises(ModelNotFoundError, match="python -m diffusers_block.train digits-image --out"):
        model_path("digits-image", tmp_path / "absent", environ={ENV_VAR: str(places["env"])})


def test_none_found_names_all_three(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "REPO_MODELS", tmp_path / "no-checkout")
    for environ, why in (({}, f"{ENV_VAR} is not set"), ({ENV_VAR: str(tmp_path)}, "holds no model")):
        with pytest.raises(ModelNotFoundError) as error:
            model_path("digits-video", environ=environ)
        message = str(error.value)
        assert "an explicit path: none given" in message and why in message
        assert str(tmp_path / "no-checkout" / "digits-video") in message
        assert "python -m diffusers_block.train digits-video" in message
    assert issubclass(ModelNotFoundError, FileNotFoundError)  # callers catching FileNotFoundError keep working


def test_the_shipped_models_are_found_in_this_checkout():
    for name in locate.SHIPPED:
        assert model_path(name, environ={}).parent == locate.REPO_MODELS


def test_the_adapter_table_holds_no_path_to_a_model_of_ours():
    source = (Path(locate.__file__).parents[1] / "models.py").read_text()
    assert "models/" not in source and "zoo" not in source and "Path(" not in source
