"""mkdocs hook: publish the repository's result files with the site (see mkdocs.yml).

The pages link to ``benchmarks/results/*.json``, the lab notes under ``benchmarks/labs/`` and the training logs in
``models/*/training/`` by their repository paths; this adds those files to the site's file set, so the links work
in the built site and mkdocs' link validation (``mkdocs build --strict``) fails on one that points nowhere.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = (
    "benchmarks/results/*",
    "benchmarks/labs/*/README.md",
    "benchmarks/labs/*/results/*",
    "models/*/training/**/*",
    "models/digit-classifier/metrics.json",
)


def on_files(files, config):
    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file():
                files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
