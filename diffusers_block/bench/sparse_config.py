"""The ``--config`` option of the sparse-attention benchmarks: the command line's sparse options, or the library's
default ``SparseAttentionConfig()`` exactly as a user gets it.

A default that is never measured is a guess: ``--config default`` runs ``SparseAttentionConfig()`` itself (every
sparse option of the command line is ignored) and records it in the JSON by its repr, with ``"is_default": true``.
``--default-override FIELD=VALUE`` changes named fields of that default (e.g. ``min_tokens=0`` where a model is
shorter than the default's ``min_tokens`` and would stay dense); the record then names them and is no longer flagged
as the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses

from ..attention.config import SparseAttentionConfig

CHOICES = ("options", "default")
FIELDS = tuple(field.name for field in dataclasses.fields(SparseAttentionConfig))


def parse_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE``: VALUE a Python literal (``0``, ``0.5``, ``None``, ``(2, 8, 8)``), or a bare word for strings
    (``approximation=cached``); the config checks the value itself."""
    name, sep, value = text.partition("=")
    if not sep or name not in FIELDS:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=VALUE with FIELD one of SparseAttentionConfig's fields ({', '.join(FIELDS)}); got {text!r}"
        )
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        choices=CHOICES,
        default="options",
        help="options: the sparse config built from this command line's options; default: exactly "
        "SparseAttentionConfig() (the library default), the sparse options of the command line ignored",
    )
    parser.add_argument(
        "--default-override",
        nargs="+",
        type=parse_override,
        default=[],
        metavar="FIELD=VALUE",
        help="with --config default: change these fields of the default (e.g. min_tokens=0 on a model shorter than "
        "the default's min_tokens); the result is then no longer flagged as the default",
    )


def default_config(args) -> SparseAttentionConfig:
    """``SparseAttentionConfig()`` with ``--default-override`` applied (none: the default itself)."""
    overrides = dict(args.default_override)
    if overrides and args.config != "default":
        raise SystemExit("--default-override changes the default config: pass --config default with it")
    return dataclasses.replace(SparseAttentionConfig(), **overrides) if overrides else SparseAttentionConfig()


def record(config: SparseAttentionConfig) -> dict:
    """What the JSON says about a config: its repr, whether it is the library default, the fields that differ."""
    default = SparseAttentionConfig()
    return {
        "repr": repr(config),
        "is_default": config == default,
        "differs_from_default": {
            name: getattr(config, name) for name in FIELDS if getattr(config, name) != getattr(default, name)
        },
    }
