"""The documentation's promises: every public name has a docstring (the API reference is generated from them), and
the front page keeps the two fresh-machine commands and links only to files that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import diffusers_block
import diffusers_block.distill

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = (diffusers_block, diffusers_block.distill)
DEMO_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[demo]" '
    "&& python app.py"
)
TEST_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" '
    "&& python -m pytest -q"
)


def _hooks():
    """``docs/hooks.py``: the docstring check ``mkdocs build`` runs before building the API reference."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _hooks()


@pytest.mark.parametrize("qualname, obj", HOOKS.public_names(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_has_docstrings(qualname, obj):
    missing = HOOKS.missing_docstrings(qualname, obj)
    assert not missing, f"no docstring (the API reference is built from them): {missing}"


def test_module_docstrings():
    for module in PUBLIC_MODULES:
        assert (module.__doc__ or "").strip(), f"{module.__name__} has no module docstring"


def _fenced_bash(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_keeps_the_fresh_machine_commands():
    blocks = _fenced_bash((ROOT / "README.md").read_text())
    assert DEMO_COMMAND in blocks, "README.md lost the demo command (its own fenced bash block)"
    assert TEST_COMMAND in blocks, "README.md lost the test command (its own fenced bash block)"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; details belong in docs/"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    broken = [
        target
        for target in targets
        if not re.match(r"[a-z]+://|#|mailto:", target) and not (ROOT / target.split("#")[0]).exists()
    ]
    assert not broken, f"README.md links to missing files: {broken}"


def test_mkdocs_nav_pages_exist():
    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s*([\w/.-]+\.md)\s*$", text, flags=re.M)
    assert pages
    missing = [page for page in pages if not (ROOT / "docs" / page).is_file()]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"
