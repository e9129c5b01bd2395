"""mkdocs hooks (see mkdocs.yml): the API reference's docstring check, and the repository's result files.

- Before the build, every public name of ``diffusers_block`` and ``diffusers_block.distill`` (their ``__all__``) and
  every public method or property such a class defines must have a docstring: the API reference is generated from
  them, so one missing fails the build (``tests/test_docs.py`` runs the same check).
- The pages link to ``benchmarks/results/*.json``, the lab notes under ``benchmarks/labs/`` and the training logs in
  ``models/*/training/`` by their repository paths; ``on_files`` adds those files to the site, so the links work in
  the built site and mkdocs' link validation (``mkdocs build --strict``) fails on one that points nowhere.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ("diffusers_block", "diffusers_block.distill")
PUBLISHED = (
    "benchmarks/results/*",
    "benchmarks/labs/*/README.md",
    "benchmarks/labs/*/results/*",
    "models/*/training/**/*",
    "models/digit-classifier/metrics.json",
)


def public_names() -> list[tuple[str, object]]:
    """``(qualified name, object)`` for every name in the public modules' ``__all__``."""
    if str(ROOT) not in sys.path:  # this checkout's package, like mkdocstrings' `paths: [.]`, not another install
        sys.path.insert(0, str(ROOT))
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [(f"{module_name}.{name}", getattr(module, name)) for name in module.__all__]
    return names


def missing_docstrings(qualname: str, obj) -> list[str]:
    """``qualname`` itself, and for a class each public method or property it defines, where a docstring is missing
    (inherited members are documented where they are defined)."""
    own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    missing = [] if (own or "").strip() else [qualname]
    if inspect.isclass(obj):
        for name, value in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            elif not inspect.isfunction(value):
                continue
            if not (value.__doc__ or "").strip():
                missing.append(f"{qualname}.{name}")
    return missing


def on_pre_build(config):
    from mkdocs.exceptions import PluginError

    missing = [name for qualname, obj in public_names() for name in missing_docstrings(qualname, obj)]
    if missing:
        raise PluginError(f"public API without a docstring (the API reference is built from them): {missing}")


def on_files(files, config):
    from mkdocs.structure.files import File

    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file():
                files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
