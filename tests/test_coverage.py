"""Every transformer class diffusers exports, held to its outcome; the committed coverage docs are that outcome.

One module-scoped run builds each class once (tests/coverage); the assertions share it.
"""

import pytest
import torch

from diffusers_block.models import FAMILIES
from tests.coverage import NOT_A_DIT, RECIPES, missing_classes, transformer_classes
from tests.coverage.outcome import REFUSED, SUPPORTED
from tests.coverage.render import JSON_PATH, outcomes, rendered


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    try:
        return {result.cls: result for result in outcomes()}
    finally:
        torch.set_num_threads(threads)


def test_every_exported_class_has_a_recipe_or_is_not_a_dit():
    assert len(transformer_classes()) > 50  # the enumeration itself works
    assert missing_classes() == [], "new in diffusers: give each a recipe in tests/coverage or a not_a_dit entry"
    stale = sorted((set(RECIPES) | set(NOT_A_DIT)) - set(transformer_classes()))
    assert stale == [], f"no longer exported by diffusers: {stale}"


def test_every_class_in_the_adapter_table_is_supported(results):
    listed = {cls for spec in FAMILIES.values() if not spec.refused for cls in spec.transformer_classes}
    listed &= set(results)
    assert listed, "the adapter table names no diffusers class"
    assert {cls: results[cls].outcome for cls in listed} == dict.fromkeys(listed, SUPPORTED)


def test_refusals_name_the_class_and_what_is_missing(results):
    for result in results.values():
        if result.outcome == REFUSED:
            assert result.cls in result.reason and len(result.reason) > len(result.cls) + 40, result.reason


def test_committed_docs_are_the_outcome(results):
    expected = rendered([results[name] for name in transformer_classes()])
    stale = [str(path.relative_to(JSON_PATH.parents[1])) for path, text in expected.items() if path.read_text() != text]
    assert stale == [], f"{stale} differ from the outcome: run `python -m tests.coverage --write --render`"
