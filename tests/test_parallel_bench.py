"""``python -m diffusers_block.bench parallel`` under torchrun with 2 gloo CPU processes (the plumbing; GPU numbers
come from the commands in docs/multi-gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_block.bench.__main__ import main


@pytest.mark.slow
def test_parallel_bench_runs_under_torchrun(tmp_path):
    """The plumbing of ``bench parallel``: a 1-process baseline, then torchrun with 2 gloo processes against it."""
    options = ["--sizes", "tiny", "--steps", "4", "--repeats", "1", "--warmup-steps", "0", "--dense-steps", "1"]
    options += ["--refresh", "1", "--cache", "static", "--out", str(tmp_path), "--allow-dirty"]
    single = main(["parallel", *options])
    (baseline,) = tmp_path.glob("parallel-1proc-*.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "diffusers_block.bench", "parallel", *options, "--baseline", str(baseline)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("parallel-2proc-*.json")
    payload = json.loads(result.read_text())
    assert payload["processes"] == 2 and payload["parallelism"] == "ContextParallelConfig(ulysses_degree=2)"
    assert payload["command"].startswith("torchrun --nproc-per-node 2 -m diffusers_block.bench parallel")
    runs, base = payload["sizes"]["tiny"]["runs"], single["sizes"]["tiny"]["runs"]
    assert set(runs) == {"dense", "cached", "sparse", "sparse+cached"}
    for name, row in runs.items():
        assert row["scaling_efficiency"] > 0 and row["ms_per_step"] > 0
        # same decisions and block lists on 2 processes as on one: the same drift from dense
        assert row["rel_l2_vs_dense"] == pytest.approx(base[name]["rel_l2_vs_dense"], rel=1e-3, abs=1e-6)
    assert runs["dense"]["scaling_vs_dense"] == 1.0
    assert runs["cached"]["fraction_computed"] == base["cached"]["fraction_computed"] < 1
    assert runs["sparse"]["sparse_density"] == pytest.approx(base["sparse"]["sparse_density"])
