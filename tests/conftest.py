import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests write benchmark results into temporary folders, never into benchmarks/results: they may run on a tree being
# edited. (The refusal itself is tested with this unset.)
os.environ.setdefault("DIFFUSERS_BLOCK_ALLOW_DIRTY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
