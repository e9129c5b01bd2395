"""Coverage of every transformer class diffusers exports: a tiny recipe or a not-a-DiT entry for each.

``registry`` holds the entries, ``recipes_image`` / ``recipes_video`` / ``not_dits`` fill it, ``outcome`` holds
each class to "supported" or "refused", ``render`` turns the outcomes into ``docs/coverage.json`` and the tables
of README.md and docs/supported-models.md. ``python -m tests.coverage --write --render`` regenerates all three;
``tests/test_coverage.py`` checks they match what the classes do now.
"""

from . import not_dits, recipes_image, recipes_video  # noqa: F401  (each module registers its entries)
from .registry import NOT_A_DIT, RECIPES, missing_classes, transformer_classes

__all__ = ["NOT_A_DIT", "RECIPES", "missing_classes", "transformer_classes"]
