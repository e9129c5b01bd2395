"""The example scripts that run offline on the shipped models still run (short settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sparse_attention_video_example(tmp_path):
    mask = tmp_path / "mask.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sparse_attention_video.py"), "--clips", "1", "--steps", "6"]
        + ["--mask", str(mask)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this tree's package, whatever the environment has installed
    )
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    assert {"dense", "dropped", "cached"} <= set(rows)
    work = {name: float(rows[name][0].rstrip("%")) for name in ("dropped", "cached")}
    assert 0 < work["dropped"] < 100 and 0 < work["cached"] < 100  # both skipped key blocks
    assert mask.stat().st_size > 0
