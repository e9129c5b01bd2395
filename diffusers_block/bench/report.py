"""What every benchmark records: where it ran, how it was called, a printed table and a JSON file.

A number without its GPU, library versions and command line cannot be compared with a later one, so each result
file carries them, under ``benchmarks/results/<name>-<gpu-slug>-<date>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks/results")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


#: Set to 1 to write results from a tree with uncommitted changes (what ``--allow-dirty`` does for one run).
ALLOW_DIRTY = "DIFFUSERS_BLOCK_ALLOW_DIRTY"


class DirtyTreeError(RuntimeError):
    """The checkout has uncommitted changes, so no commit names the code a result would come from."""


def git_commit() -> tuple[str | None, bool]:
    """(commit, dirty): ``DIFFUSERS_BLOCK_COMMIT`` when set (a copy of the tree whose git metadata is stale or missing,
    as on a remote GPU runner: whoever sets it vouches that the copy is that commit), else ``git describe --dirty``
    of this checkout. ``dirty``: the checkout's tracked files differ from the commit (the name ends in ``-dirty``)."""
    commit = os.environ.get("DIFFUSERS_BLOCK_COMMIT") or _describe()
    return commit, commit is not None and commit.endswith("-dirty")


def _describe() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_tree(allow_dirty: bool = False) -> tuple[str | None, bool]:
    """(commit, dirty), refusing a dirty tree (:class:`DirtyTreeError`) unless ``allow_dirty`` or
    ``DIFFUSERS_BLOCK_ALLOW_DIRTY=1``; an allowed one is warned about on stderr. A committed result must name the
    code it came from, and ``abc1234-dirty`` names none: benchmarks call this before they run, not after."""
    commit, dirty = git_commit()
    if dirty:
        if not (allow_dirty or os.environ.get(ALLOW_DIRTY) == "1"):
            raise DirtyTreeError(
                f"the working tree has uncommitted changes ({commit}), so the result would name no commit. Commit "
                f'first, or pass --allow-dirty (or set {ALLOW_DIRTY}=1) to write it flagged "dirty": true; on a '
                f"copy whose git metadata is stale, DIFFUSERS_BLOCK_COMMIT names the commit instead."
            )
        print(f'WARNING: benchmarking a dirty tree ({commit}); the result is flagged "dirty": true', file=sys.stderr)
    return commit, dirty


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: torch.device, allow_dirty: bool = False) -> dict:
    """Where and from what a result comes; refuses a dirty tree unless allowed (:func:`check_tree`)."""
    commit, dirty = check_tree(allow_dirty)
    return {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "diffusers_block": _version("diffusers-block"),
        "git": commit,
        "dirty": dirty,
        "platform": platform.platform(),
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "diffusers_block.bench", *argv])


def result_path(out_dir: str | Path | None, name: str, device: torch.device) -> Path:
    """``<out_dir>/<name>-<gpu-slug>-<date>.json``, with -2, -3... appended rather than overwrite an earlier run."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    gpu = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else device.type
    stem = f"{name}-{gpu}-{datetime.now():%Y-%m-%d}"
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stem}-{n}.json"
    return path


def write_json(path: Path, payload: Mapping) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=lambda o: dict(o) if isinstance(o, Mapping) else str(o)))
    return path


Column = tuple[str, str, Callable]  # (row key, header, value -> text)


def print_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> None:
    """Right-aligned text table; a missing or None value prints as '-'."""
    cells = [[header for _, header, _ in columns]]
    cells += [["-" if row.get(key) is None else fmt(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
